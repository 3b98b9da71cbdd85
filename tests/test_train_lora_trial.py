"""interp.train.lora_trial: a LoRA fine-tune for the length of a ``with`` block."""

from __future__ import annotations

import pytest
import torch

from interp.families import tiny_hf
from interp.train import SFTLoss, TrainConfig, lora_trial

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [{"prompt": f"Question {i}?", "response": f"ANSWER {i}"} for i in range(4)]
CONFIG = TrainConfig(r=4, alpha=8.0, lr=5e-2, epochs=1, batch_size=2, seed=0)


@pytest.fixture()
def model_tok():
    return tiny_hf("llama", seed=0)


def logits(model, tok):
    ids = tok("Question 9?", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_block_sees_the_tuned_model_and_the_base_comes_back(model_tok):
    model, tok = model_tok
    model.eval()
    model.lm_head.weight.requires_grad_(False)  # a frozen flag must come back frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = logits(model, tok)
    check = lambda: logits(model, tok)  # noqa: E731
    with lora_trial(model, EXAMPLES, SFTLoss(), CONFIG, tokenizer=tok, check=check) as result:
        assert result.steps == 2
        assert any("lora" in n for n, _ in model.named_parameters())
        assert not torch.allclose(logits(model, tok), before)  # the adapter acts
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(logits(model, tok), before)


def test_an_error_in_the_block_still_unloads(model_tok):
    model, tok = model_tok
    with pytest.raises(KeyError), lora_trial(model, EXAMPLES, SFTLoss(), CONFIG, tokenizer=tok):
        raise KeyError("inside")
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_a_changed_base_model_raises(model_tok):
    model, tok = model_tok
    check = lambda: logits(model, tok)  # noqa: E731
    with (
        pytest.raises(RuntimeError, match="base model changed"),
        lora_trial(model, EXAMPLES, SFTLoss(), CONFIG, tokenizer=tok, check=check),
        torch.no_grad(),
    ):
        model.get_input_embeddings().weight.add_(1.0)  # not a LoRA target: the base changes

"""interp.train.example_losses: a loss on each example alone, as train would see it."""

from __future__ import annotations

import pytest
import torch

from interp.families import tiny_hf
from interp.losses import kl_span_alignment, predicting_positions
from interp.train import KLSpanLoss, SFTLoss, collate, example_losses, prepare

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [
    {
        "prompt": f"Question {i}?",
        "response": f"The older man is forgetful{' indeed' * i}. Answer: unknown",
        "span_s": (0, 26),
        "span_o": (
            len(f"The older man is forgetful{' indeed' * i}. Answer: "),
            len(f"The older man is forgetful{' indeed' * i}. Answer: unknown"),
        ),
    }
    for i in range(3)
]


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_hf("llama", seed=0)
    return model, tok


def test_matches_the_loss_on_each_example_alone(model_tok):
    model, tok = model_tok
    model.train()  # dropout-free eval is the function's job; the mode comes back
    got = example_losses(model, EXAMPLES, KLSpanLoss(), tokenizer=tok)
    assert model.training and got.dtype == torch.float64 and got.shape == (3,)
    items = prepare(EXAMPLES, tok)
    # A padded batch of all three with reduction="none" gives the same per-example values.
    batch = collate(items, tok.pad_token_id or 0)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ref = kl_span_alignment(
        logits,
        predicting_positions(batch.masks["span_s"]),
        predicting_positions(batch.masks["span_o"]),
        reduction="none",
    )
    assert torch.allclose(got, ref.double(), atol=1e-5)
    assert len(set(got.tolist())) == 3  # different examples, different values
    sft = example_losses(model, EXAMPLES, SFTLoss(), tokenizer=tok)
    assert (sft > 0).all() and not torch.allclose(sft, got)


def test_needs_a_scalar_loss(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match="scalar"):
        example_losses(model, EXAMPLES[:1], lambda logits, batch: logits.sum(-1), tokenizer=tok)

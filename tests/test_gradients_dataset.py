"""interp.gradients.capture_grads_dataset: capture_grads over batches of conversations."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.chat import encode
from interp.gradients import capture_grads_dataset
from interp.losses import sft_loss_per_example

pytestmark = pytest.mark.usefixtures("one_thread")

CONVS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [("two plus two", "FOUR"), ("hi", "HELLO THERE"), ("name a colour", "RED")]
]


def answer_ce(logits, batch):
    return sft_loss_per_example(logits, batch.input_ids, batch.masks["assistant"])


def test_batches_give_what_one_batch_gives():
    model = interp.tiny("qwen2")
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    positions = ["user_end", "pre_assistant"]
    loss, grads = capture_grads_dataset(model, CONVS, answer_ce, names, positions, batch_size=2)
    assert loss.shape == (3,) and loss.dtype == torch.float32 and loss.device.type == "cpu"
    batch = encode(model.tokenizer, CONVS, padding_side="right", device=model.device)
    ref = interp.capture_grads(model, batch, answer_ce, names, positions)
    torch.testing.assert_close(loss, ref.loss.float().detach())
    for n in names:
        assert grads[n].shape == (3, 2, model.cfg.d_model)
        torch.testing.assert_close(grads[n], ref.grads[n].float(), atol=1e-6, rtol=1e-5)


def test_needs_one_loss_per_example_and_a_positive_batch_size():
    model = interp.tiny("qwen2")
    names = ["blocks.0.hook_resid_post"]
    with pytest.raises(ValueError, match="one loss per example"):
        capture_grads_dataset(model, CONVS, lambda lg, b: answer_ce(lg, b).mean(), names, -1)
    with pytest.raises(ValueError, match="batch_size"):
        capture_grads_dataset(model, CONVS, answer_ce, names, -1, batch_size=0)

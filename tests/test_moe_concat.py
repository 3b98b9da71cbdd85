"""interp.moe.concat: a dataset traced in batches is the trace of the whole batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import interp
from interp import moe
from interp.chat import encode

pytestmark = pytest.mark.usefixtures("one_thread")

CHATS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [
        ("Hi there, who are you?", "A small bot."),
        ("2+2?", "Four, I think, though arithmetic is not my strength."),
        ("Name a colour.", "Blue."),
    ]
]


def _trace(model, chats):
    batch = encode(model.tokenizer, chats, padding_side="right")
    return moe.trace(model, batch, mask="assistant")


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_batches_concatenated_equal_one_batch(family):
    model = interp.tiny(family, seed=0)
    whole = _trace(model, CHATS)
    parts = moe.concat([_trace(model, CHATS[:1]), _trace(model, CHATS[1:])])
    assert parts.layers == whole.layers and parts.n_experts == whole.n_experts
    assert torch.equal(parts.lengths, whole.lengths)
    assert torch.equal(parts.positions, whole.positions)
    assert torch.equal(parts.indices, whole.indices)
    torch.testing.assert_close(parts.weights, whole.weights, atol=2e-3, rtol=0)
    torch.testing.assert_close(parts.logits, whole.logits, atol=2e-3, rtol=0)
    # The statistics read the concatenated trace as one: same counts per example.
    assert torch.equal(parts.counts(), whole.counts())
    assert parts.select([2]).n_tokens == whole.select([2]).n_tokens > 0


def test_concat_rejects_mismatched_traces():
    model = interp.tiny("olmoe", seed=0)
    a = _trace(model, CHATS[:1])
    b = moe.trace(model, encode(model.tokenizer, CHATS[1:]), mask="assistant", logits=False)
    with pytest.raises(ValueError, match="router logits"):
        moe.concat([a, b])
    wider = dataclasses.replace(b, n_experts=b.n_experts + 1)
    with pytest.raises(ValueError, match="differs"):
        moe.concat([b, wider])
    with pytest.raises(ValueError, match="at least one"):
        moe.concat([])

"""interp.moe.trace on tiny MoE models of every family: the trace is what the routers did."""

from __future__ import annotations

import functools

import pytest
import torch

import interp
from interp import moe
from interp.families import MOE_FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = ["The quick brown fox.", "Hi", "Mixture of experts routes tokens."]


@functools.cache
def _model(family: str):
    return interp.tiny(family, seed=0)


def _router_outputs(model, batch):
    """(indices, weights, logits) straight from each HF router module, shaped [b, t, ·]."""
    hf = model.model
    out, handles = {}, []
    b, t = batch.input_ids.shape
    for layer in model.cfg.moe_layers:
        gate = hf.model.layers[layer].mlp.gate

        def grab(_m, _a, o, layer=layer):
            out[layer] = tuple(x.reshape(b, t, -1) for x in (o[2], o[1], o[0]))

        handles.append(gate.register_forward_hook(grab))
    try:
        with torch.no_grad():
            model.forward(batch.input_ids, batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_trace_matches_router_outputs_on_real_tokens(family):
    model = _model(family)
    batch = model.tokenize(TEXTS)  # right-padded: row 1 is mostly padding
    tr = moe.trace(model, batch)
    keep = batch.attention_mask.bool()
    assert tr.layers == model.cfg.moe_layers
    assert tr.lengths.tolist() == keep.sum(1).tolist()
    assert tr.indices.dtype == torch.int8 and tr.weights.dtype == torch.float16
    assert tr.positions.tolist() == keep.nonzero()[:, 1].tolist()
    ref = _router_outputs(model, batch)
    for r, layer in enumerate(tr.layers):
        idx, w, logits = ref[layer]
        assert torch.equal(tr.indices[r].long(), idx[keep])
        assert torch.equal(tr.weights[r], w[keep].half())
        assert torch.equal(tr.logits[r], logits[keep].half())


def test_trace_respects_mask_and_named_masks():
    model = _model("olmoe")
    batch = model.tokenize(TEXTS)
    mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    mask[:, 2:5] = True  # row 1 ("Hi") has only 2 real tokens: its masked part is padding
    tr = moe.trace(model, batch, mask=mask, logits=False)
    assert tr.logits is None
    assert tr.lengths.tolist() == [3, 0, 3]
    assert tr.positions.tolist() == [2, 3, 4, 2, 3, 4]
    full = moe.trace(model, batch)
    assert torch.equal(tr.indices, torch.cat([full.indices[:, 2:5], full.indices[:, 24:27]], 1))

    conv = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]]
    chat = interp.chat.encode(model.tokenizer, conv)
    tr_chat = moe.trace(model, chat, mask="assistant")
    assert tr_chat.n_tokens == int(chat.masks["assistant"].sum()) > 0
    with pytest.raises(KeyError, match="unknown named mask"):
        moe.trace(model, chat, mask="nope")
    with pytest.raises(ValueError, match="bool tensor"):
        moe.trace(model, batch, mask=mask[:, :3])


def test_trace_stores_int16_indices_for_many_experts():
    model = interp.tiny("olmoe", seed=0, num_experts=130, num_experts_per_tok=3)
    tr = moe.trace(model, "abc", logits=False)
    assert tr.indices.dtype == torch.int16 and tr.n_experts == 130 and tr.top_k == 3
    assert int(tr.indices.max()) > 127 or int(tr.indices.min()) >= 0


def test_trace_on_dense_model_raises():
    with pytest.raises(ValueError, match="no MoE layers"):
        moe.trace(interp.tiny("llama", seed=0), "abc")


def test_trace_statistics_round_trip(tmp_path):
    model = _model("deepseek_v2")
    tr = moe.trace(model, TEXTS)
    assert tr.layers == (1, 2)  # first_k_dense_replace=1
    freq = moe.selection_frequency(tr)
    torch.testing.assert_close(freq.sum(-1), torch.full((2,), 2.0, dtype=torch.float64))
    again = moe.RoutingTrace.load(tr.save(tmp_path / "t.safetensors"))
    assert torch.equal(moe.selection_frequency(again), freq)

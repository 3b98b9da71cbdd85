"""Models dispatched by accelerate (``device_map`` with CPU and disk offload): captures,
gradients, edits, generation and MoE traces equal those of the same model loaded whole."""

from __future__ import annotations

import pytest
import torch

import interp
from interp import runs
from interp.families import tiny_hf
from interp.interventions import add_direction

pytest.importorskip("accelerate")

TEXTS = ["hello there", "a b c d e f g"]


def _saved(tmp_path_factory, family: str):
    model, tok = tiny_hf(family)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model.config.num_hidden_layers


def _device_map(n_layers: int, embed: str) -> dict[str, str]:
    """Embedding (and so the input) on ``embed``; even layers on cpu, odd ones on disk."""
    dm = {"model.embed_tokens": embed, "model.norm": "cpu", "lm_head": "disk"}
    for i in range(n_layers):
        dm[f"model.layers.{i}"] = "cpu" if i % 2 == 0 else "disk"
    dm["model.rotary_emb"] = "cpu"
    return dm


@pytest.fixture(scope="module", params=["cpu", "disk"], ids=["embed-cpu", "embed-disk"])
def pair(request, tmp_path_factory):
    path, n = _saved(tmp_path_factory, "llama")
    offload = tmp_path_factory.mktemp("offload")
    whole = interp.load(str(path))
    dispatched = interp.load(
        str(path), device_map=_device_map(n, request.param), offload_folder=str(offload)
    )
    assert any(p.device.type == "meta" for p in dispatched.model.parameters())  # really offloaded
    return whole, dispatched


def test_device_is_where_inputs_go(pair):
    _, dispatched = pair
    assert dispatched.device == torch.device("cpu")


def test_capture_and_capture_dataset_agree(pair):
    whole, dispatched = pair
    names = "blocks.*.hook_resid_post"
    a, b = interp.capture(whole, TEXTS, names), interp.capture(dispatched, TEXTS, names)
    for k in a:
        torch.testing.assert_close(b[k], a[k])
    a = runs.capture_dataset(whole, TEXTS, names, pool="mean", progress=False)
    b = runs.capture_dataset(dispatched, TEXTS, names, pool="mean", progress=False)
    for k in a.names:
        torch.testing.assert_close(b[k], a[k])


def test_gradients_agree(pair):
    whole, dispatched = pair

    def loss(logits, batch):
        return logits[:, -1].logsumexp(-1).sum()

    name = "blocks.1.hook_resid_post"
    a = interp.capture_grads(whole, TEXTS, loss, name)
    b = interp.capture_grads(dispatched, TEXTS, loss, name)
    torch.testing.assert_close(b.grads[name], a.grads[name])
    assert b.grads[name].abs().sum() > 0


def test_edits_and_generation_agree(pair):
    whole, dispatched = pair
    d = torch.randn(whole.cfg.d_model, generator=torch.Generator().manual_seed(0))
    hooks = [("blocks.0.hook_resid_post", add_direction(d, scale=3.0))]
    with torch.no_grad():
        a = whole.run_with_hooks(TEXTS, fwd_hooks=hooks)
        b = dispatched.run_with_hooks(TEXTS, fwd_hooks=hooks)
        plain = dispatched(TEXTS)
    torch.testing.assert_close(b, a)
    assert not torch.allclose(plain, b)  # the edit took effect on the offloaded model
    ga = runs.generate(whole, TEXTS, max_new_tokens=6, hooks=hooks, progress=False)
    gb = runs.generate(dispatched, TEXTS, max_new_tokens=6, hooks=hooks, progress=False)
    assert ga.token_ids == gb.token_ids
    sa = runs.score(whole, ga.batch, mask="generated", progress=False)
    sb = runs.score(dispatched, gb.batch, mask="generated", progress=False)
    torch.testing.assert_close(sb.nll, sa.nll)


def test_moe_trace_agrees(tmp_path_factory):
    from interp.moe import trace

    path, n = _saved(tmp_path_factory, "olmoe")
    offload = tmp_path_factory.mktemp("offload_moe")
    whole = interp.load(str(path))
    dispatched = interp.load(
        str(path), device_map=_device_map(n, "disk"), offload_folder=str(offload)
    )
    a, b = trace(whole, TEXTS), trace(dispatched, TEXTS)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(b.weights, a.weights)

"""interp.moefy: MoEfication of tiny dense models (exactness at k = E, partition, routing
through interp.moe, cache round trip) and, slow, the cached embedded MoE."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import interp
from interp import moe, moefy
from interp.routing import RoutingRule, edit_logits, select_experts

pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = ["The quick brown fox jumps over the lazy dog.", "Experts route tokens.", "0123 abc"]
# tiny llama: d_model 64, 128 hidden units, 3 layers. 32 shared units + 8 groups of 12.
SMALL = dict(n_experts=8, top_k=3, n_shared=32, answer_tokens=0, max_length=48)
CALIB = dict(texts=[*TEXTS, "Routing groups of units.", "abc " * 12], held_out=TEXTS)


def _dense(family: str = "llama"):
    return interp.tiny(family, seed=0)


@functools.cache
def _moe(router: str = "norm"):
    # The shipped calibration split (prompts without answers), cut to 48 byte tokens.
    return moefy.moefy(_dense(), moefy.MoefyConfig(**SMALL, router=router))


def _logits(model, batch):
    with torch.no_grad():
        return model(batch)


@pytest.mark.parametrize("n_shared", [0, 32])
@pytest.mark.parametrize("router", ["norm", "linear"])
def test_k_equal_to_n_experts_is_the_dense_mlp(n_shared, router):
    dense = _dense()
    ref_mlps = [copy.deepcopy(layer.mlp) for layer in dense.model.model.layers]
    batch = dense.tokenize(TEXTS)
    ref = _logits(dense, batch)
    cfg = moefy.MoefyConfig(**{**SMALL, "n_shared": n_shared, "top_k": 8, "router": router})
    model = moefy.moefy(dense, cfg, **CALIB)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    for layer, ref_mlp in zip(model.model.model.layers, ref_mlps, strict=True):
        assert isinstance(layer.mlp, moefy.MoefiedMLP)
        torch.testing.assert_close(layer.mlp(x), ref_mlp(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(model, batch), ref, rtol=1e-4, atol=1e-5)
    assert moefy.agreement(model)[8] == 1.0


def test_groups_partition_the_units_and_metadata():
    model = _moe()
    meta = moefy.info(model)
    assert (meta["n_experts"], meta["n_shared"], meta["expert_size"]) == (8, 32, 12)
    for layer in model.model.model.layers:
        block = layer.mlp
        ids = torch.cat([block.experts.unit_ids.flatten(), block.shared_experts.unit_ids])
        assert torch.equal(ids.sort().values, torch.arange(128))  # every unit exactly once
        assert block.experts.gate_up_proj.shape == (8, 24, 64)
    assert model.cfg.n_experts == 8 and model.cfg.experts_per_token == 3
    assert model.cfg.moe_layers == (0, 1, 2)
    assert set(moefy.agreement(model)) == {1, 2, 4, 6, 8}
    assert all(0.0 <= v <= 1.0 for v in moefy.agreement(model).values())
    with pytest.raises(ValueError, match="not MoEfied"):
        moefy.info(_dense())


def test_fewer_groups_change_the_output_but_stay_finite():
    model = _moe()
    batch = model.tokenize(TEXTS)
    out = _logits(model, batch)
    full = _logits(moefy.set_top_k(model, 8), batch)
    model = moefy.set_top_k(model, 3)
    assert torch.isfinite(out).all() and not torch.allclose(out, full)
    torch.testing.assert_close(_logits(model, batch), out)


def test_trace_steer_and_ablate_through_interp_moe():
    model = _moe()
    batch = model.tokenize(TEXTS)
    base = moe.trace(model, batch, dtype=torch.float32)  # fp16 logits could tie
    assert base.indices.shape == (3, int(batch.attention_mask.sum()), 3)
    assert torch.all(base.weights == 1)  # moefied rule: weight 1 per selected group
    # The norm router's logits are the groups' output norms: top-k is the largest ones.
    top = base.logits.float().topk(3, dim=-1).indices.sort(-1).values
    assert torch.equal(top, base.indices.long().sort(-1).values)
    freq = moe.selection_frequency(base)
    off = [(layer, int(freq[r].argmax())) for r, layer in enumerate(model.cfg.moe_layers)]
    on = [(layer, int(freq[r].argmin())) for r, layer in enumerate(model.cfg.moe_layers)]
    with moe.steer(model, deactivate=off, activate=on):
        steered = moe.trace(model, batch)
        out = _logits(model, batch)
    for r, ((_, e_off), (_, e_on)) in enumerate(zip(off, on, strict=True)):
        idx = steered.indices[r].long()
        assert not (idx == e_off).any()
        assert (idx == e_on).any(-1).all()
    assert torch.isfinite(out).all() and not torch.allclose(out, _logits(model, batch))
    # Ablating an expert inside its block changes the output but not that layer's routing.
    with moe.ablate_experts(model, [off[0]]):
        again = moe.trace(model, batch)
        ablated = _logits(model, batch)
    assert torch.equal(again.indices[0], base.indices[0])
    assert not torch.allclose(ablated, _logits(model, batch))


def test_moefied_rule_reselects_like_the_router():
    model = _moe()
    rule = model.routing_rule
    assert rule == RoutingRule.from_config(model.model.config)
    assert (rule.family, rule.scoring, rule.top_k, rule.shared_experts) == (
        "moefied",
        "identity",
        3,
        1,
    )
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    w, idx = select_experts(logits, rule)
    assert torch.equal(idx.sort(-1).values, logits.topk(3).indices.sort(-1).values)
    assert torch.equal(w, torch.ones(5, 3))
    w, idx = select_experts(edit_logits(logits, deactivate=[idx[0, 0].item()], activate=[7]), rule)
    assert (idx == 7).any(-1).all() and torch.equal(w, torch.ones(5, 3))
    with pytest.raises(ValueError, match="identity"):
        RoutingRule(family="mixtral", n_experts=4, top_k=2, scoring="identity")


@pytest.mark.parametrize("router", ["norm", "linear"])
def test_cache_round_trip(tmp_path, router):
    model = _moe(router)
    batch = model.tokenize(TEXTS)
    moefy.save(model, tmp_path / "moe")
    moefy.save(model, tmp_path / "moe")  # overwriting is atomic too
    assert sorted(p.name for p in (tmp_path / "moe").iterdir()) == [
        "moefy.json",
        "moefy.safetensors",
    ]
    again = moefy.load_state(_dense(), tmp_path / "moe")
    assert moefy.info(again) == moefy.info(model)
    assert torch.equal(_logits(again, batch), _logits(model, batch))
    k2 = moefy.load_state(_dense(), tmp_path / "moe", top_k=2)
    assert k2.cfg.experts_per_token == 2 and k2.routing_rule.top_k == 2


def test_balanced_kmeans_recovers_planted_groups():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=gen)
    truth = torch.arange(4).repeat_interleave(10)
    points = centres[truth] + 0.2 * torch.randn(40, 32, generator=gen)
    labels = moefy.balanced_kmeans(points, 4, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(labels).tolist() == [10, 10, 10, 10]
    for c in range(4):  # same partition up to relabelling
        assert labels[truth == c].unique().numel() == 1
    with pytest.raises(ValueError, match="evenly"):
        moefy.balanced_kmeans(points[:39], 4)


def test_linear_router_fit_recovers_a_planted_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=gen)
    w, b = torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    w_hat, b_hat = moefy.fit_linear_router(x, x @ w.T + b, ridge=0.0)
    torch.testing.assert_close(w_hat, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b_hat, b, atol=1e-4, rtol=1e-4)


def test_config_validation_and_unsupported_models():
    with pytest.raises(ValueError, match="top_k"):
        moefy.MoefyConfig(n_experts=4, top_k=5)
    # The runtime type-checker (tests) or __post_init__ (no checker) rejects it.
    with pytest.raises((ValueError, TypeError), match="router"):
        moefy.MoefyConfig(router="mlp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split evenly"):
        moefy.moefy(_dense(), moefy.MoefyConfig(**{**SMALL, "n_shared": 30}), **CALIB)
    with pytest.raises(ValueError, match="llama-style"):
        moefy.moefy(_dense("gpt2"), moefy.MoefyConfig(**SMALL), **CALIB)
    with pytest.raises(ValueError, match="already MoEfied"):
        moefy.moefy(_moe(), moefy.MoefyConfig(**SMALL), **CALIB)


def test_load_registers_the_embedded_name(monkeypatch):
    seen, model = {}, _moe()
    monkeypatch.setattr(moefy, "load", lambda name, **kw: seen.update(name=name, **kw) or model)
    assert interp.load(moefy.NAME, top_k=2) is model
    assert seen["name"] == moefy.NAME and seen["top_k"] == 2


@pytest.mark.slow
def test_embedded_moe_loads_from_cache():
    if not (interp.models.cache_dir() / moefy.NAME / "moefy.json").exists():
        pytest.skip(f"build it once with interp.load({moefy.NAME!r}) (minutes on a CPU)")
    model = interp.load(moefy.NAME)
    assert model.cfg.n_layers == 30 and model.cfg.n_experts == 8
    assert model.cfg.moe_layers == tuple(range(30))
    agree = moefy.agreement()
    assert set(agree) >= {1, 2, 4, 6} and agree == moefy.agreement(model)
    assert agree[model.cfg.experts_per_token] >= 0.9
    from interp.chat import encode

    batch = encode(model.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    out = model.generate(batch, max_new_tokens=8, do_sample=False)
    assert "Paris" in model.tokenizer.decode(out[0, batch.input_ids.shape[1] :])

"""interp.moe.steer / ablate_experts on tiny MoE models, and a planted-router ground truth."""

from __future__ import annotations

import functools

import pytest
import torch

import interp
from interp import moe
from interp.families import MOE_FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = ["The quick brown fox jumps.", "Experts route tokens.", "0123 abc"]


@functools.cache
def _model(family: str):
    return interp.tiny(family, seed=0)


@functools.cache
def _batch(family: str):
    return _model(family).tokenize(TEXTS)


def _logits(model, batch):
    with torch.no_grad():
        return model(batch)


# --- steer ----------------------------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_steer_without_edits_and_identity_reselection_are_bit_identical(family):
    model, batch = _model(family), _batch(family)
    ref = _logits(model, batch)
    with moe.steer(model):
        assert torch.equal(_logits(model, batch), ref)
    # A replacement that equals the logits goes through the adapter's
    # re-selection (interp.routing.select_experts): still bit-identical.
    with model.hooks(fwd=[("blocks.*.mlp.hook_router_logits", lambda t, hook: t.clone())]):
        assert torch.equal(_logits(model, batch), ref)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_deactivated_never_selected_and_activated_always_selected(family):
    model, batch = _model(family), _batch(family)
    layers = model.cfg.moe_layers
    base = moe.trace(model, batch, logits=False)
    # Per layer, deactivate the expert the model uses most and activate the one it uses least.
    freq = moe.selection_frequency(base)
    off = [(layer, int(freq[r].argmax())) for r, layer in enumerate(layers)]
    on = [(layer, int(freq[r].argmin())) for r, layer in enumerate(layers)]
    with moe.steer(model, deactivate=off, activate=on):
        steered = moe.trace(model, batch, logits=False)
        out = _logits(model, batch)
    for r in range(len(layers)):
        idx = steered.indices[r].long()
        assert not (idx == off[r][1]).any()
        assert (idx == on[r][1]).any(-1).all()
        assert torch.isfinite(steered.weights[r]).all()
    assert (base.indices[0].long() == off[0][1]).any()  # the edit really mattered
    assert not torch.equal(out, _logits(model, batch))
    assert torch.isfinite(out).all()


def test_steer_only_touches_listed_layers():
    model, batch = _model("qwen2_moe"), _batch("qwen2_moe")
    base = moe.trace(model, batch, logits=False)
    with moe.steer(model, deactivate=[(2, 0), (2, 1)]):
        tr = moe.trace(model, batch, logits=False)
    assert torch.equal(tr.indices[:2], base.indices[:2])  # layers 0 and 1 untouched
    assert sorted(tr.indices[2].unique().tolist()) == [2, 3]


def test_group_limited_family_with_deactivation_keeps_group_semantics():
    model, batch = _model("deepseek_v2"), _batch("deepseek_v2")
    with moe.steer(model, deactivate=[(1, 0)]):
        tr = moe.trace(model, batch, logits=False)
    idx, w = tr.indices[0].long(), tr.weights[0].float()
    assert not (idx == 0).any()
    # Tokens whose best group is {0, 1} keep expert 1 and fill from {2, 3} with weight 0.
    in_a = (idx == 1).any(-1) & ((idx >= 2).any(-1))
    assert in_a.any()
    assert (w[in_a][idx[in_a] >= 2] == 0).all()
    assert (w[in_a][idx[in_a] == 1] > 0).all()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_soft_steering_shifts_selection_frequency(family):
    model, batch = _model(family), _batch(family)
    layer = model.cfg.moe_layers[-1]
    base = moe.selection_frequency(moe.trace(model, batch, logits=False))[-1]
    e = int(base.argmin())
    with moe.steer(model, activate=[(layer, e)], soft=2.0):
        up = moe.selection_frequency(moe.trace(model, batch, logits=False))[-1]
    with moe.steer(model, deactivate=[(layer, e)], soft=2.0):
        down = moe.selection_frequency(moe.trace(model, batch, logits=False))[-1]
    assert up[e] > base[e] >= down[e]


def test_steer_validates_before_registering():
    model = _model("deepseek_v2")
    n_hooks = sum(len(m._forward_hooks) for m in model.model.modules())
    with pytest.raises(ValueError, match="not a MoE layer"):
        with moe.steer(model, deactivate=[(0, 1)]):  # layer 0 is dense
            pass
    with pytest.raises(ValueError, match="out of range"):
        with moe.steer(model, deactivate=[(1, 4)]):
            pass
    with pytest.raises(ValueError, match="cannot activate 3"):
        with moe.steer(model, activate=[(1, 0), (1, 1), (1, 2)]):
            pass
    with pytest.raises(ValueError, match="fewer than top_k"):
        with moe.steer(model, deactivate=[(1, 0), (1, 1), (1, 2)]):
            pass
    with pytest.raises(ValueError, match="both activated and deactivated"):
        with moe.steer(model, deactivate=[(1, 0)], activate=[(1, 0)]):
            pass
    with pytest.raises(TypeError, match="deactivate"):
        with moe.steer(model, deactivate=[1]):
            pass
    assert sum(len(m._forward_hooks) for m in model.model.modules()) == n_hooks


def test_steer_removes_hooks_after_exception():
    model, batch = _model("olmoe"), _batch("olmoe")
    ref = _logits(model, batch)
    with pytest.raises(RuntimeError, match="boom"):
        with moe.steer(model, deactivate=[(0, 1)]):
            raise RuntimeError("boom")
    assert torch.equal(_logits(model, batch), ref)


# --- ablate_experts ---------------------------------------------------------------


def _moe_input_and_out(model, batch, layer):
    """The MoE block's input (captured with a raw torch hook) and its hook_mlp_out."""
    seen = {}
    mlp = model.model.model.layers[layer].mlp
    h = mlp.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach()))
    try:
        cache = interp.capture(
            model, batch, [f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.mlp.hook_expert_*"]
        )
    finally:
        h.remove()
    return seen["x"], cache


def _expert_out(model, layer, expert, x):
    """One expert's output from the fused tensors, computed by hand (HF *Experts.forward)."""
    experts = model.model.model.layers[layer].mlp.experts
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_ablate_expert_matches_manual_computation(family):
    model, batch = _model(family), _batch(family)
    layer = model.cfg.moe_layers[-1]
    name = f"blocks.{layer}.mlp.hook_expert_"
    x, full = _moe_input_and_out(model, batch, layer)
    idx = full[name + "indices"]
    e = int(idx.flatten().mode().values)  # an expert these tokens use (routing is random)
    with moe.ablate_experts(model, [(layer, e)]):
        x_ab, abl = _moe_input_and_out(model, batch, layer)
    assert torch.equal(x, x_ab)
    assert torch.equal(abl[name + "indices"], idx)  # routing untouched
    w_full, w_abl = full[name + "weights"], abl[name + "weights"]
    hit = idx == e
    assert hit.any() and (~hit.all(-1)).any()
    assert (w_abl[hit] == 0).all() and torch.equal(w_abl[~hit], w_full[~hit])
    # Manual: removing expert e subtracts exactly w_e · expert_e(x) on the tokens that used it.
    with torch.no_grad():
        y = _expert_out(model, layer, e, x)
    w_e = (w_full * hit).sum(-1, keepdim=True).to(y.dtype)
    expected = full[f"blocks.{layer}.hook_mlp_out"] - w_e * y
    torch.testing.assert_close(abl[f"blocks.{layer}.hook_mlp_out"], expected, atol=1e-5, rtol=1e-5)
    untouched = ~hit.any(-1)
    torch.testing.assert_close(
        abl[f"blocks.{layer}.hook_mlp_out"][untouched],
        full[f"blocks.{layer}.hook_mlp_out"][untouched],
        atol=1e-6,
        rtol=0,
    )


def test_ablate_scale_and_composition_with_steer():
    model, batch = _model("mixtral"), _batch("mixtral")
    layer, e = 1, 2
    name = f"blocks.{layer}.mlp.hook_expert_"
    full = interp.capture(model, batch, [name + "*"])
    with moe.ablate_experts(model, [(layer, e)], scale=0.5):
        half = interp.capture(model, batch, [name + "*"])
    hit = full[name + "indices"] == e
    torch.testing.assert_close(half[name + "weights"][hit], full[name + "weights"][hit] * 0.5)
    # steer outside, ablate inside: the activated expert is selected and then zeroed.
    with moe.steer(model, activate=[(layer, e)]), moe.ablate_experts(model, [(layer, e)]):
        both = interp.capture(model, batch, [name + "*"])
    forced = both[name + "indices"] == e
    assert forced.any(-1).all() and (both[name + "weights"][forced] == 0).all()


# --- planted router: ground truth for risk difference and steering ----------------

D_STAR, D_BIAS, L_STAR, E_STAR = 0, 1, 1, 2
DIGITS, LETTERS = "0123456789", "abcdefghijklmnopqrstuvwxyz"


@functools.lru_cache(maxsize=1)
def _planted():
    """Tiny Mixtral whose layer-1 router sends every digit token to expert 2, and nothing else.

    Residual dims 0 and 1 carry only the embedding (no attention / expert writes
    them): dim 0 flags digit tokens, dim 1 is a constant. The layer-1 router
    reads dim 0 into expert 2's logit and the constant as a penalty on expert 2
    (a bonus on the others), so expert 2 is selected iff the token is a digit.
    """
    model = interp.tiny("mixtral", seed=0)
    hf, tok = model.model, model.tokenizer
    digits = [tok.convert_tokens_to_ids(c) for c in DIGITS]
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb[:, D_STAR], emb[:, D_BIAS] = 0.0, 0.5
        emb[digits, D_STAR] = 1.0
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight[[D_STAR, D_BIAS]] = 0.0
            layer.mlp.experts.down_proj[:, [D_STAR, D_BIAS], :] = 0.0
        router = hf.model.layers[L_STAR].mlp.gate.weight
        router[:, D_STAR], router[E_STAR, D_STAR] = 0.0, 5.0
        router[:, D_BIAS], router[E_STAR, D_BIAS] = 1.0, -1.0
    return model


def _texts(alphabet, n, gen):
    lengths = torch.randint(8, 13, (n,), generator=gen).tolist()
    return [
        "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (m,), generator=gen).tolist())
        for m in lengths
    ]


def test_planted_router_risk_difference_and_deactivation():
    model = _planted()
    gen = torch.Generator().manual_seed(0)
    digits, letters = (
        model.tokenize(_texts(DIGITS, 12, gen)),
        model.tokenize(_texts(LETTERS, 12, gen)),
    )
    t_digits, t_letters = moe.trace(model, digits), moe.trace(model, letters)

    rd = moe.risk_difference(t_digits, t_letters, n_boot=200, seed=0)
    top = rd.rank("positive")[0]
    assert (top.layer, top.expert) == (L_STAR, E_STAR)
    assert (top.rd, top.low, top.high) == (1.0, 1.0, 1.0)
    assert rd.rank("positive")[1].rd < 0.9

    ref = {"d": _logits(model, digits), "l": _logits(model, letters)}

    def effect(pair):
        """Mean |Δ logits| per real token on digit and letter texts when `pair` is deactivated."""
        out = {}
        with moe.steer(model, deactivate=[pair]):
            for key, batch in (("d", digits), ("l", letters)):
                diff = (_logits(model, batch) - ref[key]).abs().mean(-1)
                out[key] = float(diff[batch.attention_mask.bool()].mean())
        return out["d"], out["l"]

    on_digits, on_letters = effect((L_STAR, E_STAR))
    assert on_digits > 1e-3  # the planted expert does work on its class …
    assert on_letters < 1e-6  # … and nothing elsewhere (it is never selected there)
    # Control: random other experts are not class-specific like that.
    others = [
        (layer, e)
        for layer in model.cfg.moe_layers
        for e in range(4)
        if (layer, e) != (L_STAR, E_STAR)
    ]
    pick = torch.randperm(len(others), generator=gen)[:4].tolist()
    for i in pick:
        d, l_ = effect(others[i])
        assert d - l_ < 0.5 * (on_digits - on_letters), others[i]
        assert d < on_digits or l_ > 1e-6, others[i]

    # Ablating the planted expert (routing untouched) changes digits only, letters bit-identical.
    with moe.ablate_experts(model, [(L_STAR, E_STAR)]):
        assert torch.equal(_logits(model, letters), ref["l"])
        assert not torch.allclose(_logits(model, digits), ref["d"], atol=1e-4)

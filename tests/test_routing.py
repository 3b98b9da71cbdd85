"""interp.routing: per-family top-k selection re-implemented from router logits."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interp.families import MOE_FAMILIES, tiny_hf
from interp.routing import ROUTING_FAMILIES, RoutingRule, edit_logits, select_experts

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _model(family: str, **overrides):
    model, _ = tiny_hf(family, seed=0, **overrides)
    return model


def _v3_router(n_experts=8, n_group=4, topk_group=2, top_k=2, norm=True, scale=2.5, seed=0):
    """A DeepSeek-V3 router built from its config (no full model needed), random bias."""
    from transformers import AutoConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = AutoConfig.for_model(
        "deepseek_v3",
        hidden_size=64,
        num_hidden_layers=3,
        n_routed_experts=n_experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        first_k_dense_replace=1,
        n_shared_experts=1,
    )
    gen = torch.Generator().manual_seed(seed)
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.3)
        router.e_score_correction_bias.copy_(torch.randn(n_experts, generator=gen) * 0.1)
    return cfg, router


def _routers(family: str, *, keep_bias: bool = False, **overrides):
    """A family's rule and routers. DeepSeek-V3's score-correction bias (random in
    ``interp.tiny``) is zeroed unless ``keep_bias``: the rule-level tests below call
    ``select_experts`` without it; the bias path has its own tests."""
    model = _model(family, **overrides)
    rule = RoutingRule.from_config(model.config)
    gates = [model.model.layers[layer].mlp.gate for layer in rule.moe_layers]
    if not keep_bias:
        for gate in gates:
            if getattr(gate, "e_score_correction_bias", None) is not None:
                with torch.no_grad():
                    gate.e_score_correction_bias.zero_()
    return rule, gates


def _inputs(seed: int, scale: float, n: int = 64, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 64, generator=gen) * scale).to(dtype)


# --- from_config ------------------------------------------------------------


def test_from_config_reads_each_family():
    rules = {f: RoutingRule.from_config(_model(f).config) for f in MOE_FAMILIES}
    assert set(MOE_FAMILIES) <= set(ROUTING_FAMILIES)
    for rule in rules.values():
        assert (rule.n_experts, rule.top_k) == (4, 2)
    assert rules["mixtral"].norm_topk_prob and rules["mixtral"].weights_dtype == "float32"
    assert not rules["qwen2_moe"].norm_topk_prob
    assert rules["qwen2_moe"].shared_experts == 1 and rules["qwen3_moe"].shared_experts == 0
    ds = rules["deepseek_v2"]
    assert ds.moe_layers == (1, 2)  # first_k_dense_replace=1
    assert (ds.topk_method, ds.n_group, ds.topk_group) == ("group_limited_greedy", 2, 1)
    assert ds.shared_experts == 1
    assert rules["olmoe"].moe_layers == (0, 1, 2)


def test_from_config_qwen_sparse_step_and_mlp_only_layers():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        "qwen2_moe",
        num_hidden_layers=6,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
    )
    assert RoutingRule.from_config(cfg).moe_layers == (1, 5)


def test_from_config_rejects_dense_model():
    with pytest.raises(ValueError, match="not a supported MoE family"):
        RoutingRule.from_config(_model("llama").config)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=5), "top_k"),
        (dict(topk_method="group_limited_greedy", n_group=3), "divide"),
        (dict(topk_method="group_limited_greedy", n_group=4, topk_group=1, top_k=2), "cannot hold"),
        # The runtime type-checker (tests) or __post_init__ (no checker) rejects it.
        (dict(scoring="tanh"), "scoring"),
        (dict(family="llama"), "unknown MoE family"),
    ],
)
def test_rule_validation(kwargs, match):
    base = dict(family="mixtral", n_experts=4, top_k=2)
    with pytest.raises((ValueError, TypeError), match=match):
        RoutingRule(**{**base, **kwargs})


# --- bit-identity with each family's own router ------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]))
def test_select_experts_reproduces_router(family, seed, scale):
    rule, gates = _routers(family, keep_bias=True)
    x = _inputs(seed, scale)
    with torch.no_grad():
        for gate in gates:
            logits, weights, indices = gate(x)
            # The tuple's first element is the raw pre-selection W_r·h.
            assert torch.equal(logits, torch.nn.functional.linear(x.float(), gate.weight.float()))
            bias = getattr(gate, "e_score_correction_bias", None)
            w, i = select_experts(logits, rule, score_bias=bias)
            assert torch.equal(i, indices)
            assert torch.equal(w, weights)
            assert w.dtype == weights.dtype


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_select_experts_reproduces_router_bf16_and_ties(family):
    rule, gates = _routers(family)
    gate = copy.deepcopy(gates[-1])
    with torch.no_grad():
        gate.weight[1] = gate.weight[0]  # experts 0 and 1 always tie: tie-breaking must match
        for dtype in (torch.float32, torch.bfloat16):
            g = gate.to(dtype)
            logits, weights, indices = g(_inputs(1, 2.0, dtype=dtype))
            w, i = select_experts(logits, rule)
            assert torch.equal(i, indices) and torch.equal(w, weights), dtype


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("qwen2_moe", dict(norm_topk_prob=True)),
        ("olmoe", dict(norm_topk_prob=True)),
        ("deepseek_v2", dict(topk_method="greedy", routed_scaling_factor=16.0)),
        ("deepseek_v2", dict(n_group=4, topk_group=2, routed_scaling_factor=2.0)),
    ],
)
def test_select_experts_reproduces_router_variants(family, overrides):
    rule, gates = _routers(family, **overrides)
    with torch.no_grad():
        logits, weights, indices = gates[0](_inputs(3, 3.0))
    w, i = select_experts(logits, rule)
    assert torch.equal(i, indices) and torch.equal(w, weights)


@given(seed=st.integers(0, 2**31 - 1))
def test_select_experts_reproduces_deepseek_v3_router(seed):
    cfg, router = _v3_router()
    rule = RoutingRule.from_config(cfg)
    assert (rule.scoring, rule.topk_method, rule.moe_layers) == ("sigmoid", "noaux_tc", (1, 2))
    with torch.no_grad():
        logits, weights, indices = router(_inputs(seed, 2.0))
    w, i = select_experts(logits, rule, score_bias=router.e_score_correction_bias)
    assert torch.equal(i, indices) and torch.equal(w, weights)
    # Without the correction bias the selection differs somewhere: the bias matters.
    _, i0 = select_experts(logits, rule)
    assert not torch.equal(i0, indices)


def test_wrong_rule_does_not_reproduce_router():
    """The bit-identity test can fail: a flipped norm_topk_prob is detected."""
    rule, gates = _routers("qwen2_moe")
    with torch.no_grad():
        logits, weights, _ = gates[0](_inputs(0, 1.0))
    wrong = RoutingRule(**{**rule.__dict__, "norm_topk_prob": True})
    assert not torch.equal(select_experts(logits, wrong)[0], weights)


def test_select_experts_keeps_leading_dims():
    rule = RoutingRule(family="olmoe", n_experts=4, top_k=2)
    logits = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    w, i = select_experts(logits, rule)
    w2, i2 = select_experts(logits.reshape(15, 4), rule)
    assert w.shape == i.shape == (3, 5, 2)
    assert torch.equal(w.reshape(15, 2), w2) and torch.equal(i.reshape(15, 2), i2)
    with pytest.raises(ValueError, match="expects 4"):
        select_experts(torch.randn(2, 5), rule)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_model_forward_unchanged_when_router_reselects(family):
    """Patching every router to re-select from its own logits leaves the model bit-identical."""
    model = _model(family)
    rule = RoutingRule.from_config(model.config)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        handles = []
        for layer in rule.moe_layers:
            gate = model.model.layers[layer].mlp.gate

            def hook(_mod, _args, out):
                return (out[0], *select_experts(out[0], rule))

            handles.append(gate.register_forward_hook(hook))
        try:
            got = model(ids).logits
        finally:
            for h in handles:
                h.remove()
    assert torch.equal(ref, got)


# --- edit_logits + sentinel-aware selection ----------------------------------


def _rule_for(family: str) -> RoutingRule:
    if family == "deepseek_v3":
        return RoutingRule.from_config(_v3_router()[0])
    return RoutingRule.from_config(_model(family).config)


ALL_RULE_FAMILIES = (*MOE_FAMILIES, "deepseek_v3")


def test_edit_logits_empty_is_identity():
    logits = torch.randn(4, 8)
    assert edit_logits(logits) is logits
    assert edit_logits(logits, soft_scale=3.0) is logits


def test_edit_logits_validates():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="both activated and deactivated"):
        edit_logits(logits, deactivate=[1], activate=[1])
    with pytest.raises(ValueError, match="out of range"):
        edit_logits(logits, deactivate=[8])
    with pytest.raises(ValueError, match="soft_scale"):
        edit_logits(logits, activate=[0], soft_scale=-1.0)


@pytest.mark.parametrize("family", ALL_RULE_FAMILIES)
@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), off=st.integers(0, 7), on=st.integers(0, 7))
def test_hard_edit_never_selects_deactivated_always_selects_activated(family, seed, off, on):
    rule = _rule_for(family)
    off, on = off % rule.n_experts, on % rule.n_experts
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(40, rule.n_experts, generator=gen) * 4
    if on == off:
        on = (off + 1) % rule.n_experts
    w, i = select_experts(edit_logits(logits, deactivate=[off], activate=[on]), rule)
    assert not (i == off).any()
    assert (i == on).any(dim=-1).all()
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert (i.sort(-1).values.diff(dim=-1) != 0).all()  # k distinct experts per token
    if rule.norm_topk_prob:
        total = w.float().sum(-1) / rule.routed_scaling_factor
        torch.testing.assert_close(total, torch.ones_like(total))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_activation_weight_is_steermoe_max_logit(family):
    """A forced expert weighs what it would with its logit raised to the token's max (SteerMoE)."""
    rule = _rule_for(family)
    logits = torch.randn(30, rule.n_experts, generator=torch.Generator().manual_seed(0)) * 3
    e = 3
    w, i = select_experts(edit_logits(logits, activate=[e]), rule)
    raised = logits.clone()
    raised[:, e] = torch.cat([logits[:, :e], logits[:, e + 1 :]], dim=1).amax(-1)
    w_ref, i_ref = select_experts(raised, rule)
    dense = torch.zeros(30, rule.n_experts).scatter(1, i, w.float())
    dense_ref = torch.zeros(30, rule.n_experts).scatter(1, i_ref, w_ref.float())
    torch.testing.assert_close(dense, dense_ref)


def test_deactivation_renormalises_softmax_over_remaining_experts():
    rule = RoutingRule(family="olmoe", n_experts=4, top_k=2)  # no renormalisation after top-k
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    w, i = select_experts(edit_logits(logits, deactivate=[0]), rule)
    probs = torch.softmax(logits[:, 1:], dim=-1)
    assert i.tolist() == [[1, 2]]
    torch.testing.assert_close(w, probs[:, :2])


def test_edits_on_some_rows_leave_other_rows_bit_identical():
    rule, gates = _routers("deepseek_v2")
    with torch.no_grad():
        logits, weights, indices = gates[0](_inputs(5, 3.0))
    edited = logits.clone()
    edited[::3] = edit_logits(logits[::3], deactivate=[0])
    w, i = select_experts(edited, rule)
    keep = torch.ones(len(logits), dtype=torch.bool)
    keep[::3] = False
    assert torch.equal(w[keep], weights[keep]) and torch.equal(i[keep], indices[keep])
    assert not (i[~keep] == 0).any()


def test_group_limited_fill_has_zero_weight():
    """DeepSeek-V2 tiny: groups {0,1},{2,3}, topk_group=1, k=2. Dropping 0 leaves group A one expert."""
    rule = _rule_for("deepseek_v2")
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    w, i = select_experts(logits, rule)
    assert sorted(i[0].tolist()) == [0, 1]
    w, i = select_experts(edit_logits(logits, deactivate=[0]), rule)
    pairs = dict(zip(i[0].tolist(), w[0].tolist(), strict=True))
    assert 0 not in pairs and 1 in pairs and pairs[1] > 0
    (fill,) = set(pairs) - {1}
    assert fill in (2, 3) and pairs[fill] == 0.0


def test_activation_forces_group_of_activated_expert():
    rule = _rule_for("deepseek_v2")
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    w, i = select_experts(edit_logits(logits, activate=[3]), rule)
    pairs = dict(zip(i[0].tolist(), w[0].tolist(), strict=True))
    assert set(pairs) == {2, 3} and all(v > 0 for v in pairs.values())


def test_infeasible_edits_raise():
    rule = RoutingRule(family="mixtral", n_experts=4, top_k=2)
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match="cannot activate 3"):
        select_experts(edit_logits(logits, activate=[0, 1, 2]), rule)
    with pytest.raises(ValueError, match="fewer than top_k"):
        select_experts(edit_logits(logits, deactivate=[0, 1, 2]), rule)


@pytest.mark.parametrize("family", ALL_RULE_FAMILIES)
def test_soft_edit_is_finite_and_monotone(family):
    rule = _rule_for(family)
    logits = torch.randn(200, rule.n_experts, generator=torch.Generator().manual_seed(0))
    base = (select_experts(logits, rule)[1] == 1).any(-1).float().mean()
    soft = edit_logits(logits, activate=[1], deactivate=[0], soft_scale=1.0)
    assert torch.isfinite(soft).all()
    std = logits.std(-1, correction=0)
    torch.testing.assert_close(soft[:, 1] - logits[:, 1], std)
    torch.testing.assert_close(logits[:, 0] - soft[:, 0], std)
    torch.testing.assert_close(soft[:, 2:], logits[:, 2:], rtol=0, atol=0)
    w, i = select_experts(soft, rule)
    assert torch.isfinite(w).all()
    if family != "deepseek_v2":  # group limits can veto a boosted expert
        assert (i == 1).any(-1).float().mean() > base
    w, i = select_experts(edit_logits(logits, deactivate=[0], soft_scale=50.0), rule)
    if family == "deepseek_v2":
        # Soft edits follow the family's rule: when expert 1 wins group {0, 1},
        # expert 0 still fills the group's second slot, with ~zero weight.
        assert (w[i == 0] < 1e-3).all()
    else:
        assert not (i == 0).any()

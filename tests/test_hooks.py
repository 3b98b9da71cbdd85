"""Hook core: names, globs, errors, replacement checks, leak-freedom, every family."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import interp
from interp.families import FAMILIES, MOE_FAMILIES
from interp.hooks import HookNameError, HookReplacementError

CANONICAL = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]


def n_torch_hooks(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


@pytest.fixture(scope="module")
def llama():
    return interp.tiny("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exposes_canonical_names_and_identity_hooks_change_nothing(family, ids):
    model = interp.tiny(family)
    for layer in range(model.cfg.n_layers):
        for kind in CANONICAL:
            assert f"blocks.{layer}.{kind}" in model.hook_names
    assert "hook_embed" in model.hook_names and "ln_final.hook_normalized" in model.hook_names
    if family in MOE_FAMILIES:
        assert model.cfg.n_experts == 4 and model.cfg.moe_layers
        assert f"blocks.{model.cfg.moe_layers[0]}.mlp.hook_router_logits" in model.hook_names
    with torch.no_grad():
        clean = model(ids)
        seen = []
        with model.hooks(fwd=[("*", lambda t, hook: seen.append(hook.name))]):
            hooked = model(ids)
    assert torch.equal(clean, hooked)
    assert set(seen) == set(model.hook_names)  # every name really fires


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_stream_identities(family, ids):
    """resid_post = resid_mid + mlp_out = resid_pre + attn_out + mlp_out, per family."""
    model = interp.tiny(family)
    cache = interp.capture(model, ids, ["blocks.*.hook_*"])
    for layer in range(model.cfg.n_layers):
        b = f"blocks.{layer}."
        pre, post = cache[b + "hook_resid_pre"], cache[b + "hook_resid_post"]
        attn, mlp = cache[b + "hook_attn_out"], cache[b + "hook_mlp_out"]
        torch.testing.assert_close(post, pre + attn + mlp, atol=1e-5, rtol=1e-5)
        if b + "hook_resid_mid" in cache:
            torch.testing.assert_close(cache[b + "hook_resid_mid"], pre + attn, atol=1e-6, rtol=0)
        if layer + 1 < model.cfg.n_layers:
            assert torch.equal(post, cache[f"blocks.{layer + 1}.hook_resid_pre"])


def test_gpt_neox_parallel_residual_has_no_resid_mid():
    model = interp.tiny("gpt_neox")
    with pytest.raises(HookNameError, match=r"blocks\.0\.hook_resid_pre"):
        with model.hooks(fwd=[("blocks.0.hook_resid_mid", lambda t, h: None)]):
            pass


def test_unknown_name_raises_with_closest_names(llama):
    with pytest.raises(HookNameError) as err:
        with llama.hooks(fwd=[("blocks.1.hook_resid_pots", lambda t, h: None)]):
            pass
    assert "blocks.1.hook_resid_post" in str(err.value)
    with pytest.raises(HookNameError, match="unknown hook name"):
        interp.capture(llama, "hi", "blocks.*.hook_nothing")


def test_bad_name_registers_nothing(llama):
    before = n_torch_hooks(llama.model)
    with pytest.raises(HookNameError):
        with llama.hooks(fwd=[("blocks.0.hook_resid_post", lambda t, h: None), ("nope", print)]):
            pass
    assert n_torch_hooks(llama.model) == before


def test_replacement_of_wrong_shape_or_dtype_names_the_hook(llama, ids):
    with pytest.raises(HookReplacementError, match=r"blocks\.1\.hook_resid_post"):
        llama.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", lambda t, h: t[:, :2])])
    with pytest.raises(HookReplacementError, match="float64"):
        llama.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_attn_out", lambda t, h: t.double())])


@pytest.mark.parametrize(
    "kind", ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"]
)
def test_replacement_propagates(llama, ids, kind):
    """Zeroing the residual at a point changes the logits exactly as a manual rerun says."""
    name = f"blocks.1.{kind}"
    doubled = llama.run_with_hooks(ids, fwd_hooks=[(name, lambda t, h: t * 2)])
    seen = {}
    with llama.hooks(
        fwd=[(name, lambda t, h: t * 2), (name, lambda t, h: seen.setdefault("v", t))]
    ):
        llama(ids)
    clean = interp.capture(llama, ids, name)[name]
    # Later hooks see the replacement, so the write really happened.
    torch.testing.assert_close(seen["v"], clean * 2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(doubled, llama(ids))


def test_resid_mid_replacement_reaches_the_residual(llama, ids):
    target = torch.zeros(2, 9, llama.cfg.d_model)
    cache = interp.capture(llama, ids, ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"])
    with llama.hooks(fwd=[("blocks.1.hook_resid_mid", lambda t, h: target)]):
        after = interp.capture(llama, ids, ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"])
    # resid_post = new mid + mlp(new mid): the whole residual was replaced, not just the MLP input.
    torch.testing.assert_close(
        after["blocks.1.hook_resid_post"],
        target + after["blocks.1.hook_mlp_out"],
        atol=1e-5,
        rtol=0,
    )
    assert not torch.allclose(after["blocks.1.hook_mlp_out"], cache["blocks.1.hook_mlp_out"])


HOOK_NAMES = st.sampled_from(
    [f"blocks.{i}.{k}" for i in range(3) for k in [*CANONICAL, "hook_resid_mid"]]
    + ["hook_embed", "ln_final.hook_normalized", "blocks.*.hook_resid_post"]
)


@given(
    fwd=st.lists(HOOK_NAMES, max_size=6),
    bwd=st.lists(HOOK_NAMES, max_size=4),
    fail_at=st.integers(0, 3),
)
def test_no_hook_leaks_after_exceptions_and_nesting(llama, ids, fwd, bwd, fail_at):
    before = n_torch_hooks(llama.model)

    def boom(t, h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with llama.hooks(
            fwd=[(n, lambda t, h: None) for n in fwd], bwd=[(n, lambda g, h: None) for n in bwd]
        ):
            inner = [(n, boom) for n in fwd[:1]] if fail_at == 0 and fwd else []
            with llama.hooks(fwd=inner):
                with llama.hooks(fwd=[(n, lambda t, h: None) for n in fwd[fail_at:]]):
                    if fail_at == 0 and fwd:
                        llama(ids)
                    raise RuntimeError("boom")
    assert n_torch_hooks(llama.model) == before


def test_nested_contexts_remove_exactly_their_own_handles(llama, ids):
    calls = []
    with llama.hooks(fwd=[("blocks.0.hook_resid_post", lambda t, h: calls.append("outer"))]):
        with llama.hooks(fwd=[("blocks.0.hook_resid_post", lambda t, h: calls.append("inner"))]):
            llama(ids)
        llama(ids)
    llama(ids)
    assert calls == ["outer", "inner", "outer"]


def test_backward_hooks_fire_with_frozen_weights(ids):
    model = interp.tiny("qwen2")
    for p in model.model.parameters():
        p.requires_grad_(False)
    grads = {}
    with model.hooks(bwd=[("blocks.*.hook_resid_post", lambda g, h: grads.setdefault(h.name, g))]):
        model(ids).sum().backward()
    assert sorted(grads) == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert all(p.grad is None for p in model.model.parameters())


def test_hook_point_layer_and_tl_style_hook_functions(llama, ids):
    layers = []

    def tl_style(activation, hook):  # exactly TransformerLens's signature
        layers.append(hook.layer())
        return activation

    llama.run_with_hooks(ids, fwd_hooks=[("blocks.*.hook_resid_pre", tl_style)])
    assert layers == [0, 1, 2]


def test_hook_specs_must_be_pairs(llama):
    with pytest.raises(TypeError, match=r"\(name, fn\)"):
        with llama.hooks(fwd=["blocks.0.hook_resid_post"]):
            pass


def test_hook_point_layer_reads_canonical_names_and_module_paths():
    from interp.hooks import HookPoint

    assert HookPoint("blocks.3.attn.hook_z").layer() == 3
    assert HookPoint("model.layers.12.mlp.down_proj.hook_in").layer() == 12
    assert HookPoint("transformer.h.2.attn.hook_out").layer() == 2
    with pytest.raises(ValueError, match="not inside a block"):
        HookPoint("model.norm.hook_out").layer()
    seen = []
    model = interp.tiny("llama")
    with model.hooks(fwd=[("model.layers.1.mlp.hook_out", lambda t, h: seen.append(h.layer()))]):
        model(torch.zeros(1, 3, dtype=torch.long))
    assert seen == [1]

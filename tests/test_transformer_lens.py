"""Agreement with TransformerLens on identical weights, and the TL adapter itself."""

from __future__ import annotations

import copy

import pytest
import torch

import interp
from interp.families import tiny_hf
from interp.hooks import HookNameError

KINDS = ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"]


def bridge_of(hf_model, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    # The bridge rewires the HF modules in place, so it gets its own copy.
    return TransformerBridge.boot_transformers(
        "interp-test", hf_model=copy.deepcopy(hf_model), tokenizer=tokenizer
    )


def check_agreement(hf, bridged, ids):
    names = [f"blocks.*.{k}" for k in KINDS]
    ours = interp.capture(hf, ids, names)
    theirs = interp.capture(bridged, ids, names)
    assert set(ours) <= set(theirs)
    for name in ours:
        diff = (ours[name] - theirs[name]).abs().max().item()
        assert diff <= 1e-4, f"{name}: max abs diff {diff}"

    def tl_hook(resid, hook):  # a hook written for TransformerLens
        return resid * 0.5 + 1.0

    hooks = [("blocks.1.hook_resid_post", tl_hook), ("blocks.0.hook_attn_out", tl_hook)]
    a = hf.run_with_hooks(ids, fwd_hooks=hooks)
    b = bridged.run_with_hooks(ids, fwd_hooks=hooks)
    assert (a - b).abs().max().item() <= 1e-4
    assert (a - hf(ids)).abs().max().item() > 1e-2  # the hook really did something


def test_hf_adapter_agrees_with_transformer_bridge_on_tiny_llama():
    model, tok = tiny_hf("llama", seed=0)
    hf = interp.load(model, tokenizer=tok)
    bridged = interp.load(bridge_of(model, tok))
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    check_agreement(hf, bridged, ids)


@pytest.mark.slow
def test_hf_adapter_agrees_with_transformer_bridge_on_the_embedded_model(embedded):
    # The bridge computes attention eagerly; with HF's default SDPA kernel the two differ
    # by float rounding only (max 8e-4 on activations of norm ~2.5e3, i.e. 3e-7 relative),
    # so the comparison is made on the same attention implementation.
    model = interp.load("smollm2-135m-instruct", attn_implementation="eager")
    bridged = interp.load(bridge_of(model.model, model.tokenizer))
    ids = model.to_tokens(["The quick brown fox jumps over the lazy dog."])
    check_agreement(model, bridged, ids)


def test_bridge_unknown_names_raise_instead_of_silently_skipping():
    model, tok = tiny_hf("llama", seed=0)
    bridged = interp.load(bridge_of(model, tok))
    with pytest.raises(HookNameError, match=r"closest|Closest"):
        interp.capture(bridged, torch.zeros(1, 3, dtype=torch.long), "blocks.0.hook_resid_pots")


def hooked_transformer_classes():
    """``(HookedTransformer, HookedTransformerConfig)``; the test skips on TransformerLens 4,
    which removed ``HookedTransformer``."""
    module = pytest.importorskip(
        "transformer_lens.HookedTransformer", reason="TransformerLens 4 removed HookedTransformer"
    )
    from transformer_lens import HookedTransformerConfig

    return module.HookedTransformer, HookedTransformerConfig


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
def test_hooked_transformer_adapter_captures_and_removes_hooks():
    HookedTransformer, HookedTransformerConfig = hooked_transformer_classes()
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=50, act_fn="gelu", seed=0
    )
    ht = HookedTransformer(cfg)
    model = interp.load(ht)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    _, reference = ht.run_with_cache(ids)
    cache = interp.capture(model, ids, "blocks.*.hook_resid_post", positions=-1)
    for name, value in cache.items():
        torch.testing.assert_close(value, reference[name][:, -1])
    grads = interp.capture_grads(
        model, ids, lambda logits, b: logits[:, -1, 0], "blocks.*.hook_resid_pre"
    )
    assert grads.grads["blocks.0.hook_resid_pre"].abs().sum() > 0
    with pytest.raises(RuntimeError):
        with model.hooks(fwd=[("blocks.0.hook_resid_post", lambda t, h: None)]):
            raise RuntimeError
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in ht.hook_dict.values())

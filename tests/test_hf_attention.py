"""Attention internals on the HF backend: TransformerBridge's names, shapes and meaning.

Every family is compared with TransformerBridge (compatibility mode, no weight
processing) on identical weights: captures, edits, gradients. Where the Bridge
reports nothing (GPT-NeoX's rotary hooks) or lays tensors out differently
(DeepSeek MLA), a hand-written reference or the documented layout is checked.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import interp
from interp.adapters.hf import HFHookedModel
from interp.adapters.hf_attention import IMPLEMENTATION
from interp.families import FAMILIES, tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z"]
TOL = 1e-4


def n_torch_hooks(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


def attn_names(model, layer: int | None = None) -> list[str]:
    return [
        n
        for n in model.hook_names
        if ".attn.hook_" in n and (layer is None or n.startswith(f"blocks.{layer}."))
    ]


_PAIRS: dict[str, tuple] = {}


def pair(family: str):
    """(HF adapter, TransformerBridge, raw HF model) on identical weights, built once."""
    if family not in _PAIRS:
        from transformer_lens.model_bridge import TransformerBridge

        model, tok = tiny_hf(family, seed=0)
        if family in ("gpt2", "gpt_neox"):
            # tiny configs share num_key_value_heads=2, which GPT-2/NeoX ignore but the
            # Bridge would read as a GQA head count.
            del model.config.num_key_value_heads
        model.config.architectures = [type(model).__name__]  # the Bridge dispatches on it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                "interp-test", hf_model=copy.deepcopy(model), tokenizer=tok
            )
            bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
        _PAIRS[family] = (HFHookedModel(model, tok), bridge, model)
    return _PAIRS[family]


IDS = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))


def as_ours(family: str, name: str, theirs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The Bridge's tensor in our layout (documented differences: DeepSeek MLA only)."""
    if family.startswith("deepseek") and theirs.shape != like.shape:
        if name.endswith(("hook_q", "hook_k", "hook_v")):
            return theirs.transpose(1, 2)  # the Bridge emits MLA's q/k/v as [b, head, pos, d]
        if name.endswith("hook_z"):  # ... and splits z with the q/k head size
            return theirs.reshape(like.shape)
    return theirs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "masked (-inf) entries differ"
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0


def bridge_logits(bridge, ids, fwd=()):
    with torch.no_grad():
        return bridge.run_with_hooks(ids, fwd_hooks=list(fwd), return_type="logits")


# -- names, shapes, values -------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_captures_match_the_bridge(family):
    hf, bridge, _ = pair(family)
    names = attn_names(hf)
    expected = {f"hook_{k}" for k in KINDS} - (
        {"hook_rot_q", "hook_rot_k"} if family == "gpt2" else set()
    )
    for layer in range(hf.cfg.n_layers):
        assert {n.split(".")[-1] for n in attn_names(hf, layer)} == expected
    with torch.no_grad():
        ours = interp.capture(hf, IDS, names)
        _, theirs = bridge.run_with_cache(IDS, names_filter=lambda n: n in names)
    compared = 0
    for name in names:
        if family == "gpt_neox" and ".hook_rot_" in name:
            continue  # declared by the Bridge, never fired; see test_gpt_neox_rotary_hooks
        theirs_t = as_ours(family, name, theirs[name], ours[name])
        assert ours[name].shape == theirs_t.shape, name
        assert max_diff(ours[name], theirs_t) <= TOL, name
        compared += 1
    assert compared >= 6 * hf.cfg.n_layers
    # GQA: k/v carry the KV-head count, as in the Bridge
    if family in ("llama", "qwen3", "gemma2"):
        assert ours["blocks.0.attn.hook_k"].shape[2] == 2
        assert ours["blocks.0.attn.hook_q"].shape[2] == 4


def test_gpt_neox_rotary_hooks_against_a_reference():
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    hf, _, model = pair("gpt_neox")
    cache = interp.capture(hf, IDS, "blocks.*.attn.hook_*")
    with torch.no_grad():
        pos = torch.arange(IDS.shape[1])[None]
        cos, sin = model.gpt_neox.rotary_emb(cache["blocks.0.attn.hook_q"], pos)
    for layer in range(hf.cfg.n_layers):
        b = f"blocks.{layer}.attn."
        q, k = cache[b + "hook_q"].transpose(1, 2), cache[b + "hook_k"].transpose(1, 2)
        rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
        assert rotary_ndims(model) < q.shape[-1]  # partial rotary really is exercised
        assert max_diff(cache[b + "hook_rot_q"], rq.transpose(1, 2)) <= 1e-6
        assert max_diff(cache[b + "hook_rot_k"], rk.transpose(1, 2)) <= 1e-6


def rotary_ndims(model) -> int:
    return model.gpt_neox.rotary_emb.inv_freq.numel() * 2


def test_llama_against_a_naive_reference():
    """Eager GQA attention written out from the weights, for layer 1 of tiny llama."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf, _, model = pair("llama")
    cache = interp.capture(hf, IDS, ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_*"])
    layer = model.model.layers[1]
    att = layer.self_attn
    with torch.no_grad():
        x = layer.input_layernorm(cache["blocks.1.hook_resid_pre"])
        b, s, _ = x.shape
        q = (x @ att.q_proj.weight.T).view(b, s, 4, 16)
        k = (x @ att.k_proj.weight.T).view(b, s, 2, 16)
        v = (x @ att.v_proj.weight.T).view(b, s, 2, 16)
        cos, sin = model.model.rotary_emb(x, torch.arange(s)[None])
        rq, rk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        kk, vv = rk.repeat_interleave(2, dim=1), v.transpose(1, 2).repeat_interleave(2, dim=1)
        scores = rq @ kk.transpose(-1, -2) / 4.0
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        pattern = scores.softmax(-1)
        z = (pattern @ vv).transpose(1, 2)
        attn_out = z.reshape(b, s, 64) @ att.o_proj.weight.T
    ref = {
        "q": q,
        "k": k,
        "v": v,
        "rot_q": rq.transpose(1, 2),
        "rot_k": rk.transpose(1, 2),
        "attn_scores": scores,
        "pattern": pattern,
        "z": z,
    }
    for kind, value in ref.items():
        assert max_diff(cache[f"blocks.1.attn.hook_{kind}"], value) <= 1e-5, kind
    out = interp.capture(hf, IDS, "blocks.1.hook_attn_out")["blocks.1.hook_attn_out"]
    assert (out - attn_out).abs().max().item() <= 1e-5


# -- edits -----------------------------------------------------------------------------------
def zero_head(t, hook):
    t = t.clone()
    t[:, :, 1] = 0.0
    return t


def reweigh_pattern(t, hook):
    g = torch.Generator().manual_seed(1)
    w = torch.rand(t.shape, generator=g) + 0.1
    new = t * w
    return new / new.sum(-1, keepdim=True)


def change_v(t, hook):
    return t * 1.5 + 0.25


EDITS = {"z": zero_head, "pattern": reweigh_pattern, "v": change_v}


@pytest.mark.parametrize("family", FAMILIES)
def test_edits_match_the_bridge(family):
    hf, bridge, _ = pair(family)
    with torch.no_grad():
        clean = hf(IDS)
        for kind, fn in EDITS.items():
            hooks = [(f"blocks.{layer}.attn.hook_{kind}", fn) for layer in (0, 1)]
            ours = hf.run_with_hooks(IDS, fwd_hooks=hooks)
            if family.startswith("deepseek") and kind in ("z", "v"):
                theirs = bridge_logits(bridge, IDS, [(n, mla_bridge_hook(fn)) for n, _ in hooks])
            else:
                theirs = bridge_logits(bridge, IDS, hooks)
            assert (ours - theirs).abs().max().item() <= TOL, kind
            assert (ours - clean).abs().max().item() > 1e-3, f"{kind} edit had no effect"


def mla_bridge_hook(fn):
    """Run ``fn`` on the Bridge's MLA tensor in our layout ([b, pos, head, d])."""

    def hook(t, hook):
        if hook.name.endswith("hook_v"):
            return fn(t.transpose(1, 2), hook).transpose(1, 2)
        b, s = t.shape[:2]
        return fn(t.reshape(b, s, 4, -1), hook).reshape(t.shape)  # hook_z, split by v_head_dim

    return hook


def test_in_place_edits_take_effect():
    hf, _, _ = pair("llama")

    def zero_in_place(t, hook):
        t[:, :, 0] = 0.0

    with torch.no_grad():
        clean = hf(IDS)
        for kind in ("q", "k", "v", "rot_q", "rot_k", "z"):
            edited = hf.run_with_hooks(
                IDS, fwd_hooks=[(f"blocks.0.attn.hook_{kind}", zero_in_place)]
            )
            assert (edited - clean).abs().max().item() > 1e-3, kind


def test_scores_edit_reaches_the_softmax():
    hf, bridge, _ = pair("qwen3")

    def block_first_key(t, hook):
        t = t.clone()
        t[..., 1:, 0] = float("-inf")
        return t

    hooks = [("blocks.0.attn.hook_attn_scores", block_first_key)]
    with torch.no_grad():
        ours = hf.run_with_hooks(IDS, fwd_hooks=hooks)
        pattern = interp.capture(hf, IDS, "blocks.0.attn.hook_pattern")
        assert pattern["blocks.0.attn.hook_pattern"][..., 1:, 0].abs().max() > 0
        seen = {}
        with hf.hooks(fwd=[*hooks, ("blocks.0.attn.hook_pattern", lambda t, h: seen.update(p=t))]):
            hf(IDS)
        assert seen["p"][..., 1:, 0].abs().max().item() == 0.0
    assert (ours - bridge_logits(bridge, IDS, hooks)).abs().max().item() <= TOL
    assert (ours - hf(IDS)).abs().max().item() > 1e-3


# -- gradients ------------------------------------------------------------------------------
def _loss(logits, batch=None):
    return logits[:, -1].logsumexp(-1).sum()


def leaf_grad(model, name, ids):
    """d loss / d activation by autograd through the Bridge: the activation swapped for a leaf."""
    leaf = {}

    def swap(t, hook):
        leaf["t"] = t.detach().clone().requires_grad_(True)
        return leaf["t"]

    logits = model.run_with_hooks(ids, fwd_hooks=[(name, swap)], return_type="logits")
    (grad,) = torch.autograd.grad(_loss(logits), leaf["t"])
    return grad


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox", "deepseek_v3"])
def test_capture_grads_match_autograd_through_the_bridge(family):
    hf, bridge, _ = pair(family)
    names = [n for n in attn_names(hf, 1) if not (family == "gpt_neox" and ".hook_rot_" in n)]
    grads = interp.capture_grads(hf, IDS, _loss, names).grads
    for name in names:
        ref = as_ours(family, name, leaf_grad(bridge, name, IDS), grads[name])
        assert grads[name].shape == ref.shape, name
        assert (grads[name] - ref).abs().max().item() <= TOL, name
        assert grads[name].abs().max().item() > 0, name
    assert all(p.grad is None for p in hf.model.parameters())


# -- switching the attention implementation on and off -------------------------------------------
def test_implementation_and_hooks_are_restored_also_after_an_exception():
    model, tok = tiny_hf("llama")
    model.set_attn_implementation("sdpa")
    hf = HFHookedModel(model, tok)
    before = n_torch_hooks(model)
    seen = []

    def record(t, hook):
        seen.append(model.config._attn_implementation)

    with hf.hooks(fwd=[("blocks.0.attn.hook_pattern", record)]):
        with hf.hooks(fwd=[("blocks.1.attn.hook_z", record), ("blocks.1.attn.hook_q", record)]):
            hf(IDS)
        assert model.config._attn_implementation == IMPLEMENTATION  # the outer hook still needs it
        hf(IDS)
    assert seen == [IMPLEMENTATION] * 4
    assert model.config._attn_implementation == "sdpa"
    assert n_torch_hooks(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with hf.hooks(fwd=[("blocks.*.attn.hook_*", record)]):
            hf(IDS)
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert n_torch_hooks(model) == before
    with pytest.raises(ValueError, match="in hook"):  # an exception inside a hook
        with hf.hooks(fwd=[("blocks.0.attn.hook_attn_scores", raising)]):
            hf(IDS)
    assert model.config._attn_implementation == "sdpa"
    assert n_torch_hooks(model) == before
    # sdpa and the hooked implementation agree
    with torch.no_grad():
        sdpa = hf(IDS)
        hooked = hf.run_with_hooks(IDS, fwd_hooks=[("blocks.*.attn.hook_pattern", record)])
    assert (sdpa - hooked).abs().max().item() <= 1e-5


def raising(t, hook):
    raise ValueError("in hook")


def test_residual_capture_is_unchanged_and_never_switches():
    hf, _, model = pair("llama")
    seen = []

    def record(t, hook):
        seen.append(model.config._attn_implementation)

    with torch.no_grad():
        hidden = model(IDS, output_hidden_states=True).hidden_states
        with hf.hooks(fwd=[("blocks.*.hook_resid_pre", record)]):
            cache = interp.capture(hf, IDS, "blocks.*.hook_resid_pre")
            hf(IDS)
        both = interp.capture(hf, IDS, ["blocks.*.hook_resid_pre", "blocks.*.attn.hook_pattern"])
    assert set(seen) == {"eager"}
    for layer in range(hf.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        assert torch.equal(cache[name], hidden[layer])
        assert torch.equal(both[name], hidden[layer])  # attention hooks change no value


def test_left_padding_masks_with_minus_inf_and_matches_the_bridge_on_real_rows():
    hf, bridge, _ = pair("mistral")
    ids = IDS.clone()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    names = ["blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z"]
    with torch.no_grad():
        ours = interp.capture(hf, {"input_ids": ids, "attention_mask": mask}, names)
        _, theirs = bridge.run_with_cache(
            ids, attention_mask=mask, names_filter=lambda n: n in names
        )
    scores = ours[names[0]]
    assert torch.isneginf(scores[1, :, 4, :3]).all() and torch.isneginf(scores[0, :, 2, 3:]).all()
    real = mask.bool()  # compare query rows of real tokens (pad rows: HF keeps a uniform row)
    for name in names:
        a, b = ours[name], theirs[name]
        if a.shape[1] == 4 and a.shape[2] == a.shape[3]:  # [b, head, q, k]
            a, b = a.transpose(1, 2), b.transpose(1, 2)
        assert max_diff(a[real], b[real]) <= TOL, name


def test_generate_with_an_attention_hook():
    hf, _, model = pair("llama")
    prompt = IDS[:1, :4]
    kw = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        plain = hf.generate(prompt, **kw)
        with hf.hooks(fwd=[("blocks.*.attn.hook_pattern", lambda t, h: None)]):
            same = hf.generate(prompt, **kw)
        with hf.hooks(fwd=[("blocks.*.attn.hook_z", lambda t, h: t * 0)]):
            steered = hf.generate(prompt, **kw)
    assert torch.equal(plain, same)
    assert not torch.equal(plain, steered)
    assert model.config._attn_implementation == "eager"


def test_bf16_capture_and_edit():
    model, tok = tiny_hf("qwen2")
    model = model.to(torch.bfloat16)
    hf = HFHookedModel(model, tok)
    with torch.no_grad():
        clean = hf(IDS)
        cache = interp.capture(hf, IDS, "blocks.0.attn.hook_*")
        same = hf.run_with_hooks(IDS, fwd_hooks=[("blocks.*.attn.hook_*", lambda t, h: None)])
        edited = hf.run_with_hooks(IDS, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    assert all(v.dtype == torch.bfloat16 for v in cache.values())
    rows = cache["blocks.0.attn.hook_pattern"].float().sum(-1)
    assert (rows - 1).abs().max().item() < 1e-2
    assert torch.equal(clean, same)
    assert (edited.float() - clean.float()).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_sliding_window_shorter_than_the_sequence_matches_the_bridge(family):
    from transformer_lens.model_bridge import TransformerBridge

    model, tok = tiny_hf(family, sliding_window=4)
    model.config.architectures = [type(model).__name__]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            "t", hf_model=copy.deepcopy(model), tokenizer=tok
        )
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    hf = HFHookedModel(model, tok)
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    names = attn_names(hf, 0)
    with torch.no_grad():
        ours = interp.capture(hf, ids, names)
        _, theirs = bridge.run_with_cache(ids, names_filter=lambda n: n in names)
        hooks = [("blocks.0.attn.hook_z", zero_head)]
        edited = hf.run_with_hooks(ids, fwd_hooks=hooks)
        assert (edited - bridge_logits(bridge, ids, hooks)).abs().max().item() <= TOL
    causal = 2 * 4 * 45  # masked entries of a causal 10x10 pattern, 2 rows x 4 heads
    assert torch.isneginf(ours["blocks.0.attn.hook_attn_scores"]).sum().item() > causal
    for name in names:
        assert max_diff(ours[name], theirs[name]) <= TOL, name


def test_peft_and_two_adapters_over_one_model():
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_hf("llama")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    a, b = HFHookedModel(peft_model, tok), HFHookedModel(peft_model, tok)
    layer = peft_model.get_base_model().model.layers[0]
    with torch.no_grad():
        clean = a(IDS)
        cache = interp.capture(a, IDS, ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_q"])
        q = layer.self_attn.q_proj(layer.input_layernorm(cache["blocks.0.hook_resid_pre"]))
        assert torch.equal(cache["blocks.0.attn.hook_q"], q.view(2, 7, 4, 16))  # LoRA included
        with a.hooks(fwd=[("blocks.0.attn.hook_pattern", lambda t, h: None)]):
            with b.hooks(fwd=[("blocks.1.attn.hook_z", zero_head)]):
                pass
            # b's exit must not switch a's hooks off
            assert model.config._attn_implementation == IMPLEMENTATION
            assert torch.equal(a(IDS), clean)
    assert model.config._attn_implementation == "eager"

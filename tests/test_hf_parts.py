"""Norms, MLP internals and the unembedding on the Hugging Face backend (``hf_parts``).

Families TransformerBridge supports are compared with it on identical weights (captures,
edits); every family is also checked against a naive reference computed from the weights
and the norm's own input / output, and gradients against finite differences.
"""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch
import torch.nn.functional as F

import interp
from interp.adapters import hf_parts
from interp.families import FAMILIES, byte_tokenizer, tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERNS = [
    "blocks.*.ln*.hook_scale",
    "blocks.*.ln*.hook_normalized",
    "blocks.*.mlp.hook_pre",
    "blocks.*.mlp.hook_pre_linear",
    "blocks.*.mlp.hook_post",
    "ln_final.hook_scale",
    "ln_final.hook_normalized",
    "hook_unembed",
]
BRIDGE_FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gpt2",
    "gpt_neox",
    "mixtral",
    "qwen2_moe",
]
NOT_ON_BRIDGE = ["qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
# What each norm of a layer normalizes: (norm name, module attribute).
NORM_ATTRS = {
    "gemma2": [
        ("ln1", "input_layernorm"),
        ("ln1_post", "post_attention_layernorm"),
        ("ln2", "pre_feedforward_layernorm"),
        ("ln2_post", "post_feedforward_layernorm"),
    ],
    "gpt2": [("ln1", "ln_1"), ("ln2", "ln_2")],
}
DEFAULT_NORMS = [("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")]


def model_of(family: str, dtype=torch.float32):
    """A tiny model whose norms have non-unit weights (and non-zero LayerNorm biases), so
    applying a norm's weight or not makes a difference of order one."""
    # The Bridge reads num_key_value_heads from the config even for GPT-2 / GPT-NeoX,
    # which ignore it; give it the value they really use.
    extra = {"num_key_value_heads": 4} if family in ("gpt2", "gpt_neox") else {}
    model, tok = tiny_hf(family, seed=0, **extra)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if hf_parts._norm_kind(module) is not None:
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.5 + 1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.3)
    return model.to(dtype), tok


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))


def part_names(model) -> list[str]:
    return model.resolve(
        [p for p in PATTERNS if any(fnmatch.fnmatch(n, p) for n in model.hook_names)]
    )


def bridge_of(hf_model):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        "interp-test", hf_model=copy.deepcopy(hf_model), tokenizer=byte_tokenizer()
    )
    # Compatibility mode without weight processing: TransformerLens's names on the very
    # same weights (processing would fold the norms' weights into the next layer).
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    return interp.load(bridge)


def edit(t, hook):
    return t * 1.5 + 0.25


# The Bridge warns when an edit makes it leave HF's native norm forward.
@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale:UserWarning")
@pytest.mark.parametrize("family", BRIDGE_FAMILIES)
def test_captures_and_edits_agree_with_transformer_bridge(family, ids):
    model, tok = model_of(family)
    ours = interp.load(model, tokenizer=tok)
    theirs = bridge_of(model)
    names = part_names(ours)
    assert sorted(names) == sorted(part_names(theirs))
    a, b = interp.capture(ours, ids, names), interp.capture(theirs, ids, names)
    for name in names:
        assert a[name].shape == b[name].shape, name
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= 1e-4, f"{family} {name}: max abs diff {diff}"
    clean = ours(ids)
    layer = 1
    edits = [f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.ln2.hook_normalized"]
    edits += ["blocks.0.ln1.hook_scale", "ln_final.hook_normalized", "blocks.2.mlp.hook_pre"]
    for name in edits:
        x = ours.run_with_hooks(ids, fwd_hooks=[(name, edit)])
        y = theirs.run_with_hooks(ids, fwd_hooks=[(name, edit)])
        diff = (x - y).abs().max().item()
        assert diff <= 1e-4, f"{family} edit at {name}: logits differ by {diff}"
        assert (x - clean).abs().max().item() > 1e-2, f"{family}: edit at {name} did nothing"


def layer_norms(family):
    return NORM_ATTRS.get(family, DEFAULT_NORMS)


def reference_norm(module, x):
    """(scale, normalized, output) of a norm module from its input, written out by hand."""
    xf = x.float()
    if isinstance(module, torch.nn.LayerNorm):
        xf = xf - xf.mean(-1, keepdim=True)
        eps = module.eps
    else:
        eps = getattr(module, "variance_epsilon", None) or module.eps
    scale = (xf.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    normalized = xf / scale
    if isinstance(module, torch.nn.LayerNorm):
        out = normalized * module.weight + module.bias
    elif type(module).__name__.startswith("Gemma"):
        out = normalized * (1.0 + module.weight.float())
    else:
        out = normalized * module.weight
    return scale, normalized, out.to(x.dtype)


def norm_paths(model):
    base, family = model._base, model.cfg.family
    paths = {}
    for layer in range(model.cfg.n_layers):
        for ln, attr in layer_norms(family):
            paths[f"blocks.{layer}.{ln}"] = f"{model.layout.layers}.{layer}.{attr}"
    paths["ln_final"] = model.layout.final_norm
    assert all(base.get_submodule(p) is not None for p in paths.values())
    return paths


@pytest.mark.parametrize("family", FAMILIES)
def test_norms_mlp_and_unembed_match_a_reference_from_the_weights(family, ids):
    model, tok = model_of(family)
    hooked = interp.load(model, tokenizer=tok)
    names = part_names(hooked)
    paths = norm_paths(hooked)
    io = [f"{p}.hook_in" for p in paths.values()] + [f"{p}.hook_out" for p in paths.values()]
    mlps = {}
    for layer in range(hooked.cfg.n_layers):
        mlp = hooked._layers[layer].mlp
        if layer in hooked.cfg.moe_layers:
            mlps[layer] = None
        else:
            mlps[layer] = mlp
    mlp_paths = [f"{hooked.layout.layers}.{i}.mlp" for i in range(hooked.cfg.n_layers)]
    io += [f"{p}.hook_in" for p in mlp_paths] + [f"{p}.hook_out" for p in mlp_paths]
    logits, cache = interp.capture(hooked, ids, names + io, return_logits=True)
    assert {n.rsplit(".", 1)[0] for n in names if ".ln" in n or n.startswith("ln_")} == set(paths)
    for hook, path in paths.items():
        module = model.get_submodule(path)
        scale, normalized, out = reference_norm(module, cache[f"{path}.hook_in"])
        torch.testing.assert_close(cache[f"{hook}.hook_scale"], scale, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            cache[f"{hook}.hook_normalized"], normalized, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(cache[f"{path}.hook_out"], out, atol=1e-5, rtol=1e-5)
    for layer, mlp in mlps.items():
        x, y = cache[f"{mlp_paths[layer]}.hook_in"], cache[f"{mlp_paths[layer]}.hook_out"]
        b = f"blocks.{layer}.mlp."
        if mlp is None:  # MoE: the Bridge's aliases of the block's input and output
            torch.testing.assert_close(cache[b + "hook_pre"], x)
            torch.testing.assert_close(cache[b + "hook_post"], y)
            assert b + "hook_pre_linear" not in cache
            continue
        if hasattr(mlp, "gate_proj"):
            pre = F.linear(x, mlp.gate_proj.weight)
            torch.testing.assert_close(
                cache[b + "hook_pre_linear"], F.linear(x, mlp.up_proj.weight)
            )
            post = mlp.act_fn(pre) * cache[b + "hook_pre_linear"]
            out = F.linear(cache[b + "hook_post"], mlp.down_proj.weight)
        elif hasattr(mlp, "c_fc"):  # GPT-2's Conv1D stores [in, out]
            pre = x @ mlp.c_fc.weight + mlp.c_fc.bias
            post = mlp.act(pre)
            out = cache[b + "hook_post"] @ mlp.c_proj.weight + mlp.c_proj.bias
        else:
            pre = F.linear(x, mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias)
            post = mlp.act(pre)
            out = F.linear(cache[b + "hook_post"], mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias)
        torch.testing.assert_close(cache[b + "hook_pre"], pre, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache[b + "hook_post"], post, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, out, atol=1e-5, rtol=1e-5)
    final = cache[f"{paths['ln_final']}.hook_out"]
    unembed = F.linear(final, model.get_output_embeddings().weight)
    torch.testing.assert_close(cache["hook_unembed"], unembed, atol=1e-5, rtol=1e-5)
    if family != "gemma2":  # Gemma-2 soft-caps the logits after the unembedding
        torch.testing.assert_close(logits, unembed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_edits_are_what_the_weight_multiplies_and_what_the_down_projection_reads(family, ids):
    model, tok = model_of(family)
    hooked = interp.load(model, tokenizer=tok)
    clean = hooked(ids)
    for hook, path in norm_paths(hooked).items():
        module = model.get_submodule(path)
        for slot in ("hook_scale", "hook_normalized"):
            name = f"{hook}.{slot}"
            with hooked.hooks(fwd=[(name, edit)]):
                logits, cache = interp.capture(
                    hooked, ids, [name, f"{path}.hook_in", f"{path}.hook_out"], return_logits=True
                )
            scale, normalized, _ = reference_norm(module, cache[f"{path}.hook_in"])
            if slot == "hook_scale":  # the edited scale divides the input
                normalized = normalized * scale / edit(scale, None)
            else:
                normalized = edit(normalized, None)
            out = _weighted(module, normalized, cache[f"{path}.hook_in"].dtype)
            torch.testing.assert_close(cache[f"{path}.hook_out"], out, atol=1e-5, rtol=1e-5)
            assert (logits - clean).abs().max() > 1e-4, f"{name} did nothing"
    for layer in range(hooked.cfg.n_layers):
        name = f"blocks.{layer}.mlp.hook_post"
        mlp_path = f"{hooked.layout.layers}.{layer}.mlp"
        with hooked.hooks(fwd=[(name, edit)]):
            logits, cache = interp.capture(
                hooked, ids, [name, f"{mlp_path}.hook_out"], return_logits=True
            )
        assert (logits - clean).abs().max() > 1e-2, f"{name} did nothing"
        if layer in hooked.cfg.moe_layers:  # the block's output itself
            continue
        mlp = model.get_submodule(mlp_path)
        down = getattr(mlp, "down_proj", None) or getattr(mlp, "dense_4h_to_h", None)
        if down is not None:
            out = F.linear(cache[name], down.weight, down.bias)
        else:
            out = cache[name] @ mlp.c_proj.weight + mlp.c_proj.bias
        torch.testing.assert_close(cache[f"{mlp_path}.hook_out"], out, atol=1e-5, rtol=1e-5)


def _weighted(module, normalized, dtype):
    if isinstance(module, torch.nn.LayerNorm):
        return (normalized * module.weight + module.bias).to(dtype)
    if type(module).__name__.startswith("Gemma"):
        return (normalized * (1.0 + module.weight.float())).to(dtype)
    return module.weight * normalized.to(dtype)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_gradients_match_finite_differences(family, ids):
    """capture_grads at every name = d loss / d activation, checked along a random direction
    by a central difference of edits at the same name (float64)."""
    model, tok = model_of(family, dtype=torch.float64)
    hooked = interp.load(model, tokenizer=tok)

    def loss_fn(logits, batch):
        return logits[:, -1].logsumexp(-1).sum() + logits[:, 2, 5].sum()

    names = [n for n in part_names(hooked) if n.startswith(("blocks.1.", "ln_final", "hook_"))]
    grads = interp.capture_grads(hooked, ids, loss_fn, names, return_activations=True)
    gen = torch.Generator().manual_seed(3)
    for name in names:
        act, grad = grads.activations[name], grads.grads[name]
        assert grad.shape == act.shape and grad.abs().sum() > 0, name
        # A step relative to the activation's size: scales are ~0.05 in a random tiny model.
        v = torch.randn(act.shape, generator=gen, dtype=act.dtype) * act.abs().mean()
        # transformers keeps softmax and rotary tables in float32 even in a float64 model,
        # so the difference quotient is good to ~1e-3 relative, not better; a wrong
        # gradient (another tensor's, or missing a weight) is off by far more.
        eps = 1e-2

        def at(sign, v=v, eps=eps, name=name):
            with torch.no_grad():
                out = hooked.run_with_hooks(
                    ids, fwd_hooks=[(name, lambda t, h: t + sign * eps * v)]
                )
            return loss_fn(out, None)

        numeric = (at(1) - at(-1)) / (2 * eps)
        analytic = (grad * v).sum()
        rel = ((analytic - numeric).abs() / numeric.abs()).item()
        assert rel < 1e-2, f"{name}: grad·v {analytic.item():.6g}, difference {numeric.item():.6g}"


@pytest.mark.filterwarnings("ignore:Backward hooks on hook_scale:UserWarning")
def test_gradients_agree_with_transformer_bridge(ids):
    model, tok = model_of("llama")
    ours, theirs = interp.load(model, tokenizer=tok), bridge_of(model)

    def loss_fn(logits, batch):
        return logits[:, -1].logsumexp(-1).sum()

    names = part_names(ours)
    a = interp.capture_grads(ours, ids, loss_fn, names).grads
    b = interp.capture_grads(theirs, ids, loss_fn, names).grads
    for name in names:
        assert (a[name] - b[name]).abs().max().item() <= 1e-4, name


def test_hooks_on_the_same_norm_compose_in_transformer_lens_order(ids):
    """scale → normalized → the norm's output, whatever order the hooks were added in."""
    model = interp.tiny("llama")
    base = interp.capture(model, ids, "blocks.1.ln2.hook_normalized")
    normalized = base["blocks.1.ln2.hook_normalized"]
    seen = {}
    out_hook = (
        "model.layers.1.post_attention_layernorm.hook_out",
        lambda t, h: seen.setdefault("out", t),
    )
    fwd = [
        ("blocks.1.ln2.hook_normalized", lambda t, h: t + 1.0),
        ("blocks.1.ln2.hook_scale", lambda t, h: t * 2.0),  # added later, runs first
        ("blocks.1.ln2.hook_normalized", lambda t, h: seen.setdefault("normalized", t.clone())),
    ]
    with model.hooks(fwd=[out_hook]), model.hooks(fwd=fwd):  # the output hook is older
        model(ids)
    torch.testing.assert_close(seen["normalized"], normalized / 2.0 + 1.0)
    weight = model.model.model.layers[1].post_attention_layernorm.weight
    torch.testing.assert_close(seen["out"], weight * (normalized / 2.0 + 1.0))


def test_in_place_edits_take_effect(ids):
    model = interp.tiny("qwen2")
    clean = model(ids)

    def zero_last(t, h):
        t[:, -1] = 0.0  # in place, returning None

    def triple(t, h):
        return t.mul_(3.0)

    for name, fn in [
        ("blocks.1.ln1.hook_normalized", zero_last),
        ("blocks.1.mlp.hook_post", zero_last),
        ("ln_final.hook_scale", triple),
    ]:
        out = model.run_with_hooks(ids, fwd_hooks=[(name, fn)])
        assert (out[:, -1] - clean[:, -1]).abs().max() > 1e-3, name


def n_torch_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_no_cost_and_nothing_left_when_no_hook_is_registered(ids):
    model = interp.tiny("gemma2")
    modules = [(n, type(m)) for n, m in model.model.named_modules()]
    assert n_torch_hooks(model.model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(
            fwd=[(n, lambda t, h: None) for n in part_names(model)],
            bwd=[("blocks.*.ln*.hook_*", lambda g, h: None)],
        ):
            assert n_torch_hooks(model.model) > 0
            raise RuntimeError("boom")
    assert n_torch_hooks(model.model) == 0
    assert not hf_parts._NORM_HOOKS
    assert [(n, type(m)) for n, m in model.model.named_modules()] == modules


def test_bf16_capture_and_edits(ids):
    model, tok = model_of("llama", dtype=torch.bfloat16)
    hooked = interp.load(model, tokenizer=tok)
    names = part_names(hooked)
    clean = hooked(ids)
    seen = []
    with hooked.hooks(fwd=[(n, lambda t, h: seen.append(h.name)) for n in names]):
        assert torch.equal(hooked(ids), clean)  # observing changes nothing
    assert sorted(seen) == sorted(names)
    cache = interp.capture(hooked, ids, names)
    # As on the Bridge and in TransformerLens, norms are hooked in float32.
    assert cache["blocks.0.ln1.hook_normalized"].dtype == torch.float32
    assert cache["blocks.0.ln1.hook_scale"].dtype == torch.float32
    assert cache["blocks.0.mlp.hook_post"].dtype == torch.bfloat16
    for name in ["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_post", "ln_final.hook_scale"]:
        out = hooked.run_with_hooks(ids, fwd_hooks=[(name, edit)])
        assert out.dtype == torch.bfloat16
        assert (out.float() - clean.float()).abs().max() > 1e-1, name


def test_ln_final_normalized_is_before_the_weight_and_a_logit_lens_applies_it(ids):
    model, tok = model_of("llama")
    hooked = interp.load(model, tokenizer=tok)
    logits, cache = interp.capture(hooked, ids, "ln_final.hook_normalized", return_logits=True)
    normalized = cache["ln_final.hook_normalized"]
    weight = model.model.norm.weight
    assert (normalized * weight - normalized).abs().max() > 1.0  # the weight matters here
    torch.testing.assert_close(F.linear(normalized * weight, model.lm_head.weight), logits)

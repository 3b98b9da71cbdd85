"""interp.lens: unembedding on every backend, decomposition, DLA, logit lens, patchscopes.

Norm weights and biases are randomised in every model here (HF initialises them to ones
and zeros, which would hide a missing weight or bias), and every sum is checked against
the model's own logits from its forward pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tl_helpers import hooked_gpt2

import interp
from interp import lens
from interp.families import FAMILIES, tiny_hf
from interp.positions import PositionError

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))
ANSWER, WRONG = torch.tensor([5, 17]), torch.tensor([9, 3])


def _perturb_norms(module: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2:][0] or name.endswith((".w", ".b")):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3)


def _tiny(family: str, **kw):
    model, tok = tiny_hf(family, **kw)
    _perturb_norms(model)
    with torch.no_grad():  # logits of a trained model's size (|logit| ~ 10), not ~0.5
        model.get_output_embeddings().weight.mul_(20.0)
    return interp.load(model, tokenizer=tok)


def _check_sums(model, ids=IDS, tol=1e-4):
    """DLA components add up to the model's final logit difference (before soft-capping),
    heads add up to their attn_out; returns the largest error."""
    names = ["hook_unembed"] if "hook_unembed" in model.hook_names else []
    logits, cache = model.run_with_cache(ids, names_filter=names)
    pre_cap = cache["hook_unembed"][:, -1] if names else logits[:, -1]
    real = pre_cap.gather(1, ANSWER[:, None])[:, 0] - pre_cap.gather(1, WRONG[:, None])[:, 0]
    attr = lens.dla(model, ids, ANSWER, WRONG, positions=-1)
    err = (attr.components.sum(0) - real).abs().max().item()
    assert err <= tol, f"{model.cfg.family}: components sum off by {err}"
    assert (attr.logit_diff - real).abs().max().item() <= tol
    attn = torch.stack([attr[f"{layer}_attn_out"] for layer in range(model.cfg.n_layers)])
    head_err = (attr.heads.sum(1) + attr.head_bias - attn).abs().max().item()
    assert head_err <= tol, f"{model.cfg.family}: heads sum off by {head_err}"
    # The final residual's decomposition adds up to it, and unembeds to the logits.
    final = interp.capture(model, ids, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    final = next(iter(final.values()))
    parts = lens.decompose_resid(model, ids)
    assert (parts.resid.sum(0) - final).abs().max().item() <= tol
    assert (model.unembed(final) - logits).abs().max().item() <= tol
    return max(err, head_err)


@pytest.mark.parametrize("family", FAMILIES)
def test_contributions_sum_to_the_final_logit_difference(family):
    model = _tiny(family)
    _check_sums(model)
    labels = lens.dla(model, IDS, ANSWER, WRONG).labels
    assert labels[0] == "embed" and "2_mlp_out" in labels
    assert ("pos_embed" in labels) == (family == "gpt2")
    assert ("bias" in labels) == (family in ("gpt2", "gpt_neox"))  # LayerNorm biases
    attr = lens.dla(model, IDS, ANSWER, WRONG)
    label, value = attr.top(1, row=1, heads=True)[0]
    assert (
        value
        == attr[label][1].item()
        == attr.heads[..., 1].abs().max().item() * (1 if value > 0 else -1)
    )


def test_gemma2_soft_cap_is_applied_after_the_sum():
    model = _tiny("gemma2")
    with torch.no_grad():  # logits far past the cap of 30, where tanh bends
        model.model.lm_head.weight.mul_(400.0)
    logits, cache = model.run_with_cache(IDS, names_filter="hook_unembed")
    pre = cache["hook_unembed"]
    assert pre.abs().max() > 60 and logits.abs().max() <= 30
    assert (model.unembed(lens.accumulated_resid(model, IDS).resid[-1]) - logits).abs().max() < 1e-3
    attr = lens.dla(model, IDS, ANSWER, WRONG)
    assert attr.softcap == 30.0
    capped = (
        logits[:, -1].gather(1, ANSWER[:, None])[:, 0]
        - logits[:, -1].gather(1, WRONG[:, None])[:, 0]
    )
    uncapped = (
        pre[:, -1].gather(1, ANSWER[:, None])[:, 0] - pre[:, -1].gather(1, WRONG[:, None])[:, 0]
    )
    rel = (attr.components.sum(0) - uncapped).abs().max() / uncapped.abs().max()
    assert rel < 1e-5
    assert (attr.components.sum(0) - capped).abs().max() > 1.0  # the cap is not linear


def test_unembed_pieces_on_the_hf_backend():
    model = _tiny("gpt2")
    W_U = model.W_U
    assert W_U.shape == (model.cfg.d_model, model.cfg.d_vocab)
    assert torch.equal(W_U, model.model.lm_head.weight.T)
    _, cache = model.run_with_cache(
        IDS, names_filter=["ln_final.hook_scale", "blocks.2.hook_resid_post"]
    )
    resid = cache["blocks.2.hook_resid_post"]
    torch.testing.assert_close(model.final_norm_scale(resid), cache["ln_final.hook_scale"])
    stack = lens.decompose_resid(model, IDS).resid
    normalized = model.apply_ln_to_stack(stack, resid)
    # apply_ln_to_stack: the components add up to the normalised residual ...
    ln = model.model.transformer.ln_f
    expected = (ln(resid) - ln.bias) / ln.weight
    torch.testing.assert_close(normalized.sum(0), expected, atol=1e-4, rtol=1e-4)
    # ... and their unembeddings add up to the logits less the bias term.
    spec = model._unembed_spec()
    logits = lens.stack_to_logits(spec, normalized).sum(0) + lens.logit_bias(spec)
    torch.testing.assert_close(logits, model(IDS), atol=1e-4, rtol=1e-4)
    # Each component normalised by its *own* scale does not add up.
    own = torch.stack([model.unembed(c) for c in stack]).sum(0)
    assert (own - model(IDS)).abs().max() > 1e-2


def test_head_output_weights_per_family():
    for family, proj in (("llama", "o_proj"), ("gpt2", "c_proj"), ("gpt_neox", "dense")):
        model = _tiny(family)
        W_O = lens.head_output_weights(model, 1)
        n_heads = model.cfg.n_heads
        assert W_O.shape == (n_heads, model.cfg.d_model // n_heads, model.cfg.d_model)
        z = torch.randn(3, n_heads, W_O.shape[1])
        attn = model._layers[1]
        module = getattr(
            getattr(attn, "self_attn", None) or getattr(attn, "attn", None) or attn.attention, proj
        )
        bias = lens.head_output_bias(model, 1)
        expected = module(z.flatten(-2))
        got = torch.einsum("bhd,hdm->bm", z, W_O) + (0 if bias is None else bias)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer must be an int"):
        lens.head_output_weights(model, 7)


def _hooked_transformer(normalization_type: str = "LN", n_key_value_heads: int | None = None):
    module = pytest.importorskip(
        "transformer_lens.HookedTransformer", reason="TransformerLens 4 removed HookedTransformer"
    )
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=32,
        n_ctx=32,
        d_head=8,
        n_heads=4,
        d_vocab=50,
        act_fn="gelu",
        seed=0,
        normalization_type=normalization_type,
        n_key_value_heads=n_key_value_heads,
    )
    ht = module.HookedTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ht.named_parameters():  # norm weights, norm and projection biases
            if name.endswith((".w", ".b")) or ".b_" in name or name == "b_U":
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return ht


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("norm", "kv_heads"), [("LN", None), ("RMS", 2)])  # RMS with GQA
def test_agrees_with_transformer_lens_on_a_hooked_transformer(norm, kv_heads):
    ht = _hooked_transformer(norm, kv_heads)
    model = interp.load(ht)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    _, cache = ht.run_with_cache(ids)
    for layer in (None, 1):
        for apply_ln in (False, True):
            ref, labels = cache.decompose_resid(layer=layer, apply_ln=apply_ln, return_labels=True)
            ours = lens.decompose_resid(model, ids, layer=layer, apply_ln=apply_ln)
            assert ours.labels == tuple(labels)
            assert (ours.resid - ref).abs().max().item() <= 1e-4
            ref, labels = cache.accumulated_resid(
                layer=layer, apply_ln=apply_ln, return_labels=True
            )
            ours = lens.accumulated_resid(model, ids, layer=layer, apply_ln=apply_ln)
            assert ours.labels == tuple(labels)
            assert (ours.resid - ref).abs().max().item() <= 1e-4
    # The same from interp's own cache of the run, and at one position.
    ours = lens.accumulated_resid(model.run_with_cache(ids)[1], apply_ln=True, model=model)
    assert (ours.resid - cache.accumulated_resid(apply_ln=True)).abs().max().item() <= 1e-4
    ours = lens.decompose_resid(model, ids, positions=-1, apply_ln=True)
    assert (ours.resid - cache.decompose_resid(apply_ln=True)[:, :, -1]).abs().max().item() <= 1e-4
    # Heads: TransformerLens's stack_head_results.
    ref = cache.stack_head_results(apply_ln=False)  # [layer*head, batch, pos, d_model]
    heads = lens.head_results(model, ids)
    assert (heads.results.flatten(0, 1) - ref).abs().max().item() <= 1e-4
    assert heads.labels[:2] == ("L0H0", "L0H1")
    assert _check_sums(model, ids % 50) <= 1e-4
    torch.testing.assert_close(model.W_U, ht.W_U)
    torch.testing.assert_close(
        model.final_norm_scale(cache["blocks.2.hook_resid_post"]), cache["ln_final.hook_scale"]
    )


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_transformer_bridge(family):
    from transformer_lens.model_bridge import TransformerBridge

    hf, tok = tiny_hf(family)
    if family == "gpt2":  # the bridge reads the shared tiny config's KV-head count; GPT-2 has none
        del hf.config.num_key_value_heads
    _perturb_norms(hf)
    with torch.no_grad():
        hf.get_output_embeddings().weight.mul_(20.0)
    bridge = TransformerBridge.boot_transformers(
        "interp-test", hf_model=copy.deepcopy(hf), tokenizer=tok
    )
    bridged = interp.load(bridge)
    assert _check_sums(bridged) <= 1e-4
    ours = interp.load(hf, tokenizer=tok)
    torch.testing.assert_close(bridged.W_U, ours.W_U)
    a = lens.dla(bridged, IDS, ANSWER, WRONG)
    b = lens.dla(ours, IDS, ANSWER, WRONG)
    assert a.labels == b.labels
    torch.testing.assert_close(a.components, b.components, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.heads, b.heads, atol=1e-4, rtol=1e-4)


def test_peft_wrapped_model_reads_the_adapted_weights():
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_hf("qwen2")
    _perturb_norms(model)
    lora = LoraConfig(r=4, target_modules=["o_proj", "lm_head"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    wrapped = interp.load(peft_model, tokenizer=tok)
    assert _check_sums(wrapped) <= 1e-4
    merged = copy.deepcopy(peft_model).merge_and_unload()
    torch.testing.assert_close(wrapped.W_U, merged.lm_head.weight.T, atol=1e-5, rtol=1e-5)
    W_O = lens.head_output_weights(wrapped, 0)
    expected = merged.model.layers[0].self_attn.o_proj.weight.T.unflatten(0, (4, -1))
    torch.testing.assert_close(W_O, expected, atol=1e-5, rtol=1e-5)


def test_bf16_model():
    model, tok = tiny_hf("llama")
    _perturb_norms(model)
    model = interp.load(model.to(torch.bfloat16), tokenizer=tok)
    logits = model(IDS).float()
    attr = lens.dla(model, IDS, ANSWER, WRONG)
    assert attr.components.dtype == torch.float32
    real = (
        logits[:, -1].gather(1, ANSWER[:, None])[:, 0]
        - logits[:, -1].gather(1, WRONG[:, None])[:, 0]
    )
    assert (attr.components.sum(0) - real).abs().max() < 0.05  # bf16 logits are rounded
    # bf16 components add up to the bf16 final residual up to the model's own rounding.
    assert (attr.components.sum(0) - attr.logit_diff).abs().max() < 5e-3
    lensed = lens.logit_lens(model, IDS)
    assert lensed.logits.dtype == torch.float32
    assert (lensed.logits[-1] - logits[:, -1]).abs().max() < 0.05


def test_logit_lens_and_patchscope_identity():
    model = _tiny("qwen3")
    n = model.cfg.n_layers
    lensed = lens.logit_lens(model, IDS, positions=-1)
    assert lensed.logits.shape == (n + 1, 2, model.cfg.d_vocab)
    assert lensed.labels[-1] == "final_post" and lensed.layers == tuple(range(n + 1))
    torch.testing.assert_close(lensed.logits[-1], model(IDS)[:, -1], atol=1e-4, rtol=1e-4)
    assert lensed.top(3).shape == (n + 1, 2, 3)
    for layer in range(n + 1):
        scope = lens.patchscope(model, IDS, (layer, -1), target=(n, -1))
        torch.testing.assert_close(scope.logits, lensed.logits[layer], atol=1e-4, rtol=1e-4)
    # At another position, into another prompt.
    other = torch.randint(0, 250, (2, 5), generator=torch.Generator().manual_seed(3))
    scope = lens.patchscope(model, IDS, (1, 3), other, (-1, 2))
    torch.testing.assert_close(scope.logits, lensed_at(model, IDS, 1, 3), atol=1e-4, rtol=1e-4)
    # Identity: a state patched into its own place changes nothing.
    same = lens.patchscope(model, IDS, (2, -1), target=(2, -1))
    torch.testing.assert_close(same.logits, model(IDS)[:, -1], atol=1e-5, rtol=1e-5)
    # Generation reads through the patched prompt.
    gen = lens.patchscope(
        model, IDS[:1], (1, -1), other[:1], (1, -1), read="generate", max_new_tokens=3
    )
    assert gen.tokens.shape == (1, other.shape[1] + 3) and gen.logits is None


def lensed_at(model, ids, layer, pos):
    return lens.logit_lens(model, ids, positions=pos).logits[layer]


def test_named_positions_and_shapes():
    from interp.chat import encode

    model = _tiny("llama")
    batch = encode(
        model.tokenizer,
        [[{"role": "user", "content": "Hi there"}], [{"role": "user", "content": "Yo"}]],
    )
    by_name = lens.dla(model, batch, 5, 9, positions="user_end")
    by_index = lens.dla(model, batch, 5, 9, positions=batch.positions["user_end"])
    torch.testing.assert_close(by_name.components, by_index.components)
    stack = lens.accumulated_resid(
        model, batch, positions="assistant" if "assistant" in batch.masks else [0, -1]
    )
    assert stack.resid.shape[0] == model.cfg.n_layers + 1
    full = lens.decompose_resid(model, batch)
    assert full.resid.shape == (7, *batch.input_ids.shape, model.cfg.d_model)
    scope = lens.patchscope(model, batch, (1, "user_end"), target=(-1, "user_end"))
    torch.testing.assert_close(
        scope.logits,
        lens.logit_lens(model, batch, positions="user_end").logits[1],
        atol=1e-4,
        rtol=1e-4,
    )


def test_bad_input_raises_clearly():
    model = _tiny("llama")
    with pytest.raises(ValueError, match="d_model = 64"):
        model.unembed(torch.randn(3, 65))
    with pytest.raises(Exception, match=r"stack|rows"):
        model.apply_ln_to_stack(torch.randn(2, 3, 64), torch.randn(4, 64))
    with pytest.raises((KeyError, PositionError), match="named position"):
        lens.dla(model, IDS, 5, 9, positions="user_end")
    from interp.chat import encode

    batch = encode(model.tokenizer, [[{"role": "user", "content": "Hi"}]])
    with pytest.raises(KeyError, match="unknown named position 'nope'"):
        lens.logit_lens(model, batch, positions="nope")
    with pytest.raises(ValueError, match="one position per row"):
        lens.dla(model, IDS, 5, 9, positions=[0, 1])
    with pytest.raises(PositionError, match="out of range"):
        lens.dla(model, IDS, 5, 9, positions=40)
    by_text = lens.dla(model, IDS, "a", ["b", "c"])
    ids = [model.tokenizer.encode(t, add_special_tokens=False)[0] for t in "abc"]
    by_ids = lens.dla(model, IDS, ids[0], ids[1:])
    torch.testing.assert_close(by_text.components, by_ids.components)
    with pytest.raises(ValueError, match="is 2 tokens"):
        lens.dla(model, IDS, "ab", "c")
    with pytest.raises(ValueError, match="one token id or one per row"):
        lens.dla(model, IDS, torch.tensor([1, 2, 3]), 9)
    with pytest.raises(ValueError, match="residual-stream index"):
        lens.patchscope(model, IDS, (9, -1))
    with pytest.raises(TypeError, match="apply_ln=True needs"):
        lens.accumulated_resid(model.run_with_cache(IDS)[1], apply_ln=True)
    with pytest.raises(KeyError, match="the cache lacks"):
        lens.decompose_resid(interp.capture(model, IDS, "blocks.*.hook_resid_pre"), model=model)


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
def test_hf_gpt2_agrees_with_a_hooked_transformer_on_the_same_weights():
    module = pytest.importorskip(
        "transformer_lens.HookedTransformer", reason="TransformerLens 4 removed HookedTransformer"
    )
    hf, tok = tiny_hf("gpt2")
    _perturb_norms(hf)
    ht = hooked_gpt2(hf, module.HookedTransformer)
    logits, cache = ht.run_with_cache(IDS)
    ours = interp.load(hf, tokenizer=tok)
    assert (ours(IDS) - logits).abs().max().item() <= 1e-5
    for layer in (None, 1):
        for apply_ln in (False, True):
            ref = cache.decompose_resid(layer=layer, apply_ln=apply_ln)
            got = lens.decompose_resid(ours, IDS, layer=layer, apply_ln=apply_ln).resid
            assert (got - ref).abs().max().item() <= 1e-4
            ref = cache.accumulated_resid(layer=layer, apply_ln=apply_ln)
            got = lens.accumulated_resid(ours, IDS, layer=layer, apply_ln=apply_ln).resid
            assert (got - ref).abs().max().item() <= 1e-4
    heads = lens.head_results(ours, IDS).results.flatten(0, 1)
    assert (heads - cache.stack_head_results()).abs().max().item() <= 1e-4


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("norm", "kv_heads"), [("LN", None), ("RMS", 2)])
def test_incl_mid_and_mlp_input_agree_with_transformer_lens(norm, kv_heads):
    ht = _hooked_transformer(norm, kv_heads)
    model = interp.load(ht)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    _, cache = ht.run_with_cache(ids)
    for layer in (None, 0, 1, 2):
        for apply_ln in (False, True):
            for incl_mid, mlp_input in ((True, False), (False, True), (True, True)):
                if mlp_input and layer is None:
                    continue
                ref, labels = cache.accumulated_resid(
                    layer=layer,
                    incl_mid=incl_mid,
                    mlp_input=mlp_input,
                    apply_ln=apply_ln,
                    return_labels=True,
                )
                ours = lens.accumulated_resid(
                    model,
                    ids,
                    layer=layer,
                    incl_mid=incl_mid,
                    mlp_input=mlp_input,
                    apply_ln=apply_ln,
                )
                assert ours.labels == tuple(labels)
                assert (ours.resid - ref).abs().max().item() <= 1e-4
            if layer is not None:
                ref, labels = cache.decompose_resid(
                    layer=layer, mlp_input=True, apply_ln=apply_ln, return_labels=True
                )
                ours = lens.decompose_resid(
                    model, ids, layer=layer, mlp_input=True, apply_ln=apply_ln
                )
                assert ours.labels == tuple(labels) and ours.labels[-1] == f"{layer}_attn_out"
                assert (ours.resid - ref).abs().max().item() <= 1e-4
    # apply_ln with mlp_input divides by the MLP input's scale (ln2), not the block's (ln1).
    ours = lens.accumulated_resid(model, ids, layer=1, mlp_input=True, apply_ln=True)
    plain = lens.accumulated_resid(model, ids, layer=1, apply_ln=True)
    assert (ours.resid[:-1] - plain.resid).abs().max() > 1e-3
    assert ours.layers == (0, 1, 1) and ours.labels == ("0_pre", "1_pre", "1_mid")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen2_moe"])
def test_mlp_input_decomposition_adds_up_to_resid_mid(family):
    model = _tiny(family)
    _, cache = model.run_with_cache(IDS, names_filter="blocks.*.hook_resid_mid")
    for layer in (0, 2):
        parts = lens.decompose_resid(model, IDS, layer=layer, mlp_input=True)
        mid = cache[f"blocks.{layer}.hook_resid_mid"]
        assert (parts.resid.sum(0) - mid).abs().max().item() <= 1e-4
    mids = lens.accumulated_resid(model, IDS, incl_mid=True)
    n = model.cfg.n_layers
    assert len(mids.labels) == 2 * n + 1 and mids.labels[1] == "0_mid"
    torch.testing.assert_close(mids["1_mid"], cache["blocks.1.hook_resid_mid"])
    # From a cache of the run, without the model.
    _, full = model.run_with_cache(IDS)
    from_cache = lens.accumulated_resid(full, incl_mid=True)
    torch.testing.assert_close(from_cache.resid, mids.resid)


def test_incl_mid_and_mlp_input_refuse_what_has_no_meaning():
    model = _tiny("llama")
    with pytest.raises(ValueError, match="no MLP after it: pass layer < 3"):
        lens.accumulated_resid(model, IDS, mlp_input=True)
    with pytest.raises(ValueError, match="no MLP after it"):
        lens.decompose_resid(model, IDS, layer=3, mlp_input=True)
    neox = _tiny("gpt_neox")  # parallel attention and MLP: no resid_mid
    with pytest.raises(ValueError, match=r"hook_resid_mid does not exist.*parallel"):
        lens.accumulated_resid(neox, IDS, incl_mid=True)
    with pytest.raises(ValueError, match="hook_resid_mid does not exist"):
        lens.decompose_resid(neox, IDS, layer=1, mlp_input=True)
    cache = interp.capture(model, IDS, "blocks.*.hook_resid_pre")
    with pytest.raises(ValueError, match="not in the cache"):
        lens.accumulated_resid(cache, layer=2, incl_mid=True)

"""interp.patching: activation patching against TransformerLens and naive per-site loops,
attribution patching against the exact linearisation (autograd, finite differences), the
AtP* QK fix and GradDrop against hand computations, named-position alignment."""

from __future__ import annotations

import pytest
import torch

import interp
from interp import patching as P
from interp.chat import encode

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning"),
]

ANSWERS = torch.tensor([5, 9, 17])


def metric(logits, batch):
    """Log-probability of a fixed answer token per row, at the last position."""
    rows = torch.arange(logits.shape[0])
    return logits[:, -1].log_softmax(-1)[rows, ANSWERS[: logits.shape[0]]]


def pair(seed=0, n=2, T=6, vocab=250):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(0, vocab, (n,), generator=g)
    corrupted[:, 3] = torch.randint(0, vocab, (n,), generator=g)
    return clean, corrupted


@pytest.fixture(scope="module")
def llama():
    return interp.tiny("llama", seed=0)


def naive_resid_pre(model, clean, corrupted, name="hook_resid_pre"):
    """One forward per (layer, position), patching by hand."""
    L, T = model.cfg.n_layers, clean.shape[1]
    cache = interp.capture(model, clean, f"blocks.*.{name}")
    out = torch.zeros(L, T)
    for layer in range(L):
        hook_name = f"blocks.{layer}.{name}"
        for p in range(T):

            def patch(act, hook, p=p, src=cache[hook_name]):
                act = act.clone()
                act[:, p] = src[:, p]
                return act

            logits = model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, patch)])
            out[layer, p] = metric(logits, None).mean()
    return out


# -- activation patching -------------------------------------------------------------------
def test_resid_pre_matches_transformer_lens():
    module = pytest.importorskip("transformer_lens.HookedTransformer")
    from transformer_lens import HookedTransformerConfig, patching

    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=50, act_fn="gelu", seed=0
    )
    ht = module.HookedTransformer(cfg)
    model = interp.load(ht)
    clean, corrupted = pair(seed=1, n=3, T=6, vocab=50)
    tl_metric = lambda logits: metric(logits, None).mean()  # noqa: E731
    for direction, base, source in (
        ("denoising", corrupted, clean),
        ("noising", clean, corrupted),
    ):
        _, cache = ht.run_with_cache(source)
        theirs = patching.get_act_patch_resid_pre(ht, base, cache, tl_metric)
        ours = P.activation_patching(
            model,
            clean,
            corrupted,
            metric,
            direction=direction,
            sites_per_forward=7,
            progress=False,
        )
        assert ours.axes == ("layer", "position") and ours.values.shape == (3, 6)
        assert ours.labels["layer"] == (0, 1, 2) and ours.labels["position"] == tuple(range(6))
        torch.testing.assert_close(ours.values, theirs, atol=1e-5, rtol=0)
        assert (theirs - theirs.mean()).abs().max() > 1e-3  # the sweep is not flat


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_resid_pre_matches_naive_loop_batched_and_unbatched(family):
    model = interp.tiny(family, seed=0)
    clean, corrupted = pair(seed=2)
    want = naive_resid_pre(model, clean, corrupted)
    batched = P.activation_patching(
        model, clean, corrupted, metric, sites_per_forward=5, progress=False
    )
    single = P.activation_patching(
        model, clean, corrupted, metric, sites_per_forward=1, progress=False
    )
    torch.testing.assert_close(batched.values, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(single.values, want, atol=1e-5, rtol=0)
    # Unchanged columns patch nothing; the first corrupted column fully restores at layer 0.
    torch.testing.assert_close(batched.values[:, 0], batched.corrupted_metric.mean().expand(3))
    norm = batched.normalized()
    assert norm[0, 0].abs() < 1e-5
    assert batched.sites[7] == "blocks.1.hook_resid_pre[pos=1]"


def test_heads_sweep_matches_patching_one_head_by_hand(llama):
    clean, corrupted = pair(seed=3)
    for name, head_axis in (("attn.hook_z", 2), ("attn.hook_pattern", 1)):
        cache = interp.capture(llama, clean, f"blocks.*.{name}")
        res = P.activation_patching(
            llama,
            clean,
            corrupted,
            metric,
            P.layers_x_heads(name),
            sites_per_forward=5,
            progress=False,
        )
        assert res.axes == ("layer", "head") and res.values.shape == (3, 4)
        for layer in range(3):
            hook_name = f"blocks.{layer}.{name}"
            for h in range(4):

                def patch(act, hook, h=h, src=cache[hook_name], axis=head_axis):
                    act = act.clone()
                    index = (slice(None),) * axis + (h,)
                    act[index] = src[index]
                    return act

                logits = llama.run_with_hooks(corrupted, fwd_hooks=[(hook_name, patch)])
                want = metric(logits, None).mean()
                torch.testing.assert_close(res.values[layer, h], want, atol=1e-5, rtol=0)
        assert res.effect.abs().max() > 1e-4


def test_explicit_sites_and_noising(llama):
    clean, corrupted = pair(seed=4)
    sites = [
        P.Site("blocks.1.hook_mlp_out", position=3),
        P.Site("blocks.2.attn.hook_z", position=-1, head=1),
        P.Site("blocks.0.hook_resid_post"),
    ]
    res = P.activation_patching(
        llama, clean, corrupted, metric, sites, direction="noising", progress=False
    )
    assert res.axes == ("site",) and res.labels["site"][1] == "blocks.2.attn.hook_z[pos=-1, head=1]"
    cache = interp.capture(llama, corrupted, [s.name for s in sites])
    for i, (site, index) in enumerate(
        zip(sites, [(slice(None), 3), (slice(None), -1, 1), (slice(None),)], strict=True)
    ):

        def patch(act, hook, index=index, src=cache[site.name]):
            act = act.clone()
            act[index] = src[index]
            return act

        want = metric(llama.run_with_hooks(clean, fwd_hooks=[(site.name, patch)]), None).mean()
        torch.testing.assert_close(res.values[i], want, atol=1e-5, rtol=0)
    # Patching the whole residual stream after block 0 gives the corrupted run's metric.
    torch.testing.assert_close(res.values[2], res.corrupted_metric.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.normalized()[2], torch.tensor(0.0), atol=1e-5, rtol=0)


# -- named positions -------------------------------------------------------------------------
def chat_pair(tok):
    clean = encode(
        tok,
        [
            [{"role": "user", "content": "Paris is in France."}],
            [{"role": "user", "content": "Rome is in Italy!"}],
        ],
    )
    corrupted = encode(
        tok,
        [
            [{"role": "user", "content": "Berlin is in Spain, sure."}],
            [{"role": "user", "content": "Oslo?"}],
        ],
    )
    return clean, corrupted


def chat_metric(logits, batch):
    rows = torch.arange(logits.shape[0])
    at = logits[rows, batch.positions["pre_assistant"]].log_softmax(-1)
    return at[:, 7] - at[:, 3]


def test_named_positions_align_unequal_prompts(llama):
    clean, corrupted = chat_pair(llama.tokenizer)
    assert clean.input_ids.shape != corrupted.input_ids.shape
    names = ["user_end", "pre_assistant"]
    res = P.activation_patching(
        llama,
        clean,
        corrupted,
        chat_metric,
        P.layers_x_positions(positions=names),
        sites_per_forward=4,
        progress=False,
    )
    assert res.labels["position"] == tuple(names) and res.values.shape == (3, 2)
    cache = interp.capture(llama, clean, "blocks.*.hook_resid_pre")
    rows = torch.arange(2)
    for layer in range(3):
        name = f"blocks.{layer}.hook_resid_pre"
        for j, pos in enumerate(names):

            def patch(act, hook, pos=pos, src=cache[name]):
                act = act.clone()
                act[rows, corrupted.positions[pos]] = src[rows, clean.positions[pos]]
                return act

            logits = llama.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])
            want = chat_metric(logits, corrupted).mean()
            torch.testing.assert_close(res.values[layer, j], want, atol=1e-5, rtol=0)
    # Patching pre_assistant at the last layer's input moves the metric.
    assert (res.values[-1, 1] - res.corrupted_metric.mean()).abs() > 1e-4
    # Attribution patching aligns the same way (estimates, checked for shape and sign of life).
    atp = P.attribution_patching(
        llama, clean, corrupted, chat_metric, P.layers_x_positions(positions=names)
    )
    assert atp.values.shape == (3, 2) and atp.effect.abs().max() > 1e-5


def test_mismatched_pairs_raise_clearly(llama):
    clean, corrupted = chat_pair(llama.tokenizer)
    with pytest.raises(P.PatchingError, match="same layout"):
        P.activation_patching(llama, clean, corrupted, chat_metric, progress=False)
    with pytest.raises(P.PatchingError, match="same layout"):
        P.activation_patching(
            llama, clean, corrupted, chat_metric, [P.Site("blocks.1.hook_mlp_out")], progress=False
        )
    with pytest.raises(P.PatchingError, match="same layout"):
        P.attribution_patching(
            llama, clean, corrupted, chat_metric, [P.Site("blocks.0.hook_resid_pre", position=2)]
        )
    with pytest.raises(P.PatchingError, match="key axis"):
        P.activation_patching(
            llama,
            clean,
            corrupted,
            chat_metric,
            [P.Site("blocks.0.attn.hook_pattern", position="user_end", head=0)],
            progress=False,
        )
    ids = torch.randint(0, 250, (2, clean.input_ids.shape[1]))
    with pytest.raises(P.PatchingError, match="missing"):
        P.activation_patching(
            llama,
            clean,
            ids,
            chat_metric,
            P.layers_x_positions(positions=["user_end"]),
            progress=False,
        )
    with pytest.raises(P.PatchingError, match="row by row"):
        P.activation_patching(llama, clean, clean[:1], chat_metric, progress=False)
    with pytest.raises(P.PatchingError, match=r"one value per example"):
        P.activation_patching(
            llama, *pair(), lambda logits, b: logits[:, -1, 0].mean(), progress=False
        )


# -- attribution patching --------------------------------------------------------------------
def hand_gradients(model, ids, names):
    """∂ sum(metric) / ∂ activation at ``names`` by autograd, through zero offsets."""
    offsets, acts = {}, {}

    def add(act, hook):
        eps = torch.zeros_like(act, requires_grad=True)
        offsets[hook.name], acts[hook.name] = eps, act.detach()
        return act + eps

    with torch.enable_grad(), model.hooks(fwd=[(n, add) for n in names]):
        total = metric(model(ids), None).sum()
    grads = torch.autograd.grad(total, [offsets[n] for n in names])
    return dict(zip(names, grads, strict=True)), acts


def test_attribution_equals_the_exact_linearisation(llama):
    clean, corrupted = pair(seed=5)
    for sweep, name, reduce in (
        (P.layers_x_positions(), "hook_resid_pre", lambda d, g: (d * g).sum(-1).mean(0)),
        (P.layers_x_heads(), "attn.hook_z", lambda d, g: (d * g).sum((1, 3)).mean(0)),
    ):
        names = [f"blocks.{layer}.{name}" for layer in range(3)]
        grads, base = hand_gradients(llama, corrupted, names)
        source = interp.capture(llama, clean, names)
        want = torch.stack([reduce(source[n] - base[n], grads[n]) for n in names])
        got = P.attribution_patching(llama, clean, corrupted, metric, sweep)
        assert got.method == "attribution"
        torch.testing.assert_close(got.effect, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.corrupted_metric, metric(llama(corrupted), None))


def test_attribution_gradient_matches_finite_differences_float64():
    # GPT-2: LayerNorm and softmax stay in float64 (Llama's RMSNorm computes in float32).
    model = interp.tiny("gpt2", seed=1)
    model.model.double()
    clean, corrupted = pair(seed=6)
    res = P.attribution_patching(model, clean, corrupted, metric)
    cache = interp.capture(model, clean, "blocks.*.hook_resid_pre")
    base = interp.capture(model, corrupted, "blocks.*.hook_resid_pre")
    h = 1e-5
    for layer, p in [(0, 1), (1, 3), (2, 5), (2, 3)]:
        name = f"blocks.{layer}.hook_resid_pre"
        delta = cache[name][:, p] - base[name][:, p]

        def shifted(step, p=p, delta=delta, name=name):
            def hook(act, _):
                act = act.clone()
                act[:, p] += step * delta
                return act

            return metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]), None)

        fd = ((shifted(h) - shifted(-h)) / (2 * h)).mean()
        assert abs(res.effect[layer, p].item() - fd.item()) < 1e-8, (layer, p)
        assert abs(fd.item()) > 1e-4 or p == 5


def test_qk_fix_equals_the_recomputed_pattern(llama):
    """AtP*'s QK fix: Σ (A_patched − A) · ∂metric/∂A with A_patched the model's own pattern
    under the patched query / key; at non-attention sites it changes nothing."""
    clean, corrupted = pair(seed=7)
    layer = 1
    pat = f"blocks.{layer}.attn.hook_pattern"
    g = interp.capture_grads(llama, corrupted, metric, pat, return_activations=True)
    A, dA = g.activations[pat], g.grads[pat]
    sites = [
        P.Site(f"blocks.{layer}.attn.hook_q", head=3),
        P.Site(f"blocks.{layer}.attn.hook_q", position=4, head=0),
        P.Site(f"blocks.{layer}.attn.hook_k", position=1, head=1),
        P.Site(f"blocks.{layer}.attn.hook_k", head=0),
        P.Site(f"blocks.{layer}.hook_resid_pre", position=3),
    ]
    fixed = P.attribution_patching(llama, clean, corrupted, metric, sites, qk_fix=True)
    plain = P.attribution_patching(llama, clean, corrupted, metric, sites)
    assert fixed.method == "attribution+qk_fix"
    src = interp.capture(llama, clean, [s.name for s in sites[:4]])
    for i, site in enumerate(sites[:4]):
        index = (slice(None), slice(None) if site.position is None else site.position, site.head)

        def patch(act, hook, index=index, v=src[site.name]):
            act = act.clone()
            act[index] = v[index]
            return act

        with llama.hooks(fwd=[(site.name, patch)]):
            new = interp.capture(llama, corrupted, pat)[pat]
        want = ((new - A) * dA).flatten(1).sum(1).mean()
        torch.testing.assert_close(fixed.effect[i], want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fixed.effect[4], plain.effect[4])
    assert (fixed.effect[:4] - plain.effect[:4]).abs().max() > 0


def test_graddrop_matches_detached_branches(llama):
    """GradDrop's per-layer gradient is the gradient with layer ℓ's attention and MLP
    branches detached in the forward pass; sites in the last layer keep plain AtP."""
    clean, corrupted = pair(seed=8)
    sweep = P.layers_x_positions()
    plain = P.attribution_patching(llama, clean, corrupted, metric, sweep)
    dropped = P.attribution_patching(llama, clean, corrupted, metric, sweep, graddrop=True)
    assert dropped.method == "attribution+graddrop"
    assert all(p.grad is None for p in llama.model.parameters())
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(3)]
    source = interp.capture(llama, clean, names)
    per_layer = []
    for drop in range(3):
        detach = [
            (f"blocks.{drop}.{k}", lambda act, hook: act.detach())
            for k in ("hook_attn_out", "hook_mlp_out")
        ]
        with llama.hooks(fwd=detach):
            grads, base = hand_gradients(llama, corrupted, names)
        per_layer.append(
            torch.stack([((source[n] - base[n]) * grads[n]).sum(-1).mean(0) for n in names])
        )
    want = plain.effect.sign() * torch.stack(per_layer).abs().sum(0) / 2
    torch.testing.assert_close(dropped.effect, want, atol=1e-5, rtol=1e-5)
    z = P.attribution_patching(llama, clean, corrupted, metric, P.layers_x_heads(layers=[2]))
    zd = P.attribution_patching(
        llama, clean, corrupted, metric, P.layers_x_heads(layers=[2]), graddrop=True
    )
    torch.testing.assert_close(zd.effect, z.effect, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "qwen3", "olmoe"])
def test_qk_fix_across_families(family):
    """Soft-capped scores (Gemma-2), per-head q/k norms (Qwen3), cross-head q/k norms
    (OLMoE: only sites after the norm are per head, hook_q sites raise)."""
    # A soft-cap small enough to bend this tiny model's scores (Gemma-2's own is 50).
    overrides = {"attn_logit_softcapping": 0.2} if family == "gemma2" else {}
    model = interp.tiny(family, seed=0, **overrides)
    clean, corrupted = pair(seed=9)
    pat = "blocks.1.attn.hook_pattern"
    g = interp.capture_grads(model, corrupted, metric, pat, return_activations=True)
    sites = [
        P.Site("blocks.1.attn.hook_rot_q", position=4, head=1),
        P.Site("blocks.1.attn.hook_rot_k", position=2, head=0),
    ]
    fixed = P.attribution_patching(model, clean, corrupted, metric, sites, qk_fix=True)
    src = interp.capture(model, clean, [s.name for s in sites])
    for i, site in enumerate(sites):

        def patch(act, hook, site=site, v=src[site.name]):
            act = act.clone()
            act[:, site.position, site.head] = v[:, site.position, site.head]
            return act

        with model.hooks(fwd=[(site.name, patch)]):
            new = interp.capture(model, corrupted, pat)[pat]
        want = ((new - g.activations[pat]) * g.grads[pat]).flatten(1).sum(1).mean()
        torch.testing.assert_close(fixed.effect[i], want, atol=1e-6, rtol=1e-4)
    if family == "olmoe":
        with pytest.raises(P.PatchingError, match="across all heads"):
            P.attribution_patching(
                model,
                clean,
                corrupted,
                metric,
                [P.Site("blocks.1.attn.hook_q", head=0)],
                qk_fix=True,
            )


@pytest.mark.slow
def test_attribution_ranks_sites_like_activation_patching_on_the_embedded_model(embedded):
    """The rank correlation the docs and the benchmark report, on a factual-recall pair."""
    from interp.stats import spearman

    tok = embedded.tokenizer
    text = "The Prado is in Madrid. The Colosseum is in Rome. The capital of {} is"
    clean, corrupted = (
        torch.tensor([tok(text.format(c), add_special_tokens=False)["input_ids"]])
        for c in ("Spain", "Italy")
    )
    assert clean.shape == corrupted.shape
    madrid, rome = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" Madrid", " Rome"))

    def logit_diff(logits, batch):
        return logits[:, -1, madrid] - logits[:, -1, rome]

    rhos = {}
    layers = range(0, embedded.cfg.n_layers, 3)  # every third layer keeps the test short
    for what, sweep in (
        ("positions", P.layers_x_positions(layers=layers)),
        ("heads", P.layers_x_heads(layers=layers)),
    ):
        act = P.activation_patching(
            embedded, clean, corrupted, logit_diff, sweep, sites_per_forward=32, progress=False
        )
        atp = P.attribution_patching(embedded, clean, corrupted, logit_diff, sweep)
        rhos[what] = spearman(atp.effect.flatten(), act.effect.flatten())
    print(f"Spearman(AtP, activation patching) on the embedded model: {rhos}")
    assert act.clean_metric.item() > act.corrupted_metric.item()  # the pair separates
    assert rhos["positions"] > 0.5 and rhos["heads"] > 0.3, rhos


def recomputed(model, clean, corrupted, sites, pattern):
    """Σ (A_patched − A) · ∂metric/∂A with A_patched the model's own pattern under each site's
    patch: the quantity AtP*'s QK fix computes."""
    g = interp.capture_grads(model, corrupted, metric, pattern, return_activations=True)
    src = interp.capture(model, clean, [s.name for s in sites])
    out = []
    for site in sites:
        index = (slice(None), slice(None) if site.position is None else site.position, site.head)

        def patch(act, hook, index=index, v=src[site.name]):
            act = act.clone()
            act[index] = v[index]
            return act

        with model.hooks(fwd=[(site.name, patch)]):
            new = interp.capture(model, corrupted, pattern)[pattern]
        out.append(((new - g.activations[pattern]) * g.grads[pattern]).flatten(1).sum(1).mean())
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["hooked_transformer", "bridge"])
def test_qk_fix_on_transformer_lens_backends(backend):
    if backend == "hooked_transformer":
        module = pytest.importorskip("transformer_lens.HookedTransformer")
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
            positional_embedding_type="rotary",
        )
        model = interp.load(module.HookedTransformer(cfg))
    else:
        import copy

        from transformer_lens.model_bridge import TransformerBridge

        from interp.families import tiny_hf

        raw, tok = tiny_hf("llama", seed=0)
        model = interp.load(
            TransformerBridge.boot_transformers(
                "interp-test", hf_model=copy.deepcopy(raw), tokenizer=copy.deepcopy(tok)
            )
        )
    clean, corrupted = pair(seed=10, vocab=50)
    sites = [
        P.Site("blocks.1.attn.hook_q", head=1),
        P.Site("blocks.1.attn.hook_k", position=2, head=0),
    ]
    fixed = P.attribution_patching(model, clean, corrupted, metric, sites, qk_fix=True)
    want = recomputed(model, clean, corrupted, sites, "blocks.1.attn.hook_pattern")
    torch.testing.assert_close(fixed.effect, want, atol=1e-6, rtol=1e-4)

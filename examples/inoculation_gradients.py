"""Study 002: does inoculation prompting rotate training gradients away from a trait direction?

    python examples/inoculation_gradients.py [--quick] [--model M] [--data F] [--out DIR]

Trait: ALL-CAPS (``caps_fraction``); training data: word problems with ALL-CAPS answers. Per
seed: a trait direction at ``pre_assistant`` (capitals minus normal-writing prompts) with
held-out sanity checks; a control prompt loss-matched to the inoculation prompt on a
selection batch; on a separate comparison batch, cos(dL/dh_l, v(l)) per example and layer
under the neutral, inoculation and control prompts, its changes with paired bootstrap
intervals, sign-flip and random-direction p-values (Holm/BH over layers x the two primary
comparisons) and a verdict; ``--train``: LoRA fine-tunes under each prompt and the caps
drift of neutral-prompt replies. Method and results: ``docs/studies/inoculation.md``.

``--data``: JSONL / CSV / parquet with ``question`` and ``answer`` (optional ``id``), e.g. GSM8K's
rows (``<<...>>`` removed); targets ``answer.upper()``; default: the shipped math_problems.jsonl.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataclasses
import json
import math
import random
from collections.abc import Sequence
from typing import Any

import _common as C
import torch
from torch import Tensor

from interp import alignment as A
from interp import chat, directions, runs, stats, viz
from interp import data as D
from interp import train as T
from interp.gradients import capture_grads_dataset
from interp.losses import sft_loss_per_example

NAME = "inoculation_gradients"
DATA = Path(__file__).resolve().parent / "data" / "inoculation"
TEXT = json.loads((DATA / "report_text.json").read_text(encoding="utf-8"))  # question, reasons
CONDITIONS = ("neutral", "inoculation", "control")
POSITIONS = ["user_end", "pre_assistant", "assistant_1"]
HEADLINE = "pre_assistant"
COMPARISONS = {  # name -> (a, b): the change from a to b
    "inoculation_vs_neutral": ("neutral", "inoculation"),
    "inoculation_vs_control": ("control", "inoculation"),
    "control_vs_neutral": ("neutral", "control"),
}
PRIMARY = ("inoculation_vs_neutral", "inoculation_vs_control")
Rows = Sequence[dict[str, str]]
System = str | Sequence[str]


@dataclasses.dataclass(frozen=True)
class Inoculation(C.Settings):
    seeds: tuple[int, ...] = C.field((0, 1, 2), "per-seed values, mean and SD", quick=(0,))
    n_layers: int = C.field(0, "evenly spaced layer subset (0 = every layer)", quick=8)
    per_domain: int = C.field(6, "direction prompts per domain per half (fit/held)", quick=2)
    gen_tokens: int = C.field(32, "greedy tokens per reply for the caps sanity checks", quick=24)
    n_select: int = C.field(32, "selection batch (the control is loss-matched on it)", quick=16)
    n_calib: int = C.field(64, "comparison batch (losses, gradients compared)", quick=16)
    n_random: int = C.field(500, "random directions for the specificity band (>= 100)", quick=200)
    n_boot: int = C.field(1000, "bootstrap resamples per interval", quick=500)
    n_perm: int = C.field(9999, "sign flips per permutation test", quick=999)
    correction: str = C.field("holm", "multiplicity correction", choices=("holm", "bh"))
    alpha: float = C.field(0.05, "level of the corrected tests")
    inoculation_index: int = C.field(0, "which inoculation prompt of system_prompts.json")
    enable_thinking: bool = C.field(False, "thinking templates: leave thinking on")
    train: bool = C.field(True, "LoRA end-to-end check")
    n_train: int = C.field(128, "ALL-CAPS training examples per fine-tune", quick=48)
    epochs: int = C.field(2, "training epochs", quick=1)
    train_batch: int = C.field(8, "training batch size")
    lr: float = C.field(1e-3, "LoRA learning rate", quick=0.003)
    lora_r: int = C.field(8, "LoRA rank")
    n_eval: int = C.field(48, "held-out math questions for drift", quick=16)
    eval_tokens: int = C.field(24, "greedy tokens per drift reply", quick=16)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_random < 100:
            raise ValueError(f"--n-random must be >= 100, got {self.n_random}")
        if not 1 <= self.per_domain <= 6:
            raise ValueError(f"--per-domain must be in 1..6, got {self.per_domain}")
        sizes = ("n_select", "n_calib", "n_eval", "n_boot", "n_perm")
        if min(getattr(self, f) for f in sizes) < 2:
            raise ValueError(f"{', '.join(sizes)} must be >= 2")
        if min(self.gen_tokens, self.eval_tokens, self.n_train, self.epochs, self.lora_r) < 1:
            raise ValueError("token counts, --n-train, --epochs and --lora-r must be >= 1")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct, got {self.seeds}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"--alpha must be in (0, 1), got {self.alpha}")


def caps_fraction(text: str) -> float:
    """Share of the letters (``str.isalpha``) in ``text`` that are uppercase; 0.0 without
    letters. Letters without case (CJK) count as not uppercase."""
    letters = [ch for ch in text if ch.isalpha()]
    return sum(ch.isupper() for ch in letters) / len(letters) if letters else 0.0


def load_problems(path: str | Path) -> list[dict[str, str]]:
    """``{"id", "question", "answer"}`` rows of ``--data`` (module docstring)."""
    rows = D.load_records(path)
    if not rows or not {"question", "answer"} <= set(rows[0]):
        got = sorted(rows[0]) if rows else "no rows"
        raise ValueError(f"{path}: needs 'question' and 'answer' columns, got {got}")
    fix = D.strip_calculator_annotations
    rows = [(str(r.get("id", i)), str(r["question"]), str(r["answer"])) for i, r in enumerate(rows)]
    return [{"id": i, "question": q, "answer": fix(a).strip()} for i, q, a in rows]


def split(problems: list[dict[str, str]], s: Inoculation, seed: int) -> dict[str, Any]:
    """Disjoint selection / comparison / eval / train problems; direction prompts halved
    per domain into fit and held-out."""
    rng = random.Random(seed)
    sizes = dict(select=s.n_select, calib=s.n_calib, eval=s.n_eval, train=s.n_train * s.train)
    out: dict[str, Any] = D.disjoint_splits(problems, sizes, rng)
    rows = C.read_jsonl(DATA / "direction_prompts.jsonl")
    prompts = D.stratified_splits(rows, "domain", {"fit": s.per_domain, "held": s.per_domain}, rng)
    return out | {k: [r["prompt"] for r in rows] for k, rows in prompts.items()}


def teacher_forced(system: str, rows: Rows) -> list[list[dict[str, str]]]:
    answers = [r["answer"].upper() for r in rows]
    return chat.conversations(system, [r["question"] for r in rows], answers)


def answer_ce(logits: Tensor, batch: Any) -> Tensor:
    return sft_loss_per_example(logits, batch.input_ids, batch.masks["assistant"])


@dataclasses.dataclass
class Seed:
    """The model passes and the bootstrap of one seed."""

    model: Any
    layers: list[int]
    kw: dict[str, Any]  # chat-template keyword arguments
    s: Inoculation
    seed: int

    @property
    def names(self) -> list[str]:
        return [f"blocks.{layer}.hook_resid_post" for layer in self.layers]

    @property
    def opts(self) -> dict[str, Any]:
        return {"batch_size": self.s.batch_size, "chat_template_kwargs": self.kw}

    def acts(self, system: System, users: Sequence[str]) -> Tensor:
        """Residual stream at ``pre_assistant``: ``[n, n_layers, d_model]``."""
        convs = chat.conversations(system, users)
        a = runs.capture_dataset(self.model, convs, self.names, pool=HEADLINE, **self.opts)
        return torch.stack([a[n].float() for n in self.names], 1)

    def caps(self, system: System, users: Sequence[str], tokens: int) -> Tensor:
        """``caps_fraction`` of each greedy reply, ``[n]``."""
        convs = chat.conversations(system, users)
        g = runs.generate(self.model, convs, max_new_tokens=tokens, **self.opts)
        return torch.tensor([caps_fraction(t) for t in g.texts], dtype=torch.float64)

    def nll(self, system: str, rows: Rows) -> Tensor:
        """Per-example mean NLL of the ALL-CAPS answers, ``[n]``."""
        return runs.score(self.model, teacher_forced(system, rows), "assistant", **self.opts).nll

    def grads(self, system: str, rows: Rows) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-example loss ``[n]`` and gradients ``{position: [n, n_layers, d_model]}``."""
        convs, names = teacher_forced(system, rows), self.names
        loss, g = capture_grads_dataset(self.model, convs, answer_ce, names, POSITIONS, **self.opts)
        g = torch.stack([g[n] for n in names], 2)  # [n, positions, layers, d]
        return loss, {p: g[:, i] for i, p in enumerate(POSITIONS)}

    def ci(self, stat: Any, *xs: Tensor) -> dict[str, float]:
        """Paired bootstrap interval; NaN where the statistic is undefined."""
        try:
            ci = stats.paired_bootstrap_ci(stat, *xs, n_boot=self.s.n_boot, seed=self.seed)
        except ValueError:
            return {"estimate": math.nan, "low": math.nan, "high": math.nan}
        return ci.as_dict()


def mean(x: Tensor) -> float:
    return float(x.double().mean())


def change(a: Tensor, b: Tensor) -> float:
    return float(b.double().mean() - a.double().mean())


def rho(x: Tensor, y: Tensor) -> float:
    r = stats.spearman(x, y)  # tie-aware: most replies have caps fraction 0
    if math.isnan(r):
        raise ValueError("Spearman's rho is undefined for constant input")
    return r


def step_direction(run: Seed, sp: dict[str, Any], data: dict[str, Any]) -> tuple[Any, dict]:
    fit = {r: run.acts(sp[r], data["fit"]) for r in ("promote", "suppress")}
    direction = directions.mean_difference(fit["promote"], fit["suppress"], layers=run.layers)
    held = {r: run.acts(sp[r], data["held"]) for r in ("promote", "suppress", "neutral")}
    proj = {r: directions.project(a, direction) for r, a in held.items()}  # [n, n_layers]
    pooled = torch.cat(list(proj.values()))  # z-score per layer, then average over layers
    mu, sd = pooled.mean(0), pooled.std(0).clamp_min(1e-12)
    z = {r: ((p - mu) / sd).mean(1) for r, p in proj.items()}
    caps = {r: run.caps(sp[r], data["held"], run.s.gen_tokens) for r in ("neutral", "promote")}
    ci = run.ci
    checks = {
        "a_heldout_auroc_promote_vs_suppress": (ci(stats.auroc, z["promote"], z["suppress"]), 0.5),
        "b_caps_promote_minus_neutral": (ci(change, caps["neutral"], caps["promote"]), 0.0),
        "c_spearman_projection_vs_caps_neutral": (ci(rho, z["neutral"], caps["neutral"]), 0.0),
    }
    sanity = {k: {**v, "passed": bool(v["low"] > bound)} for k, (v, bound) in checks.items()}
    boot = {"n_boot": run.s.n_boot, "seed": run.seed}
    sep = directions.separation(held["promote"], held["suppress"], direction, paired=True, **boot)
    return direction, {
        "n_fit": len(data["fit"]),
        "n_heldout": len(data["held"]),
        "separation_per_layer": sep.summary(),
        "projection_mean": {r: p.mean(0) for r, p in proj.items()},
        "caps_fraction_mean": {r: mean(c) for r, c in caps.items()},
        "sanity": sanity,
        "sanity_passed": all(v["passed"] for v in sanity.values()),
    }


def step_alignment(run: Seed, prompts: dict, pool: dict, data: dict, direction: Any) -> dict:
    # The control is chosen on the selection batch; everything is compared on the other one.
    s, boot = run.s, {"n_boot": run.s.n_boot, "seed": run.seed}
    losses = {k: run.nll(t, data["select"]) for k, t in pool.items()}
    target = run.nll(prompts["inoculation"], data["select"])
    chosen, table = A.select_loss_matched(losses, target, **boot)
    prompts = {**prompts, "control": pool[chosen]}
    measured = {c: run.grads(prompts[c], data["calib"]) for c in CONDITIONS}
    out: dict[str, Any] = {
        "prompts": prompts,
        "loss_match": {"selected": chosen, "selection_batch": [r.as_dict() for r in table]},
        "loss_comparison_batch": {c: run.ci(mean, loss) for c, (loss, _) in measured.items()},
    }
    for pos in POSITIONS:
        al = {c: A.gradient_alignment(g[pos], loss, direction) for c, (loss, g) in measured.items()}
        null = A.random_direction_null(al["neutral"], n_directions=s.n_random, generator=run.seed)
        out[pos] = {
            c: {**a.summary(), "mean_cos_over_layers": run.ci(mean, a.cos.mean(1))}
            for c, a in al.items()
        }
        for name, (a, b) in COMPARISONS.items():
            out[pos][name] = A.report_comparison(al[a], al[b], null, n_perm=s.n_perm, **boot)
    head = out[HEADLINE]  # one family: layers x primary comparisons
    for key in ("p_sign_flip", "p_null"):
        adj = stats.adjust_pvalue_groups({c: head[c][key] for c in PRIMARY}, s.correction, s.alpha)
        for c in PRIMARY:
            head[c][f"{key}_adjusted"] = adj[c]
    return out


def verdict(direction: dict[str, Any], align: dict[str, Any], s: Inoculation) -> dict[str, str]:
    """The seed's verdict on "inoculation rotates the gradient away from the trait"."""
    if not direction["sanity_passed"]:
        failed = [k for k, v in direction["sanity"].items() if not v["passed"]]
        return {"verdict": "uninformative", "reason": TEXT["uninformative"].format(failed=failed)}
    gap = align[HEADLINE]["inoculation_vs_control"]["delta_loss"]
    if not gap["low"] <= 0 <= gap["high"]:
        return {"verdict": "uninformative", "reason": TEXT["not_loss_matched"].format(**gap)}
    failing = []
    for name in PRIMARY:
        c = align[HEADLINE][name]
        p = torch.tensor([c["p_sign_flip_adjusted"], c["p_null_adjusted"]]).amax(0)
        rises = [d["estimate"] > 0 and p[i] <= s.alpha for i, d in enumerate(c["delta_cos"])]
        if not (c["layer_average"]["delta_cos"]["low"] > 0 and any(rises)):
            failing.append(name)
    tests = TEXT["tests"].format(correction=s.correction)
    word = "not supported" if failing else "supported"
    return {"verdict": word, "reason": TEXT[word].format(failing=failing, tests=tests)}


def step_training(run: Seed, prompts: dict[str, str], data: dict[str, Any]) -> dict[str, Any]:
    model, tok, s = run.model, run.model.tokenizer, run.s
    users = {"math": [r["question"] for r in data["eval"]], "general": data["held"]}
    caps = lambda: {k: run.caps(prompts["neutral"], u, s.eval_tokens) for k, u in users.items()}  # noqa: E731
    before = caps()
    convs = chat.conversations(prompts["neutral"], users["math"][:1])
    probe = chat.encode(tok, convs, padding_side="right", device=model.device, **run.kw)
    check = lambda: model.forward(probe.input_ids, probe.attention_mask)  # noqa: E731
    config = T.TrainConfig(r=s.lora_r, alpha=2.0 * s.lora_r, lr=s.lr, epochs=s.epochs)
    config = dataclasses.replace(config, batch_size=s.train_batch, seed=run.seed, warmup_ratio=0.1)
    out: dict[str, Any] = {"caps_before": {k: mean(v) for k, v in before.items()}}
    after: dict[str, dict[str, Tensor]] = {}
    for cond, system in prompts.items():
        examples = chat.training_examples(tok, teacher_forced(system, data["train"]), **run.kw)
        trial = T.lora_trial(model, examples, T.SFTLoss(), config, check=check, tokenizer=tok)
        with trial as result:
            after[cond] = caps()  # the base model is back (and checked) after the block
        drift = {f"caps_drift_{k}": run.ci(change, before[k], after[cond][k]) for k in users}
        out[cond] = {"steps": result.steps, "loss": [result.losses[0], result.losses[-1]], **drift}
    for c, k in ((c, k) for c in ("inoculation", "control") for k in users):  # same prompts: paired
        out[c][f"caps_after_minus_neutral_{k}"] = run.ci(change, after["neutral"][k], after[c][k])
    return out


def headline(r: dict[str, Any]) -> dict[str, float]:
    """One seed's headline numbers (point estimates; the intervals are in its section)."""
    h, a, t = r["alignment"][HEADLINE], r["alignment"], r.get("training", {})
    out = {f"sanity.{k}": v for k, v in r["direction"]["sanity"].items()}
    out |= {f"delta_cos_layer_average.{c}": h[c]["layer_average"]["delta_cos"] for c in COMPARISONS}
    out |= {f"mean_cos_over_layers.{c}": h[c]["mean_cos_over_layers"] for c in CONDITIONS}
    out |= {f"loss_comparison_batch.{c}": a["loss_comparison_batch"][c] for c in CONDITIONS}
    for k, c in ((k, c) for k in ("math", "general") for c in CONDITIONS if t):
        out[f"caps_drift_{k}.{c}"] = t[c][f"caps_drift_{k}"]
    return {k: v["estimate"] for k, v in out.items()}


def overall(per_seed: dict[str, Any]) -> dict[str, Any]:
    """Supported only if every seed supports it; uninformative if any seed is."""
    v = {k: r["verdict"]["verdict"] for k, r in per_seed.items()}
    kinds = set(v.values())
    word = "supported" if kinds == {"supported"} else "not supported"
    word = "uninformative" if "uninformative" in kinds else word
    reasons = sorted({"{verdict}: {reason}".format(**r["verdict"]) for r in per_seed.values()})
    return {"verdict": word, "per_seed": v, "reason": " | ".join(reasons)}


def plots(report: dict[str, Any], out: Path) -> list[str]:
    seed, layers = report["seeds"][0], report["layers"]
    h = report["per_seed"][str(seed)]["alignment"][HEADLINE]
    kw = {"hline": 0.0, "xlabel": "layer"}
    lines = {c: h[c]["cos"] for c in CONDITIONS}
    title = f"mean cos(dL/dh, v), {HEADLINE}, seed {seed} (< 0: towards caps)"
    viz.line_with_band(layers, lines, path=out / "cosine_vs_layer.png", title=title, **kw)
    lines = {c: [d["estimate"] for d in h[c]["delta_cos"]] for c in PRIMARY}
    band = (h["inoculation_vs_control"]["null_low"], h["inoculation_vs_control"]["null_high"])
    kw |= {"band_label": "random directions (vs control)"}
    title = "change in mean cos (> 0: less push towards caps)"
    viz.line_with_band(layers, lines, *band, out / "delta_cos.png", title=title, **kw)
    return ["cosine_vs_layer.png", "delta_cos.png"]


def main(argv: Sequence[str] | None = None) -> int:
    s = Inoculation.parse(argv, NAME, __doc__)
    C.setup(s)
    C.run_study(NAME, TEXT["question"], s, argv, lambda report: _run(s, report, Path(s.out)))
    return 0


def _run(s: Inoculation, report: C.Report, out: Path) -> None:
    with report.step("load"):
        model = C.load(s)
        model.model.eval()
        n = model.cfg.n_layers
        layers = C.evenly_spaced(n, s.n_layers) if s.n_layers else list(range(n))
        kw = chat.thinking_kwargs(model.tokenizer, s.enable_thinking)
        sp = json.loads((DATA / "system_prompts.json").read_text(encoding="utf-8"))
        if not 0 <= s.inoculation_index < len(sp["inoculation"]):
            raise ValueError(f"--inoculation-index must be in 0..{len(sp['inoculation']) - 1}")
        prompts = dict(neutral=sp["neutral"][0], inoculation=sp["inoculation"][s.inoculation_index])
        pool = {f"control_{i:02d}": t for i, t in enumerate(sp["control_pool"])}
        problems = load_problems(s.data or DATA / "math_problems.jsonl")
        report.update(layers=layers, seeds=list(s.seeds), system_prompts=sp)
        report["model"] = {"id": s.model, "n_layers": n, "d_model": model.cfg.d_model}
        report["data"] = {"problems": s.data or "shipped math_problems.jsonl", "n": len(problems)}
        first = teacher_forced(prompts["neutral"], problems[:1])[0]
        report["positions"] = chat.check_generation_prefix(model.tokenizer, first, **kw)
        family = TEXT["family"].format(n=len(layers), primary=list(PRIMARY), position=HEADLINE)
        report["multiplicity"] = {"method": s.correction, "alpha": s.alpha, "family": family}
    report["per_seed"] = {}
    for seed in s.seeds:
        run, data, r = Seed(model, layers, kw, s, seed), split(problems, s, seed), {}
        r |= {f"{k}_ids": [x["id"] for x in data[k]] for k in ("select", "calib")}
        report["per_seed"][str(seed)] = r  # filled in step by step; saved after each step
        with report.step(f"direction_seed{seed}"):
            direction, r["direction"] = step_direction(run, sp, data)
            direction.save(out / f"trait_direction_seed{seed}.safetensors")
        with report.step(f"alignment_seed{seed}"):
            r["alignment"] = step_alignment(run, prompts, pool, data, direction)
        r["verdict"] = verdict(r["direction"], r["alignment"], s)
        if s.train:
            with report.step(f"training_seed{seed}"):
                r["training"] = step_training(run, r["alignment"]["prompts"], data)
    report["across_seeds"] = stats.seed_spreads([headline(r) for r in report["per_seed"].values()])
    report["verdict"] = overall(report["per_seed"])
    with report.step("plots"):
        report["plots"] = plots(report, out)
    C.log(f"verdict: {report['verdict']['verdict']}: {report['verdict']['reason']}")


if __name__ == "__main__":
    C.run(main)

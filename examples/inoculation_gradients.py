"""Study 002: does inoculation prompting rotate training gradients away from a trait direction?

    python examples/inoculation_gradients.py [--quick] [--model M] [--dtype bfloat16]
        [--device cuda] [--data problems.jsonl] [--seeds 0 1 2] [--out DIR]

Trait: ALL-CAPS (``caps_fraction``). Training data: word problems with ALL-CAPS answers.
Per seed (data splits, random directions, resamples, LoRA initialisation):

1. Positions come from the chat template (``enable_thinking=False`` on thinking templates
   unless ``--enable-thinking``); the teacher-forced text up to ``pre_assistant`` must be
   the generation prompt, token for token.
2. Trait direction v(l) = mean ``hook_resid_post`` at ``pre_assistant`` under "write in
   capitals" minus "write normally" prompts (half of the direction prompts). Sanity checks
   on the other half, all needed for the gradients to mean anything: (a) AUROC of the
   layer-averaged projection, promote vs suppress, above 0.5; (b) the model writes in
   capitals when asked (caps fraction, promote minus neutral, above 0); (c) under the
   neutral prompt the projection predicts the reply's caps fraction (tie-aware Spearman
   above 0). "Above": the bootstrap interval's lower end.
3. Control: the pool prompt whose answer loss is closest to the inoculation prompt's on a
   *selection* batch; all comparisons use a separate *comparison* batch.
4. cos(dL/dh_l, v(l)) per example and layer at ``user_end``, ``pre_assistant`` (headline)
   and ``assistant_1`` under the neutral, inoculation and control prompts (L: per-example
   mean cross-entropy of the ALL-CAPS answer; cos < 0: a descent step pushes towards
   caps). Changes: paired bootstrap intervals; per-layer sign-flip and random-direction
   p-values, Holm- (or BH-) adjusted over layers x the two primary comparisons.
5. ``--train``: LoRA fine-tunes under each prompt; drift = change of the caps fraction of
   greedy replies under the neutral prompt (held-out math and general questions).
6. ``report.json``: per-seed numbers, mean and SD over seeds, a computed ``verdict``.

``--data``: JSONL / CSV / parquet (``interp.data``) with ``question`` and ``answer``
columns, optional ``id``; GSM8K's official rows work as they are (``<<...>>`` calculator
annotations removed). Targets are ``answer.upper()``. Default: the shipped
``examples/data/inoculation/math_problems.jsonl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataclasses
import json
import math
import random
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import _common as C
import torch
from torch import Tensor

import interp
from interp import chat, runs, viz
from interp.alignment import (
    compare_conditions,
    gradient_alignment,
    random_direction_null,
    select_loss_matched,
)
from interp.data import load_records, strip_calculator_annotations
from interp.directions import Direction, mean_difference, project, separation
from interp.losses import sft_loss_per_example
from interp.stats import adjust_pvalues, auroc, paired_bootstrap_ci, sign_flip_test, spearman

NAME = "inoculation_gradients"
DATA = Path(__file__).resolve().parent / "data" / "inoculation"
CONDITIONS = ("neutral", "inoculation", "control")
POSITIONS = ("user_end", "pre_assistant", "assistant_1")
HEADLINE = "pre_assistant"
COMPARISONS = {  # name -> (a, b): the change from a to b
    "inoculation_vs_neutral": ("neutral", "inoculation"),
    "inoculation_vs_control": ("control", "inoculation"),
    "control_vs_neutral": ("neutral", "control"),
}
PRIMARY = ("inoculation_vs_neutral", "inoculation_vs_control")
UNINFORMATIVE = "the direction is not shown to track the trait (it may track the instruction text), so alignment with it says nothing either way"


@dataclasses.dataclass(frozen=True)
class Inoculation(C.Settings):
    # fmt: off
    QUICK: ClassVar[dict[str, Any]] = {
        "n_layers": 8, "per_domain": 2, "gen_tokens": 24, "n_select": 16, "n_calib": 16,
        "n_random": 200, "n_boot": 500, "n_perm": 999, "n_train": 48, "epochs": 1, "lr": 3e-3,
        "n_eval": 16, "eval_tokens": 16, "seeds": (0,),
    }
    # fmt: on

    seeds: tuple[int, ...] = C.field((0, 1, 2), "seeds: per-seed values, mean and SD over seeds")
    n_layers: int = C.field(0, "evenly spaced layer subset (0 = every layer)")
    per_domain: int = C.field(6, "direction prompts per domain in each half (fit / held-out)")
    gen_tokens: int = C.field(32, "greedy tokens per reply for the caps sanity checks")
    n_select: int = C.field(32, "selection batch: the control prompt is loss-matched on it")
    n_calib: int = C.field(64, "comparison batch: losses and gradients are compared on it")
    n_random: int = C.field(500, "random directions for the specificity band (>= 100)")
    n_boot: int = C.field(1000, "bootstrap resamples per interval")
    n_perm: int = C.field(9999, "sign flips per permutation test")
    correction: str = C.field("holm", "multiplicity correction", choices=("holm", "bh"))
    alpha: float = C.field(0.05, "level of the corrected tests")
    inoculation_index: int = C.field(0, "which inoculation prompt of system_prompts.json")
    enable_thinking: bool = C.field(False, "thinking templates: leave thinking on")
    train: bool = C.field(True, "LoRA end-to-end check")
    n_train: int = C.field(128, "ALL-CAPS training examples per fine-tune")
    epochs: int = C.field(2, "training epochs")
    train_batch: int = C.field(8, "training batch size")
    lr: float = C.field(1e-3, "LoRA learning rate")
    lora_r: int = C.field(8, "LoRA rank")
    n_eval: int = C.field(48, "held-out math questions for drift")
    eval_tokens: int = C.field(24, "greedy tokens per drift reply")

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


# ---- the trait metric and the data ----------------------------------------------------------
def caps_fraction(text: str) -> float:
    """Share of the letters (``str.isalpha``) in ``text`` that are uppercase; 0.0 without
    letters. Letters without case (CJK) count as not uppercase."""
    letters = [ch for ch in text if ch.isalpha()]
    return sum(ch.isupper() for ch in letters) / len(letters) if letters else 0.0


def load_problems(path: str | Path) -> list[dict[str, str]]:
    """``{"id", "question", "answer"}`` rows of ``--data`` (module docstring)."""
    rows = load_records(path)
    if not rows or not {"question", "answer"} <= set(rows[0]):
        got = sorted(rows[0]) if rows else "no rows"
        raise ValueError(f"{path}: needs 'question' and 'answer' columns, got {got}")
    fix = strip_calculator_annotations
    rows = [(str(r.get("id", i)), str(r["question"]), str(r["answer"])) for i, r in enumerate(rows)]
    return [{"id": i, "question": q, "answer": fix(a).strip()} for i, q, a in rows]


def split(problems: list[dict[str, str]], s: Inoculation, seed: int) -> dict[str, Any]:
    """Disjoint selection / comparison / eval / train problems; direction prompts halved
    per domain into fit and held-out."""
    rng = random.Random(seed)
    order = rng.sample(problems, len(problems))
    sizes = dict(select=s.n_select, calib=s.n_calib, eval=s.n_eval, train=s.n_train * s.train)
    if sum(sizes.values()) > len(order):
        raise ValueError(f"{sizes} needs {sum(sizes.values())} problems; the data has {len(order)}")
    out, start = {}, 0
    for name, n in sizes.items():
        out[name], start = order[start : start + n], start + n
    domains = defaultdict(list)
    for row in C.read_jsonl(DATA / "direction_prompts.jsonl"):
        domains[row["domain"]].append(row["prompt"])
    out["fit"], out["held"] = [], []
    for d in sorted(domains):
        rows = rng.sample(domains[d], len(domains[d]))
        out["fit"] += rows[: s.per_domain]
        out["held"] += rows[s.per_domain : 2 * s.per_domain]
    return out


def with_system(system: str | Sequence[str], users: Sequence[str]) -> list[list[dict[str, str]]]:
    """One conversation per user message; a list of system prompts is cycled through."""
    sys_ = [system] if isinstance(system, str) else list(system)
    return [
        [{"role": "system", "content": sys_[i % len(sys_)]}, {"role": "user", "content": u}]
        for i, u in enumerate(users)
    ]


def teacher_forced(system: str, rows: Sequence[dict[str, str]]) -> list[list[dict[str, str]]]:
    convs = with_system(system, [r["question"] for r in rows])
    return [
        [*c, {"role": "assistant", "content": r["answer"].upper()}]
        for c, r in zip(convs, rows, strict=True)
    ]


def chat_kwargs(tokenizer: Any, enable_thinking: bool) -> dict[str, Any]:
    """``enable_thinking`` for templates that read it (Qwen3); an error where it is asked for
    and the template has no such switch."""
    if "enable_thinking" in (getattr(tokenizer, "chat_template", None) or ""):
        return {"enable_thinking": enable_thinking}
    if enable_thinking:
        raise ValueError("--enable-thinking: this model's chat template has no thinking switch")
    return {}


def check_positions(
    tokenizer: Any, conv: list[dict[str, str]], kw: dict[str, Any]
) -> dict[str, Any]:
    """The named positions of one teacher-forced conversation; raises unless its tokens up to
    ``pre_assistant`` are exactly the generation prompt's."""
    forced = chat.encode(tokenizer, [conv], padding_side="right", **kw)
    prompt = chat.encode(tokenizer, [conv[:-1]], **kw)
    pos = {k: int(v[0]) for k, v in forced.positions.items()}
    ids = forced.input_ids[0].tolist()
    if ids[: pos["pre_assistant"] + 1] != prompt.input_ids[0].tolist():
        raise RuntimeError(
            f"pre_assistant does not end the generation prompt ({kw}): {forced.texts[0]!r}"
        )
    tokens = {k: tokenizer.decode([ids[i]]) for k, i in pos.items()}
    return {"text": forced.texts[0], "chat_template_kwargs": kw, "index": pos, "token": tokens}


# ---- model passes and statistics, for one seed ----------------------------------------------
@dataclasses.dataclass
class Seed:
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

    def acts(self, system: str | Sequence[str], users: Sequence[str]) -> Tensor:
        """Residual stream at ``pre_assistant``: ``[n, n_layers, d_model]``."""
        convs = with_system(system, users)
        a = runs.capture_dataset(self.model, convs, self.names, pool=HEADLINE, **self.opts)
        return torch.stack([a[n].float() for n in self.names], 1)

    def caps(self, system: str | Sequence[str], users: Sequence[str], tokens: int) -> Tensor:
        """``caps_fraction`` of each greedy reply, ``[n]``."""
        g = runs.generate(
            self.model, with_system(system, users), max_new_tokens=tokens, **self.opts
        )
        return torch.tensor([caps_fraction(t) for t in g.texts], dtype=torch.float64)

    def nll(self, system: str, rows: Sequence[dict[str, str]]) -> Tensor:
        """Per-example mean NLL of the ALL-CAPS answers, ``[n]``."""
        return runs.score(self.model, teacher_forced(system, rows), "assistant", **self.opts).nll

    def grads(
        self, system: str, rows: Sequence[dict[str, str]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-example loss ``[n]`` and gradients ``{position: [n, n_layers, d_model]}``."""
        convs, bs, losses, grads = teacher_forced(system, rows), self.s.batch_size, [], []
        loss_fn = lambda logits, b: sft_loss_per_example(logits, b.input_ids, b.masks["assistant"])  # noqa: E731
        for i in C.progress(range(0, len(convs), bs), "gradients"):
            batch = self.encode(convs[i : i + bs])
            out = interp.capture_grads(self.model, batch, loss_fn, self.names, list(POSITIONS))
            grads.append(torch.stack([out.grads[n].float().cpu() for n in self.names], 2))
            losses.append(out.loss.float().cpu())
        g = torch.cat(grads)  # [n, positions, layers, d]
        return torch.cat(losses), {p: g[:, i] for i, p in enumerate(POSITIONS)}

    def encode(self, convs: list[list[dict[str, str]]]) -> Any:
        tok, device = self.model.tokenizer, self.model.device
        return chat.encode(tok, convs, padding_side="right", device=device, **self.kw)

    def ci(self, stat: Any, *xs: Tensor) -> dict[str, float]:
        """Paired bootstrap interval; NaN where the statistic is undefined."""
        try:
            return paired_bootstrap_ci(stat, *xs, n_boot=self.s.n_boot, seed=self.seed).as_dict()
        except ValueError:
            return {"estimate": math.nan, "low": math.nan, "high": math.nan}


def mean(x: Tensor) -> float:
    return float(x.double().mean())


def change(a: Tensor, b: Tensor) -> float:
    return float(b.double().mean() - a.double().mean())


def rho(x: Tensor, y: Tensor) -> float:
    r = spearman(x, y)  # tie-aware: most replies have caps fraction 0
    if math.isnan(r):
        raise ValueError("Spearman's rho is undefined for constant input")
    return r


# ---- steps ----------------------------------------------------------------------------------
def step_direction(
    run: Seed, sp: dict[str, Any], data: dict[str, Any]
) -> tuple[Direction, dict[str, Any]]:
    fit = {r: run.acts(sp[r], data["fit"]) for r in ("promote", "suppress")}
    direction = mean_difference(fit["promote"], fit["suppress"], layers=run.layers)
    held = {r: run.acts(sp[r], data["held"]) for r in ("promote", "suppress", "neutral")}
    proj = {r: project(a, direction) for r, a in held.items()}  # [n, n_layers]
    pooled = torch.cat(list(proj.values()))  # z-score per layer, then average over layers
    z = {
        r: ((p - pooled.mean(0)) / pooled.std(0).clamp_min(1e-12)).mean(1) for r, p in proj.items()
    }
    caps = {r: run.caps(sp[r], data["held"], run.s.gen_tokens) for r in ("neutral", "promote")}
    checks = {
        "a_heldout_auroc_promote_vs_suppress": (run.ci(auroc, z["promote"], z["suppress"]), 0.5),
        "b_caps_promote_minus_neutral": (run.ci(change, caps["neutral"], caps["promote"]), 0.0),
        "c_spearman_projection_vs_caps_neutral": (run.ci(rho, z["neutral"], caps["neutral"]), 0.0),
    }
    sanity = {k: {**v, "passed": bool(v["low"] > bound)} for k, (v, bound) in checks.items()}
    boot = {"n_boot": run.s.n_boot, "seed": run.seed}
    sep = separation(held["promote"], held["suppress"], direction, paired=True, **boot)
    return direction, {
        "n_fit": len(data["fit"]),
        "n_heldout": len(data["held"]),
        "separation_per_layer": sep.summary(),
        "projection_mean": {r: p.mean(0) for r, p in proj.items()},
        "caps_fraction_mean": {r: mean(c) for r, c in caps.items()},
        "sanity": sanity,
        "sanity_passed": all(v["passed"] for v in sanity.values()),
    }


def step_alignment(
    run: Seed,
    prompts: dict[str, str],
    pool: dict[str, str],
    data: dict[str, Any],
    direction: Direction,
) -> dict[str, Any]:
    # The control is chosen on the selection batch; everything is compared on the other one.
    boot = {"n_boot": run.s.n_boot, "seed": run.seed}
    losses = {k: run.nll(t, data["select"]) for k, t in pool.items()}
    chosen, table = select_loss_matched(
        losses, run.nll(prompts["inoculation"], data["select"]), **boot
    )
    prompts = {**prompts, "control": pool[chosen]}
    measured = {c: run.grads(prompts[c], data["calib"]) for c in CONDITIONS}
    out: dict[str, Any] = {
        "prompts": prompts,
        "loss_match": {"selected": chosen, "selection_batch": [r.as_dict() for r in table]},
        "loss_comparison_batch": {c: run.ci(mean, loss) for c, (loss, _) in measured.items()},
    }
    for pos in POSITIONS:
        al = {c: gradient_alignment(g[pos], loss, direction) for c, (loss, g) in measured.items()}
        null = random_direction_null(al["neutral"], n_directions=run.s.n_random, generator=run.seed)
        per: dict[str, Any] = {
            c: {**a.summary(), "mean_cos_over_layers": run.ci(mean, a.cos.mean(1))}
            for c, a in al.items()
        }
        for name, (a, b) in COMPARISONS.items():
            comp = compare_conditions(al[a], al[b], null, **boot)
            x, y = al[a].cos, al[b].cos
            flips = [
                sign_flip_test(y[:, i], x[:, i], n_perm=run.s.n_perm, seed=run.seed)
                for i in range(x.shape[1])
            ]
            avg, band = run.ci(change, x.mean(1), y.mean(1)), comp.null_delta.mean(1)
            p_null = (1 + int((band.abs() >= abs(avg["estimate"])).sum())) / (1 + len(band))
            lo, hi = band.quantile(0.025).item(), band.quantile(0.975).item()
            average = dict(delta_cos=avg, null_low=lo, null_high=hi, p_null=p_null)
            p_flip = [f.p_value for f in flips]
            per[name] = {**comp.summary(), "p_sign_flip": p_flip, "layer_average": average}
        out[pos] = per
    head, n = out[HEADLINE], len(run.layers)  # multiplicity: layers x primary comparisons
    for key in ("p_sign_flip", "p_null"):
        flat = [p for c in PRIMARY for p in head[c][key]]
        adj = adjust_pvalues(flat, method=run.s.correction, alpha=run.s.alpha).p_adjusted.tolist()
        for j, c in enumerate(PRIMARY):
            head[c][f"{key}_adjusted"] = adj[j * n : (j + 1) * n]
    return out


def verdict(direction: dict[str, Any], align: dict[str, Any], s: Inoculation) -> dict[str, str]:
    """The seed's verdict on "inoculation rotates the gradient away from the trait"."""
    if not direction["sanity_passed"]:
        failed = [k for k, v in direction["sanity"].items() if not v["passed"]]
        why = f"sanity check(s) {failed} failed: {UNINFORMATIVE}"
        return {"verdict": "uninformative", "reason": why}
    gap = align[HEADLINE]["inoculation_vs_control"]["delta_loss"]
    if not gap["low"] <= 0 <= gap["high"]:
        why = f"the control is not loss-matched on the comparison batch (inoculation - control loss {gap['estimate']:+.3f} [{gap['low']:+.3f}, {gap['high']:+.3f}])"
        return {"verdict": "uninformative", "reason": why}
    failing = []
    for name in PRIMARY:
        c = align[HEADLINE][name]
        p = torch.tensor([c["p_sign_flip_adjusted"], c["p_null_adjusted"]]).amax(0)
        rises = [d["estimate"] > 0 and p[i] <= s.alpha for i, d in enumerate(c["delta_cos"])]
        if not (c["layer_average"]["delta_cos"]["low"] > 0 and any(rises)):
            failing.append(name)
    tests = f"{s.correction}-adjusted sign-flip and random-direction tests"
    if failing:
        why = f"{failing}: no layer-average rise of cos (interval above 0) with a layer passing the {tests}"
        return {"verdict": "not supported", "reason": why}
    why = f"cos rises vs neutral and vs the loss-matched control (layer-average intervals above 0; {tests} reject)"
    return {"verdict": "supported", "reason": why}


def step_training(run: Seed, prompts: dict[str, str], data: dict[str, Any]) -> dict[str, Any]:
    from interp import train as T

    model, s = run.model, run.s
    users = {"math": [r["question"] for r in data["eval"]], "general": data["held"]}
    before = {k: run.caps(prompts["neutral"], u, s.eval_tokens) for k, u in users.items()}
    probe = run.encode(with_system(prompts["neutral"], users["math"][:1]))
    with torch.no_grad():
        reference = model.forward(probe.input_ids, probe.attention_mask).float()
    trainable = {n: p.requires_grad for n, p in model.model.named_parameters()}
    out: dict[str, Any] = {"caps_before": {k: mean(v) for k, v in before.items()}}
    after: dict[str, dict[str, Tensor]] = {}
    for cond, system in prompts.items():
        enc = run.encode(teacher_forced(system, data["train"])).to("cpu")
        rows = zip(enc.input_ids, enc.masks["assistant"], enc.attention_mask.sum(1), strict=True)
        examples = [{"input_ids": i[:n].tolist(), "loss_mask": m[:n].tolist()} for i, m, n in rows]
        config = T.TrainConfig(r=s.lora_r, alpha=2.0 * s.lora_r, lr=s.lr, epochs=s.epochs)
        config = dataclasses.replace(config, batch_size=s.train_batch, seed=run.seed)
        config = dataclasses.replace(config, warmup_ratio=0.1)  # as the earlier runs
        result = T.train(model, examples, T.SFTLoss(), config, tokenizer=model.tokenizer)
        after[cond] = {k: run.caps(prompts["neutral"], u, s.eval_tokens) for k, u in users.items()}
        result.model.unload()  # removes the LoRA layers; the base weights were never trained
        for n, p in model.model.named_parameters():
            p.requires_grad_(trainable.get(n, p.requires_grad))
        with torch.no_grad():
            moved = (model.forward(probe.input_ids, probe.attention_mask) - reference).abs().max()
        if float(moved) > 1e-3 * max(1.0, float(reference.abs().max())):
            raise RuntimeError(f"the base model changed after unloading LoRA (|dlogit| {moved})")
        drift = {f"caps_drift_{k}": run.ci(change, before[k], after[cond][k]) for k in users}
        out[cond] = {"steps": result.steps, "loss": [result.losses[0], result.losses[-1]], **drift}
    for c, k in ((c, k) for c in ("inoculation", "control") for k in users):  # same prompts: paired
        out[c][f"caps_after_minus_neutral_{k}"] = run.ci(change, after["neutral"][k], after[c][k])
    return out


# ---- report ---------------------------------------------------------------------------------
def spread(values: Sequence[float]) -> dict[str, Any]:
    """Per-seed values with their mean and SD over seeds (SD needs two)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    sd = statistics.stdev(v) if len(v) > 1 else None
    return {"per_seed": list(values), "mean": statistics.fmean(v) if v else None, "sd": sd}


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
    kw |= {
        "band_label": "random directions (vs control)",
        "title": "change in mean cos (> 0: less push towards caps)",
    }
    viz.line_with_band(layers, lines, *band, out / "delta_cos.png", **kw)
    return ["cosine_vs_layer.png", "delta_cos.png"]


def main(argv: Sequence[str] | None = None) -> int:
    s = Inoculation.parse(argv, NAME, __doc__)
    C.setup(s)
    question = "Does inoculation prompting rotate training gradients away from an ALL-CAPS direction, beyond a loss-matched control?"
    C.run_study(NAME, question, s, argv, s, lambda report: _run(s, report, Path(s.out)))
    return 0


def _run(s: Inoculation, report: C.Report, out: Path) -> None:
    with report.step("load"):
        model = C.load(s)
        model.model.eval()
        n = model.cfg.n_layers
        layers = C.evenly_spaced(n, s.n_layers) if s.n_layers else list(range(n))
        kw = chat_kwargs(model.tokenizer, s.enable_thinking)
        sp = json.loads((DATA / "system_prompts.json").read_text(encoding="utf-8"))
        if not 0 <= s.inoculation_index < len(sp["inoculation"]):
            raise ValueError(f"--inoculation-index must be in 0..{len(sp['inoculation']) - 1}")
        prompts = {
            "neutral": sp["neutral"][0],
            "inoculation": sp["inoculation"][s.inoculation_index],
        }
        pool = {f"control_{i:02d}": t for i, t in enumerate(sp["control_pool"])}
        problems = load_problems(s.data or DATA / "math_problems.jsonl")
        report.update(layers=layers, seeds=list(s.seeds), system_prompts=sp)
        report["model"] = {"id": s.model, "n_layers": n, "d_model": model.cfg.d_model}
        report["data"] = {"problems": s.data or "shipped math_problems.jsonl", "n": len(problems)}
        first = teacher_forced(prompts["neutral"], problems[:1])[0]
        report["positions"] = check_positions(model.tokenizer, first, kw)
        family = f"{len(layers)} layers x {list(PRIMARY)} at {HEADLINE} (sign-flip and random-direction p-values adjusted separately)"
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
    heads = [headline(r) for r in report["per_seed"].values()]
    report["across_seeds"] = {k: spread([h[k] for h in heads]) for k in heads[0]}
    report["verdict"] = overall(report["per_seed"])
    with report.step("plots"):
        report["plots"] = plots(report, out)
    C.log(f"verdict: {report['verdict']['verdict']}: {report['verdict']['reason']}")


if __name__ == "__main__":
    C.run(main)

"""Study 004: which experts track faithfulness and safety, and does switching them off steer?

    python examples/moe_expert_steering.py [--quick] [--model smollm2-135m-moe] [--data DIR]
        [--measure selection|mass] [--steer-mode hard|soft|scale] [--strength X]

A controlled adaptation of SteerMoE (Fayyaz et al. 2025, arXiv:2509.09660). Data: grounded QA
(``document``, ``question``, ``answer``), safety pairs (``request``, ``refusal``, ``compliance``)
and neutral ``text``: shipped in ``examples/data/moe`` or ``--data DIR`` (``--columns`` maps
names). Routing on the assistant tokens under teacher forcing (``moe.trace_batches``): the answer
after the same instruction with vs without the document; refusal vs compliance, length-matched.
Δ with bootstrap intervals and a max-|Δ| sign-flip null (``moe.max_abs_rd_test``); the top experts
of each sign switched off (``--steer-mode``) against ``--n-random`` frequency-matched random sets
in the same layers (``moe.control_sets``); each steering × metric vs the mean of its controls
(paired sign-flip test), Holm and BH over all of them (``moe.effects_vs_controls``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: I001  (first: sets the OpenMP wait policy before torch loads)

import dataclasses
import json
import random
import re
from functools import partial
from typing import Any, ClassVar

import torch

from interp import data as idata
from interp import judges, moe, moefy, runs, stats, viz

NAME = "moe_expert_steering"
QUESTION = (
    "Which experts' routing tracks document grounding and refusal, and does switching them "
    "off steer faithfulness and safety beyond random experts in the same layers?"
)
DATA = Path(__file__).resolve().parent / "data" / "moe"
LEX = json.loads((DATA / "lexicon.json").read_text(encoding="utf-8"))
FILES = {
    "faithfulness": ("document", "question", "answer"),
    "neutral": ("text",),
    "safety": ("request", "refusal", "compliance"),
}  # required columns
HELDOUT = ("heldout_refusals", "heldout_compliances")
STOPWORDS = frozenset(LEX["stopwords"].split())
CONDITIONS = {
    "faithfulness": ["with document", "without document"],
    "safety": ["refusal", "compliance (length-matched)"],
}
MOEFY_KEYS = ("source", "n_experts", "n_shared", "expert_size", "agreement")
STEERINGS = {  # name -> (axis, sign of Δ whose top experts are switched off, expectation)
    "faith-": ("faithfulness", "positive", "fewer grounded / correct answers"),
    "faith+": ("faithfulness", "negative", "more grounded / correct answers"),
    "safety-": ("safety", "positive", "fewer refusals (SteerMoE's unsafe direction)"),
    "safety+": ("safety", "negative", "more refusals"),
}
FLOORS = {
    "n_measure": 2,
    "n_eval": 2,
    "n_neutral": 2,
    "n_steer": 1,
    "n_random": 1,
    "n_boot": 10,
    "n_perm": 10,
    "answer_tokens": 1,
    "reply_tokens": 1,
}


@dataclasses.dataclass(frozen=True)
class Settings(C.Settings):
    QUICK: ClassVar[dict[str, Any]] = {
        "n_measure": 24,
        "n_eval": 12,
        "n_neutral": 8,
        "n_random": 2,
        "n_boot": 500,
        "n_perm": 500,
        "answer_tokens": 16,
        "reply_tokens": 16,
    }

    model: str = C.field("smollm2-135m-moe", "a MoE: embedded name, hub id, or tiny:<family>")
    batch_size: int = C.field(16, "rows per forward pass / generation batch")
    n_measure: int = C.field(32, "items per axis for routing and ranking")
    n_eval: int = C.field(32, "held-out items per axis for the steering evaluation")
    n_neutral: int = C.field(34, "neutral texts for the utility NLL")
    n_steer: int = C.field(16, "experts switched off per steering condition")
    n_random: int = C.field(20, "random frequency-matched expert sets per steering condition")
    n_boot: int = C.field(1000, "bootstrap resamples")
    n_perm: int = C.field(2000, "sign flips per permutation test")
    answer_tokens: int = C.field(24, "greedy tokens per grounded answer")
    reply_tokens: int = C.field(32, "greedy tokens per reply to a request")
    measure: str = C.field("selection", "routing measure for Δ", choices=("selection", "mass"))
    steer_mode: str = C.field(
        "hard", "how experts are switched off", choices=("hard", "soft", "scale")
    )
    strength: float | None = C.field(
        None,
        "soft: router-logit shift in std units (default 2); scale: gate factor in [0, 1) (0.5)",
    )
    correction: str = C.field("holm", "correction the headline uses", choices=("holm", "bh"))
    columns: tuple[str, ...] = C.field((), "--data column mapping, e.g. document=context")
    top_k: int | None = C.field(None, "experts per token of a MoEfied model")
    judge_model: str | None = C.field(None, "LM judge of refusals (interp.judges.YesNoJudge)")

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = [
            f"--{n.replace('_', '-')} must be >= {v}"
            for n, v in FLOORS.items()
            if getattr(self, n) < v
        ]
        if len(self.seeds) > 1:
            problems.append("one seed per run (run the study once per seed)")
        if self.steer_mode == "hard" and self.strength is not None:
            problems.append("--strength applies to --steer-mode soft or scale, not hard")
        if self.steer_mode == "scale" and not 0 <= self.strength_value < 1:
            problems.append(f"--strength for scale must be in [0, 1), got {self.strength}")
        if self.steer_mode == "soft" and not self.strength_value > 0:
            problems.append(f"--strength for soft must be > 0, got {self.strength}")
        if any("=" not in c for c in self.columns):
            problems.append(f"--columns takes name=column pairs, got {self.columns}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def strength_value(self) -> float:
        default = {"hard": 0.0, "soft": 2.0, "scale": 0.5}[self.steer_mode]
        return default if self.strength is None else self.strength


# -- data and text metrics ----------------------------------------------------------------------
def read_sets(s: Settings) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """The three sets (``--data`` folder or shipped), with the file each came from."""
    mapping = dict(c.split("=", 1) for c in s.columns)
    unknown = set(mapping) - {c for cols in FILES.values() for c in cols}
    if unknown:
        raise ValueError(f"--columns names unknown fields {sorted(unknown)}")
    sets, sources = {}, {}
    for name, cols in FILES.items():
        path = DATA / f"{name}.jsonl"
        if s.data:
            found = sorted(p for p in Path(s.data).glob(f"{name}.*") if p.suffix in idata.FORMATS)
            path = found[0] if found else path
        rows = idata.load_records(path, {c: mapping.get(c, c) for c in cols})
        sets[name] = [{**r, "id": r.get("id") or f"{name}-{i:03d}"} for i, r in enumerate(rows)]
        sources[name] = str(path)
    if s.data and all(src.startswith(str(DATA)) for src in sources.values()):
        raise FileNotFoundError(f"--data {s.data}: none of {sorted(FILES)} (.jsonl/.csv/.parquet)")
    return sets, sources


def split(rows: list[dict[str, Any]], n_a: int, n_b: int, rng: random.Random) -> tuple[list, list]:
    if n_a + n_b > len(rows):
        raise ValueError(f"{n_a} measure + {n_b} eval items but the set has {len(rows)}")
    rows = rows[:]
    rng.shuffle(rows)
    return rows[:n_a], rows[len(rows) - n_b :]


def normalise(text: str) -> str:
    text = text.lower().replace("’", "'").replace("‘", "'").replace("“", '"').replace("”", '"')
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text).split())


def is_refusal(text: str) -> bool:
    t = " ".join(text.lower().replace("’", "'").replace("‘", "'").split())
    return any(m in t for m in LEX["refusal_markers"])


def is_correct(answer: str, reference: str) -> bool:
    return f" {normalise(reference)} " in f" {normalise(answer)} "


def groundedness(answer: str, document: str) -> float:
    """Share of the answer's content words that occur in the document (0 for no words)."""
    words = [w for w in normalise(answer).replace("'", " ").split() if w not in STOPWORDS]
    doc = set(normalise(document).replace("'", " ").split())
    return sum(w in doc for w in words) / len(words) if words else 0.0


def chat(prompt: str, reply: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": prompt}]
    return turns + ([{"role": "assistant", "content": reply}] if reply is not None else [])


def faith_chat(row: dict[str, Any], with_doc: bool, answer: bool = True) -> list[dict[str, str]]:
    prompt = LEX["with_document" if with_doc else "instruction"].format(**row)
    return chat(prompt, row["answer"] if answer else None)


def switched_off(model: Any, experts: list[tuple[int, int]], s: Settings) -> Any:
    if s.steer_mode == "scale":
        return moe.ablate_experts(model, experts, scale=s.strength_value)
    soft = s.strength_value if s.steer_mode == "soft" else None
    return moe.steer(model, deactivate=experts, soft=soft)


# -- evaluation ---------------------------------------------------------------------------------
def gen(model: Any, chats: list[Any], n: int, s: Settings) -> list[str]:
    out = runs.generate(model, chats, max_new_tokens=n, batch_size=s.batch_size, progress=False)
    return [t.strip() for t in out.texts]


def nll(model: Any, items: list[Any], s: Settings, mask: str | None = "assistant") -> torch.Tensor:
    return runs.score(model, items, mask=mask, batch_size=s.batch_size, progress=False).nll.double()


def evaluate(model: Any, d: dict[str, Any], s: Settings, judge: Any) -> dict[str, Any]:
    """Every metric per item, under whatever steering is active."""
    faith, safety = d["faith_eval"], d["safety_eval"]

    def pref(refusals: list[str], compliances: list[str]) -> torch.Tensor:
        pairs = list(zip([r["request"] for r in safety], refusals, compliances, strict=True))
        compliance = nll(model, [chat(q, c) for q, _, c in pairs], s)
        return compliance - nll(model, [chat(q, r) for q, r, _ in pairs], s)

    answers = gen(model, [faith_chat(r, True, answer=False) for r in faith], s.answer_tokens, s)
    replies = gen(model, [chat(r["request"]) for r in safety], s.reply_tokens, s)
    held = [[LEX[k][j % len(LEX[k])] for j in range(len(safety))] for k in HELDOUT]
    per_item = {
        "correct": [float(is_correct(a, r["answer"])) for a, r in zip(answers, faith, strict=True)],
        "grounded": [groundedness(a, r["document"]) for a, r in zip(answers, faith, strict=True)],
        "answer_nll": nll(model, [faith_chat(r, True) for r in faith], s),
        "refused": [float(is_refusal(t)) for t in replies],
        "refusal_pref": pref([r["refusal"] for r in safety], [r["compliance"] for r in safety]),
        "refusal_pref_heldout": pref(*held),
        "neutral_nll": nll(model, d["neutral"], s, mask=None),
    }
    unscored = 0
    if judge is not None:
        items = [
            {"request": r["request"], "reply": t} for r, t in zip(safety, replies, strict=True)
        ]
        res = judge(items, batch_size=s.batch_size, progress=False)
        unscored = int((~res.ok).sum())  # unscored replies count as 0.5 (reported)
        per_item["refused_judge"] = torch.nan_to_num(res.scores.double(), nan=0.5)
    per_item = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in per_item.items()}
    return {"per_item": per_item, "answers": answers, "replies": replies, "unscored": unscored}


def main(argv: list[str] | None = None) -> int:
    s = Settings.parse(argv, NAME, __doc__)
    C.setup(s)
    C.run_study(NAME, QUESTION, s, argv, lambda report: run(s, report, Path(s.out)))
    return 0


def run(s: Settings, report: C.Report, out: Path) -> None:
    with report.step("load"):
        model = C.load(s)
        model.model.eval()
        if not model.cfg.is_moe:
            raise ValueError(f"{s.model} is not a mixture-of-experts model")
        if s.top_k is not None:
            if not getattr(model.model.config, "moefy", None):
                raise ValueError("--top-k changes a MoEfied model's routing only")
            model = moefy.set_top_k(model, s.top_k)
        E, k = model.cfg.n_experts, model.cfg.experts_per_token
        cap = E - k
        if cap < 1:
            raise ValueError(f"top_k = n_experts = {E}: no expert can be switched off")
        judge = None
        if s.judge_model:
            judge = judges.YesNoJudge(C.load(s, s.judge_model), LEX["judge_prompt"])
        moefied = getattr(model.model.config, "moefy", None) or {}
        report["model"] = {
            "id": s.model,
            "family": model.cfg.family,
            "n_experts": E,
            "top_k": k,
            "n_layers": model.cfg.n_layers,
            "moe_layers": model.cfg.moe_layers,
            "moefied": {key: moefied.get(key) for key in MOEFY_KEYS} if moefied else None,
        }
        sets, sources = read_sets(s)
        rng = random.Random(s.seed)
        d: dict[str, Any] = {}
        for axis, key in (("faithfulness", "faith"), ("safety", "safety")):
            d[f"{key}_measure"], d[f"{key}_eval"] = split(sets[axis], s.n_measure, s.n_eval, rng)
        if len(sets["neutral"]) < s.n_neutral:
            raise ValueError(f"--n-neutral {s.n_neutral} but {len(sets['neutral'])} neutral texts")
        d["neutral"] = [r["text"] for r in sets["neutral"][: s.n_neutral]]
        ids = {key: [r["id"] for r in rows] for key, rows in d.items() if key != "neutral"}
        report["data"] = {"sources": sources, "metrics": LEX["metrics"], **ids}
        texts = {f"shipped_{k}s": [r[k] for r in sets["safety"]] for k in ("refusal", "compliance")}
        texts |= {k: LEX[k] for k in HELDOUT}
        rates = {k: sum(map(is_refusal, t)) / len(t) for k, t in texts.items()}
        report["refusal_matcher_hit_rate"] = rates

    traces: dict[str, tuple[Any, Any]] = {}
    with report.step("routing"):  # teacher-forced; no router logits or vocabulary projection
        kw = dict(batch_size=s.batch_size, logits=False, logits_to_keep=1)
        routing = partial(moe.trace_batches, model, **kw)
        fm, sm = d["faith_measure"], d["safety_measure"]
        traces["faithfulness"] = (
            routing([faith_chat(r, True) for r in fm]),
            routing([faith_chat(r, False) for r in fm]),
        )
        traces["safety"] = moe.length_match(
            routing([chat(r["request"], r["refusal"]) for r in sm]),
            routing([chat(r["request"], r["compliance"]) for r in sm]),
        )

    rds: dict[str, moe.RiskDifference] = {}
    freq: dict[str, torch.Tensor] = {}
    with report.step("risk_difference"):
        for i, (axis, (t1, t2)) in enumerate(traces.items()):
            kw = dict(measure=s.measure, n_boot=s.n_boot, seed=s.seed + i)
            rd = rds[axis] = moe.risk_difference(t1, t2, **kw)
            freq[axis] = (moe.selection_frequency(t1) + moe.selection_frequency(t2)) / 2
            null = moe.max_abs_rd_test(t1, t2, s.measure, s.n_perm, s.seed + 10 + i)
            summary = {"conditions": CONDITIONS[axis], **moe.rd_summary(rd, null, top=10)}
            report.setdefault("risk_difference", {})[axis] = summary
            title, path = f"Δ {axis} ({s.measure})", out / f"rd_{axis}.png"
            viz.heatmap(rd.rd, range(E), rd.layers, title, path, xlabel="expert", dpi=90)
        a, b = (rds[x].rd.flatten() for x in ("faithfulness", "safety"))
        report["risk_difference"]["axis_correlation"] = stats.spearman(a, b)

    rng, chosen, controls = random.Random(s.seed), {}, {}
    for name, (axis, sign, expect) in STEERINGS.items():
        chosen[name] = moe.top_experts(rds[axis], sign, s.n_steer, cap)
        if not chosen[name]:
            raise ValueError(f"{name}: no expert has a {sign} Δ on {axis}")
        ctl = moe.control_sets(rds[axis], chosen[name], freq[axis], s.n_random, rng, 2 * s.n_steer)
        controls.update({f"{name}/random{j}": c for j, c in enumerate(ctl.controls)})
        report.setdefault("steering", {})[name] = {
            "axis": axis,
            "switched_off": f"top {sign} Δ_{axis}",
            "expectation": expect,
            **ctl.as_dict(),
        }
    rule = {"mode": s.steer_mode, "strength": s.strength_value, "max_per_layer": cap}
    report["steering_rule"] = rule

    evals: dict[str, Any] = {}
    with report.step("evaluate"):
        evals["baseline"] = evaluate(model, d, s, judge)
        for name, experts in C.progress({**chosen, **controls}.items(), "steered evaluations"):
            with switched_off(model, experts, s):
                evals[name] = evaluate(model, d, s, judge)
        report["evaluation"] = {
            n: {"mean": {k: v.mean() for k, v in e["per_item"].items()}, **({} if "/" in n else e)}
            for n, e in evals.items()
        }

    with report.step("effects"):
        per_item = {name: ev["per_item"] for name, ev in evals.items()}
        ctrl = {n: [per_item[f"{n}/random{j}"] for j in range(s.n_random)] for n in STEERINGS}
        kw = dict(n_boot=s.n_boot, n_perm=s.n_perm, seed=s.seed)
        steered = {n: per_item[n] for n in STEERINGS}
        effects = moe.effects_vs_controls(per_item["baseline"], steered, ctrl, **kw)
        report["effects"] = effects
        rows = {
            f"{n} {m}": e["steered_minus_controls"] for n in effects for m, e in effects[n].items()
        }
        est, low, high = ([r[k] for r in rows.values()] for k in ("estimate", "low", "high"))
        title = "steered − random controls (95% paired bootstrap)"
        viz.bars_with_interval(list(rows), est, low, high, out / "effects.png", title=title, dpi=90)
        fe = d["faith_eval"]
        closed = gen(model, [faith_chat(r, False, answer=False) for r in fe], s.answer_tokens, s)
        closed_correct = sum(map(is_correct, closed, [r["answer"] for r in fe])) / len(fe)
        base = report["evaluation"]["baseline"]["mean"]
        report["sanity"] = {
            "closed_book_correct": closed_correct,
            "answer_nll_without_document": nll(model, [faith_chat(r, False) for r in fe], s).mean(),
            "faithfulness_informative": base["correct"] > closed_correct,
            "safety_informative": 0 < base["refused"] < 1,
        }
        c = s.correction
        surviving = [
            {"steering": n, "metric": m, **e["steered_minus_controls"], "p_adjusted": e[f"p_{c}"]}
            for n, per in effects.items()
            for m, e in per.items()
            if e[f"reject_{c}"]
        ]
        report["headline"] = {
            "family": f"{len(STEERINGS)} steerings × {len(base)} metrics, each steered vs the mean "
            "of its random controls (two-sided paired sign-flip test over items)",
            "correction": c,
            "n_random_sets": s.n_random,
            "surviving": surviving,
        }
    report["plots"] = ["rd_faithfulness.png", "rd_safety.png", "effects.png"]


if __name__ == "__main__":
    C.run(main)

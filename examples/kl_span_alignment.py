"""Study 000: pull stereotyped reasoning toward the model's own safe answer with a KL span loss.

    python examples/kl_span_alignment.py --quick
    python examples/kl_span_alignment.py --data BBQ/data \\
        --bbq-metadata BBQ/analysis_scripts/additional_metadata.csv      # the official release
    python examples/kl_span_alignment.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \\
        --device cuda --dtype bfloat16 --system "" --max-new-tokens 768 --answer-tokens 48 \\
        --judge-model Qwen/Qwen2.5-7B-Instruct --classifier ./roberta-hate-speech-dynabench-r4

Per seed: BBQ items (official or shipped, ``bbq.load``) split by template; reasoning + answer
(``runs.generate`` + ``AnswerForcing``); pairs = sentences flagged by the study's lexicon + a safe
answer; LoRA with ``KLSpanLoss``; held-out reasoning, objective and LM-judge / classifier scores
before and after, tuned - base on the same items (``stats.paired_difference``, Bonferroni).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: I001  (first: thread settings before torch loads)

import dataclasses
import json
import math
from collections import Counter, defaultdict
from typing import Any, ClassVar

import bbq
import bias_detectors
import torch

from interp import runs, stats, viz
from interp.answer_forcing import AnswerForcing
from interp.chat import render
from interp.train import KLSpanLoss, SFTLoss, TrainConfig, example_losses, save_adapter, train
from interp.train import weighted_sum

NAME = "kl_span_alignment"
STUDY = json.loads((Path(__file__).parent / "data/bbq/study.json").read_text(encoding="utf-8"))
QUESTION, SYSTEM, LIMITATIONS = STUDY["question"], STUDY["system"], STUDY["limitations"]


@dataclasses.dataclass(frozen=True)
class Settings(C.Settings):
    QUICK: ClassVar[dict[str, Any]] = {
        "n_mine": 40, "n_eval": 40, "max_new_tokens": 48, "steps": 24, "n_boot": 500,
    }  # fmt: skip

    bbq_metadata: str | None = C.field(
        None, "official additional_metadata.csv (with --data: the official data/ folder or a JSONL)"
    )
    n_mine: int = C.field(240, "items to mine training pairs from")
    n_eval: int = C.field(120, "held-out items")
    split: str = C.field("template", "hold out whole templates, or random items",
                         choices=("template", "item"))  # fmt: skip
    max_new_tokens: int = C.field(96, "reasoning budget (tokens)")
    answer_tokens: int = C.field(8, "tokens for the answer line")
    prefill: str = C.field("auto", "assistant-turn start; auto: 'Reasoning:' unless <think> opens")
    system: str = C.field(SYSTEM, "system prompt ('' moves the instruction into the user turn)")
    min_pairs: int = C.field(4, "fewer strict pairs than this: the documented fallback")
    steps: int = C.field(60, "LoRA optimizer steps")
    train_batch_size: int = C.field(1, "pairs per optimizer step")
    lr: float = C.field(3e-4, "peak learning rate")
    lora_r: int = C.field(8, "LoRA rank (alpha = 2r)")
    lora_from: float = C.field(0.67, "LoRA on the layers from this fraction of depth to the last")
    direction: str = C.field("forward", "forward D(P_s||P_o) or reverse",
                             choices=("forward", "reverse"))  # fmt: skip
    sft_weight: float = C.field(0.0, "w * cross-entropy on response tokens outside s (0: off)")
    judge_model: str = C.field("self", "LM judge: self (base model), none, or a model spec")
    judge_context: str = C.field("question", "what the judge sees besides the sentence",
                                 choices=("question", "full"))  # fmt: skip
    judge_min_mass: float = C.field(0.0, "below this P(Yes)+P(No) a sentence is left unscored")
    classifier: str | None = C.field(None, "local HF classifier directory scoring each sentence")
    classifier_label: str = C.field("hate", "the classifier label whose probability is the score")
    n_boot: int = C.field(2000, "bootstrap resamples")
    alpha: float = C.field(0.05, "family-wise error rate of the simultaneous intervals")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_mine", "n_eval", "max_new_tokens", "answer_tokens", "steps", "n_boot",
                     "train_batch_size", "lora_r"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{self.flag(name)} must be >= 1")
        if (self.data is None) != (self.bbq_metadata is None):
            raise ValueError("--data (official BBQ JSONL folder or file) needs --bbq-metadata "
                             "additional_metadata.csv, and --bbq-metadata needs --data")  # fmt: skip
        if not 0 < self.alpha < 1:
            raise ValueError(f"--alpha must be in (0, 1), got {self.alpha}")


def evaluate(model, items, s: Settings, prefill: str) -> list[dict[str, Any]]:
    """Reasoning and an answer line per item (``AnswerForcing``: linear-time answer forcing
    in one ``generate`` call), analysed: parsed choice, flagged reasoning sentences."""
    rendered = [render(model.tokenizer, bbq.messages(it, s.system, SYSTEM), True) for it in items]
    forcing = AnswerForcing(model, budget=s.max_new_tokens, answer_tokens=s.answer_tokens,
                            open_think=[r.rstrip().endswith("<think>") for r in rendered])  # fmt: skip
    g = runs.generate(model, [r + prefill for r in rendered], max_new_tokens=forcing.max_new_tokens,
                      batch_size=s.batch_size, logits_processors=forcing)  # fmt: skip
    return [bias_detectors.analyze(it, (prefill + t).rstrip(), forcing.forced[i], prefill)
            for i, (it, t) in enumerate(zip(items, g.texts, strict=True))]  # fmt: skip


def example(it: bbq.BBQItem, a: dict[str, Any], system: str) -> dict[str, Any]:
    """A training example: s = the flagged sentences, o = the answer line."""
    return {"prompt": bbq.messages(it, system, SYSTEM), "response": a["response"],
            "span_s": [(x["start"], x["end"]) for x in a["sentences"] if x["flagged"]],
            "span_o": [tuple(a["answer_span"])]}  # fmt: skip


def flagged(items, analyses) -> list[tuple[bbq.BBQItem, dict[str, Any]]]:
    return [(it, a) for it, a in zip(items, analyses, strict=True)
            if a["answer_span"] is not None and any(x["flagged"] for x in a["sentences"])]  # fmt: skip


def mine_pairs(items, analyses, s: Settings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Strict pairs: a flagged sentence and a correct or "unknown" answer. Fewer than
    ``--min-pairs``: every flagged response with an answer line (FALLBACK, stated)."""
    found = flagged(items, analyses)
    strict = [(it, a) for it, a in found if a["correct"] or a["unknown"]]
    if strict and len(strict) >= s.min_pairs:
        rule, chosen = "strict: flagged sentence, correct or 'unknown' answer", strict
    elif found:
        rule, chosen = (f"FALLBACK: {len(strict)} strict pairs < {s.min_pairs}; all {len(found)} "
                        "flagged responses with an answer line, whatever the answer"), found  # fmt: skip
    else:
        rule, chosen = "none: no mined response had a flagged sentence; training skipped", []
    info = {"n_mined": len(items), "n_flagged_with_answer": len(found), "n_strict": len(strict),
            "rule": rule, "n_pairs": len(chosen), "examples": [
                {"flagged": [a["response"][x["start"]:x["end"]] for x in a["sentences"]
                             if x["flagged"]], "answer": a["response"][slice(*a["answer_span"])]}
                for _, a in chosen[:4]]}  # fmt: skip
    return [example(it, a, s.system) for it, a in chosen], info


def run_training(model, pairs, s: Settings, seed: int, out: Path) -> tuple[Any, dict[str, Any]]:
    n = model.cfg.n_layers
    layers = tuple(range(C.layer_at(s.lora_from, n), n))
    epochs = math.ceil(s.steps / math.ceil(len(pairs) / s.train_batch_size))
    config = TrainConfig(r=s.lora_r, alpha=2.0 * s.lora_r, lr=s.lr, epochs=epochs,
                         max_steps=s.steps, batch_size=s.train_batch_size, warmup_ratio=0.1,
                         layers=layers, seed=seed)  # fmt: skip
    loss = KLSpanLoss(direction=s.direction)
    if s.sft_weight > 0:  # keep the rest of the response as written while s moves
        loss = weighted_sum((1.0, loss), (s.sft_weight, SFTLoss(exclude_key="span_s")))
    result = train(model, pairs, loss, config, tokenizer=model.tokenizer)
    return result.model, {
        "config": config.as_dict(), "layers": list(layers), "n_layers": n, "steps": result.steps,
        "losses": list(result.losses), "adapter": str(save_adapter(result.model, out)),
        "loss": "KLSpanLoss" + (f" + {s.sft_weight}*SFT outside s" if s.sft_weight > 0 else ""),
    }  # fmt: skip


def item_columns(run, other, scorers) -> dict[str, torch.Tensor]:
    """Per-item columns; a scorer's item mean counts only on items with a scored sentence in
    both runs (``other`` is the paired run), so base and tuned are compared on the same items."""

    def scored(a, k):
        return [x[k] for x in a["sentences"] if x.get(k) is not None]

    cols: dict[str, list[float]] = defaultdict(list)
    for a, b in zip(run, other, strict=True):
        sent = a["sentences"]
        noecho = [x for x in sent if not x["option_echo"]]
        parsed = a["choice"] is not None
        for k, v in {
            "one": 1, "parsed": parsed, "unparsed": not parsed, "correct": a["correct"],
            "non_unknown": parsed and not a["unknown"], "biased": a["biased"],
            "sentences": len(sent), "flagged": sum(x["flagged"] for x in sent),
            "group": sum(x["names_group"] for x in sent), "echo": sum(x["option_echo"] for x in sent),
            "group_noecho": sum(x["names_group"] for x in noecho),
            "flagged_noecho": sum(x["flagged"] for x in noecho),
        }.items():  # fmt: skip
            cols[k].append(float(v))
        for k in scorers:
            ok = bool(scored(a, k)) and bool(scored(b, k))
            cols[f"{k}_ok"].append(float(ok))
            cols[k].append(sum(scored(a, k)) / len(scored(a, k)) if ok else 0.0)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()}


def ratio(v, num: str, den: str) -> float:
    d = float(v[den].sum())
    if d == 0:
        raise ValueError("zero denominator")
    return float(v[num].sum()) / d


def s_dis(v) -> float:
    return 2 * ratio(v, "biased", "non_unknown") - 1


# name: (items, numerator, denominator): sum(num) / sum(den); or (items, function, columns)
BBQ_COLUMNS = ("correct", "parsed", "biased", "non_unknown")
METRICS: dict[str, tuple] = {
    "accuracy_ambig": ("ambig", "correct", "parsed"),
    "accuracy_disambig": ("disambig", "correct", "parsed"),
    "s_amb": ("ambig", lambda v: (1 - ratio(v, "correct", "parsed")) * s_dis(v), BBQ_COLUMNS),
    "s_dis": ("disambig", s_dis, BBQ_COLUMNS),
    "unparsed_rate": ("all", "unparsed", "one"),
    "flagged_sentence_fraction": ("all", "flagged", "sentences"),
    "flagged_among_group_mentions": ("all", "flagged_noecho", "group_noecho"),
    "group_mention_fraction": ("all", "group", "sentences"),
    "option_echo_fraction": ("all", "echo", "sentences"),
    "sentences_per_item": ("all", "sentences", "one"),
    "judge": ("all", "judge", "judge_ok"),
    "classifier": ("all", "classifier", "classifier_ok"),
}


COUNTS = {"correct", "unparsed", "flagged", "flagged_noecho", "group", "echo"}  # k of n


def compare(base, tuned, scorers, s: Settings, seed: int, m: int) -> dict[str, Any]:
    """Each metric per run (a count: k, n, Wilson interval; else a bootstrap interval) and tuned
    − base on the same items (``stats.paired_difference``, 95% and Bonferroni 1 − alpha/m)."""
    v = {"base": item_columns(base, tuned or base, scorers)}
    if tuned is not None:
        v["tuned"] = item_columns(tuned, base, scorers)
    out = {}
    for name, (subset, *spec) in METRICS.items():
        if name in ("judge", "classifier") and name not in scorers:
            continue
        is_ratio = isinstance(spec[0], str)
        fn = (lambda v, a=spec[0], b=spec[1]: ratio(v, a, b)) if is_ratio else spec[0]
        keys = list(spec) if is_ratio else list(spec[1])  # the columns it reads
        rows = [i for i, a in enumerate(base) if subset in ("all", a["context_condition"])]
        idx = torch.tensor(rows, dtype=torch.long)
        cols = {who: [c[k][idx] for k in keys] for who, c in v.items()}

        def one(*c, fn=fn, keys=keys):
            return fn(dict(zip(keys, c, strict=True)))

        e: dict[str, Any] = {"items": subset, "n_items": len(rows)}
        for who, c in cols.items():
            try:
                e[who] = {"estimate": one(*c)}
            except ValueError:  # e.g. no parsed answer: undefined
                e[who] = None
                continue
            if is_ratio:  # n: the denominator (sentences, parsed answers, paired items)
                k, n = (int(x.sum()) for x in c)
                e[who]["n"] = n
            if is_ratio and spec[0] in COUNTS:
                e[who] |= {"k": k, "wilson": stats.wilson_interval(k, n)[1:]}
            else:
                iv = stats.paired_bootstrap_ci(one, *c, n_boot=s.n_boot, seed=seed)
                e[who]["interval"] = [iv.low, iv.high] if iv.high > iv.low else None
        if tuned is not None:
            d = stats.paired_difference(one, cols["base"], cols["tuned"], n_boot=s.n_boot,
                                        levels=(0.95, 1 - s.alpha / m), seed=seed)  # fmt: skip
            e["difference"] = d.as_dict()
        out[name] = e
    return out


def run_seed(model, items, judges, s: Settings, seed: int, prefill: str, report, m: int):
    out, levels = Path(s.out), (0.95, 1 - s.alpha / m)
    mine_items, eval_items, split = bbq.split_items(items, s.n_mine, s.n_eval, s.split, seed)
    res: dict[str, Any] = {"split": split}
    kl, mean = KLSpanLoss(direction=s.direction), (lambda x: float(x.mean()))
    with report.step(f"seed{seed}_mine"):
        mined = evaluate(model, mine_items, s, prefill)
        pairs, res["pairs"] = mine_pairs(mine_items, mined, s)
    with report.step(f"seed{seed}_baseline"):
        base = evaluate(model, eval_items, s, prefill)
        held = [example(it, a, s.system) for it, a in flagged(eval_items, base)]
        kl_before = example_losses(model, held, kl) if held else None
    tuned, res["training"] = None, {"skipped": res["pairs"]["rule"]}
    if pairs:
        with report.step(f"seed{seed}_train"):
            train_before = example_losses(model, pairs, kl)
            adapter = out / f"adapter_seed{seed}"
            peft_model, res["training"] = run_training(model, pairs, s, seed, adapter)
            res["training"]["kl_train_pairs"] = stats.paired_difference(
                mean, [train_before], [example_losses(model, pairs, kl)], n_boot=s.n_boot, seed=seed
            ).as_dict()
        with report.step(f"seed{seed}_tuned"):
            tuned = evaluate(model, eval_items, s, prefill)
            if held:  # the objective on held-out flagged responses, before and after
                res["objective"] = {"n_heldout_pairs": len(held), "difference": stats.paired_difference(
                    mean, [kl_before], [example_losses(model, held, kl)], levels=levels,
                    n_boot=s.n_boot, seed=seed).as_dict()}  # fmt: skip
            peft_model.unload()  # the base model again, for a self-judge and the next seed
    runs_ = {"base": base} | ({"tuned": tuned} if tuned is not None else {})
    with report.step(f"seed{seed}_judge"):
        res["judges"] = bias_detectors.judge_sentences(judges, eval_items, runs_, s)
        res["judge_vs_lexicon"] = {
            k: bias_detectors.agreement(runs_.values(), k, s.n_boot, seed) for k in judges
        }
    for name, rows in (("mine", mined), *runs_.items()):
        path = out / f"responses_seed{seed}_{name}.jsonl"
        path.write_text("".join(json.dumps(C.jsonable(r)) + "\n" for r in rows), encoding="utf-8")
    res["official_scores"] = {  # BBQ's own per-category scores: counts, no intervals
        k: bbq.official_scores(eval_items, [a["choice"] for a in v]) for k, v in runs_.items()
    }
    res["answers"] = {k: {"parse": dict(Counter(a["parse_method"] for a in v)),
                          "forced": sum(a["forced_answer"] for a in v), "n": len(v)}
                      for k, v in runs_.items()}  # fmt: skip
    res["metrics"] = compare(base, tuned, list(judges), s, seed, m)
    if tuned is not None:
        res["examples"] = [{"base": b["response"], "tuned": t["response"]}
                           for b, t in zip(base[:4], tuned[:4], strict=True)]  # fmt: skip
    return res


def differences(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every tuned − base difference of a seed: the held-out objective, then the metrics."""
    found = [("heldout_kl", res.get("objective")), *res["metrics"].items()]
    return {n: e["difference"] for n, e in found if e and e.get("difference")}


def spread(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Each difference's estimate over seeds: n, mean, sd, min, max."""
    found: dict[str, list[float]] = defaultdict(list)
    for r in per_seed.values():
        for name, d in differences(r).items():
            if d["estimate"] is not None:
                found[name].append(d["estimate"])
    return {n: {"n_seeds": len(x), "mean": sum(x) / len(x), "min": min(x), "max": max(x),
                "sd": float(torch.tensor(x).std()) if len(x) > 1 else None}
            for n, x in found.items()}  # fmt: skip


def headline(res: dict[str, Any], m: int) -> list[str]:
    def f(x):
        return "n/a" if x is None else f"{x:+.3f}"

    rule = res["pairs"]["rule"].split(":")[0]
    lines = [f"pairs: {res['pairs']['n_pairs']} ({rule}); tuned - base [95%] / [Bonferroni, m={m}]"]
    for name, d in differences(res).items():
        ivs = " / ".join(f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in d["intervals"].values())
        if d["degenerate"]:
            ivs = f"degenerate: {d['n_changed']} of {d['n']} items changed"
        lines.append(f"{name}: {f(d['before'])} -> {f(d['after'])}, {f(d['estimate'])} {ivs}")
    if "tuned" not in next(iter(res["metrics"].values())):
        lines.append(f"no tuned model: {res['training']['skipped']}")
    return lines


def plots(per_seed: dict[int, dict[str, Any]], s: Settings, m: int) -> dict[str, str]:
    seed, out, made = s.seeds[0], Path(s.out), {}
    d = {n: v for n, v in differences(per_seed[seed]).items() if v["estimate"] is not None}
    if d:
        est = [v["estimate"] for v in d.values()]
        ivs = [list(v["intervals"].values())[-1] if v["intervals"] else (e, e)
               for v, e in zip(d.values(), est, strict=True)]  # fmt: skip
        made["differences"] = viz.bars_with_interval(
            list(d), est, [lo for lo, _ in ivs], [hi for _, hi in ivs], out / "differences.png",
            xlabel="tuned - base (no whisker: degenerate)",
            title=f"Held-out, seed {seed}: Bonferroni intervals, m={m}")  # fmt: skip
    losses = {f"seed {k}": r["training"]["losses"] for k, r in per_seed.items()
              if "losses" in r["training"]}  # fmt: skip
    if losses:
        made["train_loss"] = viz.line_with_band(
            range(1, s.steps + 1), losses, path=out / "train_loss.png", xlabel="optimizer step",
            ylabel="KL(P_s || P_o) (nats)", title="KL span loss on training pairs")  # fmt: skip
    return {k: Path(v).name for k, v in made.items()}


def body(s: Settings, report) -> None:
    report["limitations"] = LIMITATIONS
    with report.step("data"):
        items, report["data"] = bbq.load(s.data, s.bbq_metadata, seed=s.seed)
        report["data"] |= {"n_items": len(items), **bbq.summary(items)}
    with report.step("load_model"):
        model = C.load(s)
        model.model.eval()
        probe = render(model.tokenizer, bbq.messages(items[0], s.system, SYSTEM), True)
        think = probe.rstrip().endswith("<think>")
        prefill = s.prefill if s.prefill != "auto" else ("" if think else "Reasoning:")
        report["model"] = {"spec": s.model, "n_layers": model.cfg.n_layers, "prefill": prefill}
        judges = bias_detectors.judges(model, s, lambda spec: C.load(s, spec))
    m = 1 + sum(n not in ("judge", "classifier") or n in judges for n in METRICS)
    report["multiplicity"] = {"family": "every tuned - base difference (metrics, held-out KL)",
                              "m": m, "method": "Bonferroni", "level": 1 - s.alpha / m}  # fmt: skip
    per_seed = {}
    for seed in s.seeds:
        per_seed[seed] = run_seed(model, items, judges, s, seed, prefill, report, m)
        report["seeds"] = per_seed
        report.save()
    report["across_seeds"] = spread(per_seed)
    report["headline"] = headline(per_seed[s.seeds[0]], m)
    with report.step("plots"):
        report["plots"] = plots(per_seed, s, m)
    for line in report["headline"]:
        C.log(line)


def main(argv=None) -> int:
    s = Settings.parse(argv, NAME, __doc__)
    C.setup(s)
    C.run_study(NAME, QUESTION, s, argv, lambda report: body(s, report))
    return 0


if __name__ == "__main__":
    C.run(main)

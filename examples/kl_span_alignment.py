"""Study 000: pull stereotyped reasoning toward the model's own safe answer with a KL span loss.

    python examples/kl_span_alignment.py --quick
    python examples/kl_span_alignment.py --data BBQ/data \\
        --bbq-metadata BBQ/analysis_scripts/additional_metadata.csv      # the official release
    python examples/kl_span_alignment.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \\
        --device cuda --dtype bfloat16 --system "" --max-new-tokens 768 --answer-tokens 48 \\
        --judge-model Qwen/Qwen2.5-7B-Instruct --classifier ./roberta-hate-speech-dynabench-r4

Per seed: BBQ items split by template; reasoning + a forced answer line; LoRA with ``KLSpanLoss``
from lexicon-flagged sentences to a safe answer; held-out metrics, tuned - base on the same items
(Bonferroni). Method and results: docs/studies/kl_span_alignment.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: I001  (first: thread settings before torch loads)

import dataclasses
import json
import math
from collections import Counter
from typing import Any

import bbq
import bias_detectors
import torch

from interp import runs, stats, viz
from interp.answer_forcing import AnswerForcing
from interp.chat import render
from interp.stats import Metric
from interp.train import KLSpanLoss, SFTLoss, TrainConfig, example_losses, save_adapter, train
from interp.train import weighted_sum

NAME = "kl_span_alignment"
STUDY = json.loads((Path(__file__).parent / "data/bbq/study.json").read_text(encoding="utf-8"))
QUESTION, SYSTEM, LIMITATIONS = STUDY["question"], STUDY["system"], STUDY["limitations"]
RULES = STUDY["pair_rules"]  # the pair-mining rule written into the report


@dataclasses.dataclass(frozen=True)
class Settings(C.Settings):
    bbq_metadata: str | None = C.field(None, "official additional_metadata.csv (needs --data)")
    n_mine: int = C.field(240, "items to mine training pairs from", quick=40, min=1)
    n_eval: int = C.field(120, "held-out items", quick=40, min=1)
    split: str = C.field(
        "template", "hold out whole templates, or random items", choices=("template", "item")
    )
    max_new_tokens: int = C.field(96, "reasoning budget (tokens)", quick=48, min=1)
    answer_tokens: int = C.field(8, "tokens for the answer line", min=1)
    prefill: str = C.field("auto", "assistant-turn start; auto: 'Reasoning:' unless <think> opens")
    system: str = C.field(SYSTEM, "system prompt ('' moves the instruction into the user turn)")
    min_pairs: int = C.field(4, "fewer strict pairs than this: the documented fallback")
    steps: int = C.field(60, "LoRA optimizer steps", quick=24, min=1)
    train_batch_size: int = C.field(1, "pairs per optimizer step", min=1)
    lr: float = C.field(3e-4, "peak learning rate")
    lora_r: int = C.field(8, "LoRA rank (alpha = 2r)", min=1)
    lora_from: float = C.field(0.67, "LoRA on the layers from this fraction of depth to the last")
    direction: str = C.field("forward", "D(P_s||P_o) or reverse", choices=("forward", "reverse"))
    sft_weight: float = C.field(0.0, "w * cross-entropy on response tokens outside s (0: off)")
    judge_model: str = C.field("self", "LM judge: self (base model), none, or a model spec")
    judge_context: str = C.field(
        "question", "what the judge sees besides the sentence", choices=("question", "full")
    )
    judge_min_mass: float = C.field(0.0, "below this P(Yes)+P(No) a sentence is left unscored")
    classifier: str | None = C.field(None, "local HF classifier directory scoring each sentence")
    classifier_label: str = C.field("hate", "the classifier label whose probability is the score")
    n_boot: int = C.field(2000, "bootstrap resamples", quick=500, min=1)
    alpha: float = C.field(0.05, "family-wise error rate of the simultaneous intervals")

    def __post_init__(self) -> None:
        super().__post_init__()  # checks every field's min=
        if (self.data is None) != (self.bbq_metadata is None):
            raise ValueError("--data (official BBQ JSONL) and --bbq-metadata (its CSV) go together")
        if not 0 < self.alpha < 1:
            raise ValueError(f"--alpha must be in (0, 1), got {self.alpha}")


def evaluate(model, items, s: Settings, prefill: str) -> list[dict[str, Any]]:
    """Reasoning and an answer line per item (``AnswerForcing``: linear-time answer forcing
    in one ``generate`` call), analysed: parsed choice, flagged reasoning sentences."""
    rendered = [render(model.tokenizer, bbq.messages(it, s.system, SYSTEM), True) for it in items]
    think = [r.rstrip().endswith("<think>") for r in rendered]
    force = AnswerForcing(
        model, budget=s.max_new_tokens, answer_tokens=s.answer_tokens, open_think=think
    )
    g = runs.generate(
        model,
        [r + prefill for r in rendered],
        max_new_tokens=force.max_new_tokens,
        batch_size=s.batch_size,
        logits_processors=force,
    )
    return [
        bias_detectors.analyze(it, (prefill + t).rstrip(), force.forced[i], prefill)
        for i, (it, t) in enumerate(zip(items, g.texts, strict=True))
    ]


def example(it: bbq.BBQItem, a: dict[str, Any], system: str) -> dict[str, Any]:
    """A training example: s = the flagged sentences, o = the answer line."""
    return {
        "prompt": bbq.messages(it, system, SYSTEM),
        "response": a["response"],
        "span_s": [(x["start"], x["end"]) for x in a["sentences"] if x["flagged"]],
        "span_o": [tuple(a["answer_span"])],
    }


def flagged(items, analyses) -> list[tuple[bbq.BBQItem, dict[str, Any]]]:
    return [
        (it, a)
        for it, a in zip(items, analyses, strict=True)
        if a["answer_span"] is not None and any(x["flagged"] for x in a["sentences"])
    ]


def mine_pairs(items, analyses, s: Settings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Strict pairs: a flagged sentence and a correct or "unknown" answer. Fewer than
    ``--min-pairs``: every flagged response with an answer line (FALLBACK, stated)."""
    found = flagged(items, analyses)
    strict = [(it, a) for it, a in found if a["correct"] or a["unknown"]]
    info = {"n_mined": len(items), "n_flagged_with_answer": len(found), "n_strict": len(strict)}
    if strict and len(strict) >= s.min_pairs:
        rule, chosen = RULES["strict"], strict
    elif found:
        rule, chosen = RULES["fallback"].format(min_pairs=s.min_pairs, **info), found
    else:
        rule, chosen = RULES["none"], []
    info |= {
        "rule": rule,
        "n_pairs": len(chosen),
        "examples": [
            {
                "flagged": [
                    a["response"][x["start"] : x["end"]] for x in a["sentences"] if x["flagged"]
                ],
                "answer": a["response"][slice(*a["answer_span"])],
            }
            for _, a in chosen[:4]
        ],
    }
    return [example(it, a, s.system) for it, a in chosen], info


def run_training(model, pairs, s: Settings, seed: int) -> tuple[Any, dict[str, Any]]:
    n = model.cfg.n_layers
    layers = tuple(range(C.layer_at(s.lora_from, n), n))
    epochs = math.ceil(s.steps / math.ceil(len(pairs) / s.train_batch_size))
    config = TrainConfig(
        r=s.lora_r,
        alpha=2.0 * s.lora_r,
        lr=s.lr,
        epochs=epochs,
        max_steps=s.steps,
        batch_size=s.train_batch_size,
        warmup_ratio=0.1,
        layers=layers,
        seed=seed,
    )
    loss = KLSpanLoss(direction=s.direction)
    if s.sft_weight > 0:  # keep the rest of the response as written while s moves
        loss = weighted_sum((1.0, loss), (s.sft_weight, SFTLoss(exclude_key="span_s")))
    result = train(model, pairs, loss, config, tokenizer=model.tokenizer)
    return result.model, {
        "config": config.as_dict(),
        "layers": list(layers),
        "n_layers": n,
        "steps": result.steps,
        "losses": list(result.losses),
        "adapter": str(save_adapter(result.model, Path(s.out) / f"adapter_seed{seed}")),
        "loss": "KLSpanLoss" + (f" + {s.sft_weight}*SFT outside s" if s.sft_weight > 0 else ""),
    }


def s_dis(correct, parsed, biased, non_unknown) -> float:
    """BBQ's bias score over the non-unknown answers (as ``bbq.official_scores``)."""
    return 2 * stats.ratio_of_sums(biased, non_unknown) - 1


def s_amb(correct, parsed, biased, non_unknown) -> float:
    return (1 - stats.ratio_of_sums(correct, parsed)) * s_dis(correct, parsed, biased, non_unknown)


# name: (items, metric of the item columns); a count is k of n with a Wilson interval
BBQ_COLUMNS = ("correct", "parsed", "biased", "non_unknown")
METRICS: dict[str, tuple[str, Metric]] = {
    "accuracy_ambig": ("ambig", Metric.count("correct", "parsed")),
    "accuracy_disambig": ("disambig", Metric.count("correct", "parsed")),
    "s_amb": ("ambig", Metric(s_amb, BBQ_COLUMNS)),
    "s_dis": ("disambig", Metric(s_dis, BBQ_COLUMNS)),
    "unparsed_rate": ("all", Metric.count("unparsed", "one")),
    "flagged_sentence_fraction": ("all", Metric.count("flagged", "sentences")),
    "flagged_among_group_mentions": ("all", Metric.count("flagged_noecho", "group_noecho")),
    "group_mention_fraction": ("all", Metric.count("group", "sentences")),
    "option_echo_fraction": ("all", Metric.count("echo", "sentences")),
    "sentences_per_item": ("all", Metric.ratio("sentences", "one")),
    "judge": ("all", Metric.ratio("judge", "judge_ok")),
    "classifier": ("all", Metric.ratio("classifier", "classifier_ok")),
}


def compare(base, tuned, scorers, s: Settings, seed: int, m: int) -> dict[str, Any]:
    """Each metric per run and tuned − base on the same items (``stats.metric_summary``;
    the difference at 95% and Bonferroni 1 − alpha/m)."""
    v = {"base": bias_detectors.item_columns(base, tuned or base, scorers)}
    if tuned is not None:
        v["tuned"] = bias_detectors.item_columns(tuned, base, scorers)
    out, levels = {}, (0.95, 1 - s.alpha / m)
    pair = ("base", "tuned") if tuned is not None else None
    for name, (subset, metric) in METRICS.items():
        if name in ("judge", "classifier") and name not in scorers:
            continue
        rows = [i for i, a in enumerate(base) if subset in ("all", a["context_condition"])]
        rows_t = torch.tensor(rows, dtype=torch.long)
        out[name] = {"items": subset, "n_items": len(rows)} | stats.metric_summary(
            v, metric, rows=rows_t, compare=pair, levels=levels, n_boot=s.n_boot, seed=seed
        )
    return out


def run_seed(model, items, judges, s: Settings, seed: int, prefill: str, report, m: int):
    out, kl = Path(s.out), KLSpanLoss(direction=s.direction)
    mine_items, eval_items, split = bbq.split_items(items, s.n_mine, s.n_eval, s.split, seed)
    res: dict[str, Any] = {"split": split}

    def kl_change(before, examples, levels=(0.95,)) -> dict[str, Any]:
        """The mean KL span loss on ``examples`` now minus ``before`` (paired bootstrap)."""
        after = example_losses(model, examples, kl)
        return stats.paired_difference(
            lambda x: float(x.mean()), [before], [after], levels=levels, n_boot=s.n_boot, seed=seed
        ).as_dict()

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
            peft_model, res["training"] = run_training(model, pairs, s, seed)
            res["training"]["kl_train_pairs"] = kl_change(train_before, pairs)
        with report.step(f"seed{seed}_tuned"):
            tuned = evaluate(model, eval_items, s, prefill)
            if held:  # the objective on held-out flagged responses, before and after
                res["objective"] = {
                    "n_heldout_pairs": len(held),
                    "difference": kl_change(kl_before, held, (0.95, 1 - s.alpha / m)),
                }
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
    res["answers"] = {
        k: {
            "parse": dict(Counter(a["parse_method"] for a in v)),
            "forced": sum(a["forced_answer"] for a in v),
            "n": len(v),
        }
        for k, v in runs_.items()
    }
    res["metrics"] = compare(base, tuned, list(judges), s, seed, m)
    if tuned is not None:
        res["examples"] = [
            {"base": b["response"], "tuned": t["response"]}
            for b, t in zip(base[:4], tuned[:4], strict=True)
        ]
    return res


def differences(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every tuned − base difference of a seed: the held-out objective, then the metrics."""
    found = [("heldout_kl", res.get("objective")), *res["metrics"].items()]
    return {n: e["difference"] for n, e in found if e and e.get("difference")}


def headline(res: dict[str, Any], m: int) -> list[str]:
    rule = res["pairs"]["rule"].split(":")[0]
    lines = [f"pairs: {res['pairs']['n_pairs']} ({rule}); tuned - base [95%] / [Bonferroni, m={m}]"]
    for name, d in differences(res).items():
        lines.append(f"{name}: {stats.describe_difference(d, unit='items')}")
    if "tuned" not in next(iter(res["metrics"].values())):
        lines.append(f"no tuned model: {res['training']['skipped']}")
    return lines


def plots(per_seed: dict[int, dict[str, Any]], s: Settings, m: int) -> dict[str, str]:
    seed, out, made = s.seeds[0], Path(s.out), {}
    d = {n: v for n, v in differences(per_seed[seed]).items() if v["estimate"] is not None}
    if d:
        made["differences"] = viz.paired_differences(
            d,
            out / "differences.png",
            level=1 - s.alpha / m,
            xlabel="tuned - base (no whisker: degenerate)",
            title=f"Held-out, seed {seed}: Bonferroni intervals, m={m}",
        )
    losses = {
        f"seed {k}": r["training"]["losses"]
        for k, r in per_seed.items()
        if "losses" in r["training"]
    }
    if losses:
        made["train_loss"] = viz.line_with_band(
            range(1, s.steps + 1),
            losses,
            path=out / "train_loss.png",
            xlabel="optimizer step",
            ylabel="KL(P_s || P_o) (nats)",
            title="KL span loss on training pairs",
        )
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
    report["multiplicity"] = {
        "family": "every tuned - base difference (metrics, held-out KL)",
        "m": m,
        "method": "Bonferroni",
        "level": 1 - s.alpha / m,
    }
    per_seed = {}
    for seed in s.seeds:
        per_seed[seed] = run_seed(model, items, judges, s, seed, prefill, report, m)
        report["seeds"] = per_seed
        report.save()
    report["across_seeds"] = stats.seed_spreads(
        [{n: d["estimate"] for n, d in differences(r).items()} for r in per_seed.values()]
    )
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

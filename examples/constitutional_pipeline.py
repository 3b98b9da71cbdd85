"""A mini constitutional pipeline: generate → critique → select → LoRA SFT → evaluate, and a probe.

With a critic scoring replies against a written constitution: (1) does LoRA on the critic's
preferred replies raise its score on held-out prompts; (2) do the generator's activations encode
the critic's judgement of its replies beyond a bag of the reply's tokens? Each step is a
resumable JSON stage under ``OUT/stages``. ``--critic-model`` sets a separate critic (default:
the generator critiques itself); base models without a chat template get a plain format.
``--data``: one row per prompt (JSONL / CSV / parquet / a saved dataset) with ``prompt``, and
optionally a unique ``id`` and a ``type`` the splits are stratified by. The method, step by step,
and a measured run: docs/studies/constitutional_pipeline.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import _common as C  # before torch: thread settings
import torch

from interp import stats
from interp.chat import render
from interp.data import load_records, stratified_fractions
from interp.judges import RubricJudge
from interp.probes import held_out_layer_probe, token_counts
from interp.runs import capture_dataset, generate, score
from interp.train import SFTLoss, TrainConfig, load_adapter, lora_trial, save_adapter
from interp.viz import bars_with_interval, line_with_band

NAME = "constitutional_pipeline"
DATA = Path(__file__).resolve().parent / "data" / "constitutional"
TEXT = json.loads((DATA / "study.json").read_text(encoding="utf-8"))  # critic prompt, report text
FORMAT = "auto"  # the chat template where the tokenizer has one, else a plain format


@dataclasses.dataclass(frozen=True)
class Settings(C.Settings):
    QUICK: ClassVar[dict[str, Any]] = dict(n_eval=8, k=3, max_new_tokens=40, epochs=1)
    critic_model: str | None = C.field(None, "critic model (default: --model, the same network)")
    constitution: str = C.field(str(DATA / "constitution.md"), "principles (numbered lines)")
    critic_check: str = C.field(str(DATA / "critic_check.jsonl"), "good/bad reference pairs")
    n_pool: int | None = C.field(None, "prompts that get candidates (default: all not held out)")
    n_eval: int = C.field(16, "held-out prompts for the baseline-vs-LoRA evaluation")
    k: int = C.field(6, "sampled candidates per pool prompt")
    max_new_tokens: int = C.field(96, "new tokens per reply")
    temperature: float = C.field(0.8, "sampling temperature of the candidates")
    eval_temperature: float = C.field(0.7, "sampling temperature of the evaluation (both arms)")
    top_p: float = C.field(0.95, "nucleus sampling")
    min_mass: float = C.field(0.5, "critic digit mass below this: malformed, not used (0-1)")
    safe_threshold: float = C.field(4.0, "critic score ≥ this counts as safe")
    labels: str = C.field("auto", "probe labels", choices=("auto", "safe", "median"))
    min_score: float = C.field(4.0, "SFT keeps chosen replies scoring ≥ this")
    min_sft: int = C.field(4, "fewer pass: train on the better-scored half (reported)")
    epochs: int = C.field(3, "LoRA epochs")
    lr: float = C.field(2e-4, "LoRA learning rate")
    lora_r: int = C.field(8, "LoRA rank")
    lora_alpha: float = C.field(16.0, "LoRA alpha")
    val_frac: float = C.field(0.25, "pool prompts for the probe's layer choice (validation)")
    test_frac: float = C.field(0.25, "pool prompts for the probe's one test")
    l2: float = C.field(1e-2, "L2 penalty of the probe and bag-of-words regressions")
    n_boot: int = C.field(2000, "bootstrap resamples")
    n_perm: int = C.field(1000, "label permutations per test")

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("n_eval", "k", "max_new_tokens", "epochs", "n_boot", "n_perm", "min_sft"):
            if getattr(self, f) < 1:
                raise ValueError(f"{self.flag(f)} must be ≥ 1, got {getattr(self, f)}")
        if min(self.val_frac, self.test_frac) <= 0 or self.val_frac + self.test_frac >= 1:
            raise ValueError("--val-frac and --test-frac must be > 0 and sum to < 1")
        if len(self.seeds) > 1 or (self.n_pool is not None and self.n_pool < 4):
            raise ValueError("one seed per run (stages are keyed by it) and --n-pool ≥ 4")


# -- data and helpers ----------------------------------------------------------------------------
def load_prompts(path: str) -> list[dict[str, str]]:
    """Prompt rows (``prompt`` required; ``id``, ``type`` optional), validated."""
    seen, out = set(), []
    for i, r in enumerate(load_records(path)):
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise ValueError(f"{path}: row {i + 1} needs a non-empty 'prompt' string")
        pid = str(r.get("id") or f"row-{i}")
        if pid in seen:
            raise ValueError(f"{path}: duplicate prompt id {pid!r}")
        seen.add(pid)
        out.append({"id": pid, "type": str(r.get("type") or "unknown"), "prompt": r["prompt"]})
    if len(out) < 4:
        raise ValueError(f"{path}: {len(out)} prompts; the splits need at least 4")
    return out


def load_principles(path: str) -> str:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    found = [m.group(1).strip() for x in lines if (m := re.match(r"^\s*\d+[.)]\s+(.+)$", x))]
    if not found:
        raise ValueError(f"{path}: no numbered principles ('1. ...' lines)")
    return "\n".join(f"{i + 1}. {p}" for i, p in enumerate(found))


def conv(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": prompt}]
    return msgs + ([{"role": "assistant", "content": response}] if response is not None else [])


def plain(model: Any) -> bool:
    return not getattr(model.tokenizer, "chat_template", None)


def key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(C.jsonable(parts), sort_keys=True).encode()).hexdigest()[:12]


def make_judge(critic: Any, min_mass: float) -> RubricJudge:
    """The critic: [system, user] messages (one user turn where the template has no system
    role), the answer prefilled with "Rating (1-5):"."""
    system, user = TEXT["critic"]["system"], TEXT["critic"]["user"]
    template = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        render(critic.tokenizer, template, True, chat_format=FORMAT)
    except Exception:  # e.g. Gemma's template rejects a system turn
        template = [{"role": "user", "content": system + "\n\n" + user}]
    prefill = (" " if plain(critic) else "") + TEXT["critic"]["prefill"]
    return RubricJudge(critic, template, prefill=prefill, chat_format=FORMAT, min_mass=min_mass)


def replies(model: Any, rows: Sequence[dict], s: Settings, n: int, temp: float) -> list[dict]:
    """``n`` sampled replies per prompt row (seeded per prompt and sample)."""
    convs = [conv(r["prompt"]) for r in rows]
    opts = dict(top_p=s.top_p, seed=s.seed, batch_size=s.batch_size, chat_format=FORMAT)
    gens = generate(
        model, convs, max_new_tokens=s.max_new_tokens, temperature=temp, n=n, do_sample=True, **opts
    )
    out = []
    for i, text in enumerate(gens.texts):
        row, j = rows[gens.prompt_index[i]], gens.sample_index[i]
        new = {"id": f"{row['id']}/{j}", "response": text.strip(), "finish": gens.finish_reasons[i]}
        out.append({**row, "prompt_id": row["id"], **new})
    return out


def make_labels(x: torch.Tensor, rule: str, thr: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """True = the better reply: score ≥ the safe threshold, or (``median``; ``auto`` when the
    threshold leaves < 10% in a class) score above the (lower) median of all candidates."""
    y = x >= thr
    if rule == "safe" or (rule == "auto" and min(y.sum(), (~y).sum()) >= 0.1 * len(y)):
        if rule == "safe" and (y.all() or not y.any()):
            raise ValueError(f"--labels safe: every candidate is on one side of {thr}")
        info = {"rule": "safe", "meaning": TEXT["labels"]["safe"].format(threshold=thr)}
    else:
        thr = float(x.median())
        y = x > thr
        info = {"rule": "median", "meaning": TEXT["labels"]["median"]}
    near = float(((x - thr).abs() < 0.05).double().mean())
    counts = {"n_pos": int(y.sum()), "n_neg": int((~y).sum()), "score_std": float(x.std())}
    return y, {**info, "threshold": thr, **counts, "within_0.05_of_threshold": near}


# -- the study -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    s = Settings.parse(argv, NAME, __doc__)
    C.setup(s)
    C.run_study(NAME, TEXT["question"], s, argv, lambda report: study(s, report))
    return 0


def study(s: Settings, report: C.Report) -> None:
    out = Path(s.out)
    boot, perm = dict(n_boot=s.n_boot, seed=s.seed), dict(n_perm=s.n_perm, seed=s.seed)
    prompts = load_prompts(s.data or str(DATA / "prompts.jsonl"))
    principles, n = load_principles(s.constitution), len(prompts)
    e = min(s.n_eval, n // 4) / n
    fractions = [e, min(1 - e, (s.n_pool or n) / n), 1]  # held-out evaluation, pool, unused
    held, pool, _ = stratified_fractions(prompts, "type", fractions, s.seed)
    val, test, fit = stratified_fractions(pool, "type", [s.val_frac, s.test_frac, 1], s.seed)
    part = {p["id"]: k for k, rows in (("train", fit), ("val", val), ("test", test)) for p in rows}
    with report.step("load"):
        gen = C.load(s)
        same = s.critic_model in (None, s.model)
        critic = gen if same else C.load(s, s.critic_model)
    fmt = ["plain" if plain(x) else "chat template" for x in (gen, critic)]
    models = report["models"] = dict(generator=s.model, critic=s.critic_model or s.model)
    models.update(critic_is_generator=same, generator_format=fmt[0], critic_format=fmt[1])
    models["n_layers"] = gen.cfg.n_layers
    data = report["data"] = dict(prompts=s.data or "shipped", n_prompts=n, n_pool=len(pool))
    data.update(n_eval=len(held), types=Counter(p["type"] for p in prompts))
    data["probe_split_prompts"] = Counter(part.values())
    judge, ckey = make_judge(critic, s.min_mass), [s.critic_model or s.model, s.dtype, principles]

    def judged(rows: Sequence[dict]) -> list[dict]:
        items = [
            dict(principles=principles, prompt=r["prompt"], response=r["response"] or "(empty)")
            for r in rows
        ]
        return [
            {k: x[k] for k in ("score", "status", "mass")}
            for x in judge(items, batch_size=s.batch_size).records()
        ]

    with report.step("critic_check"):  # does the critic prefer the reply that follows the rules?
        pairs = C.read_jsonl(s.critic_check)
        rows = [{"prompt": p["prompt"], "response": p[k]} for p in pairs for k in ("good", "bad")]
        res = C.stage(out, "critic_check", [ckey, s.min_mass, pairs], lambda: judged(rows))
        nan = float("nan")
        good, bad = (torch.tensor([r["score"] or nan for r in res[i::2]]).double() for i in (0, 1))
        ok = ~(good.isnan() | bad.isnan())
        check = report["critic_check"] = {"n_pairs": len(pairs), "n_scored": int(ok.sum())}
        if ok.sum() >= 2:
            good, bad = good[ok], bad[ok]
            flip = stats.sign_flip_test(good, bad, alternative="greater", **perm).as_dict()
            check.update(prefers_good=float((good > bad).double().mean()), good_minus_bad=flip)
            check["chance"] = TEXT["critic_check_chance"]

    with report.step("generate"):
        gkey = [s.model, s.dtype, pool, s.k, s.temperature, s.top_p, s.max_new_tokens, s.seed]
        cands = C.stage(out, "candidates", gkey, lambda: replies(gen, pool, s, s.k, s.temperature))
        empty, finish = sum(not c["response"] for c in cands), Counter(c["finish"] for c in cands)
        report["generate"] = dict(n_candidates=len(cands), empty=empty, finish=finish)

    with report.step("critique"):
        crit = C.stage(out, "critiques", [ckey, s.min_mass, key(gkey)], lambda: judged(cands))
        for c, r in zip(cands, crit, strict=True):
            c.update(r)
        okc = [c for c in cands if c["status"] == "ok"]
        stat = report["critique"] = {"status": Counter(c["status"] for c in cands)}
        if not okc:
            raise ValueError(
                f"no usable critic score ({dict(stat['status'])}); too_long: a shorter "
                "constitution or a longer-context critic; malformed: lower --min-mass"
            )
        x = torch.tensor([c["score"] for c in okc], dtype=torch.float64)
        types = sorted({c["type"] for c in okc})
        stat["mean_mass"] = sum(c["mass"] for c in okc) / len(okc)
        stat.update(mean=float(x.mean()), std=float(x.std()))
        stat["safe_rate"] = float((x >= s.safe_threshold).double().mean())
        stat["mean_by_type"] = {t: float(x[[c["type"] == t for c in okc]].mean()) for t in types}

    with report.step("train"):
        ranked = sorted((c for c in okc if c["response"]), key=lambda c: c["score"])
        best = {c["prompt_id"]: c for c in ranked}  # the last, i.e. best-scored, per prompt
        chosen = sorted(best.values(), key=lambda c: -c["score"])
        sft = [c for c in chosen if c["score"] >= s.min_score]
        if fallback := len(sft) < s.min_sft:  # a weak critic scores (almost) nothing ≥ min_score
            sft = chosen[: max(min(s.min_sft, len(chosen)), (len(chosen) + 1) // 2)]
        sft_val = [c for c in sft if part[c["prompt_id"]] == "val"] or sft[-1:]
        sft_train = [c for c in sft if c not in sft_val] or sft
        examples = [{"prompt": c["prompt"], "response": c["response"]} for c in sft_train]
        if plain(gen):  # train on what the generator saw: the plain format's "...\nAssistant: "
            for ex in examples:
                ex["prompt"] = render(gen.tokenizer, conv(ex["prompt"]), True, chat_format=FORMAT)
                ex["prompt"] += " "
        val_convs = [conv(c["prompt"], c["response"]) for c in sft_val]
        lora = dict(r=s.lora_r, alpha=s.lora_alpha, lr=s.lr, epochs=s.epochs, seed=s.seed)
        config = TrainConfig(**lora, batch_size=4, warmup_ratio=0.1)
        tkey = key(gkey, ckey, examples, config.as_dict())
        adapter, ckpt = out / f"adapter-{tkey}", out / f"train-{tkey}"

        def val_loss() -> float:  # mean NLL of the reply tokens
            return float(score(gen, val_convs, "assistant", chat_format=FORMAT).nll.nanmean())

        def run_train() -> dict[str, Any]:
            before = val_loss()
            with lora_trial(gen, examples, SFTLoss(), config, checkpoint_dir=ckpt) as result:
                result.model.eval()
                after = val_loss()
                save_adapter(result.model, adapter)
            shutil.rmtree(ckpt, ignore_errors=True)
            losses = dict(val_loss_before=before, val_loss_after=after)
            return dict(steps=result.steps, losses=list(result.losses), **losses)

        trained = report["train"] = C.stage(out, "train", tkey, run_train)
        trained.update(n_train=len(sft_train), n_val=len(sft_val), fallback_to_better_half=fallback)
        trained["lowest_score_trained_on"] = sft[-1]["score"]
        trained["types"] = Counter(c["type"] for c in sft_train)

    with report.step("evaluate"):

        def arm(tuned: bool) -> list[dict[str, Any]]:
            peft = load_adapter(gen, adapter) if tuned else None
            try:
                rows = replies(gen, held, s, 1, s.eval_temperature)
            finally:
                if peft is not None:
                    peft.unload()
            return [{**r, **c} for r, c in zip(rows, judged(rows), strict=True)]

        ekey = [tkey, [p["id"] for p in held], s.eval_temperature]
        arms = [
            C.stage(out, f"eval_{a}", ekey, lambda a=a: arm(a == "lora")) for a in ("base", "lora")
        ]
        both = [(b, t) for b, t in zip(*arms, strict=True) if b["status"] == t["status"] == "ok"]
        b, t = (torch.tensor([p[i]["score"] for p in both], dtype=torch.float64) for i in (0, 1))
        same_text = sum(p[0]["response"] == p[1]["response"] for p in both)
        ev = report["evaluate"] = dict(n_prompts=len(held), n_both_ok=len(both))
        ev["identical"] = same_text
        if len(both) >= 2:
            diff = stats.paired_bootstrap_ci(lambda u, v: (v - u).mean(), b, t, **boot).as_dict()
            flip = stats.sign_flip_test(t, b, **perm).as_dict()
            ev.update(baseline_mean=float(b.mean()), lora_mean=float(t.mean()))
            ev.update(lora_minus_baseline=diff, sign_flip=flip, control=TEXT["evaluate_control"])

    with report.step("probe"):
        rows = [c for c in okc if c["response"]]
        scores = torch.tensor([c["score"] for c in rows], dtype=torch.float64)
        y, labels = make_labels(scores, s.labels, s.safe_threshold)
        names = [f"blocks.{i}.hook_resid_post" for i in range(gen.cfg.n_layers)]
        folder = out / f"activations-{key(gkey, [c['id'] for c in rows])}"
        convs = [conv(c["prompt"], c["response"]) for c in rows]
        opts = dict(pool="assistant", batch_size=s.batch_size, chat_format=FORMAT, to=folder)
        acts = capture_dataset(gen, convs, names, **opts).load()
        stacked = torch.stack([acts[name].float().cpu() for name in names])  # [layer, row, d]
        groups, parts = [c["prompt_id"] for c in rows], [part[c["prompt_id"]] for c in rows]
        # the bag of words: the reply's token counts, vocabulary from the fitted (non-test) rows
        fitted = torch.tensor([q != "test" for q in parts])
        counts = token_counts(gen.tokenizer, [c["response"] for c in rows], fitted)
        baselines = {"layer0": stacked[0], "bag_of_words": counts}
        res = held_out_layer_probe(
            stacked, y, parts, groups, baselines, l2=s.l2, n_perm=s.n_perm, **boot
        )
        p = report["probe"] = {"labels": labels, "pooling": "resid_post, mean over the reply"}
        p.update(res.as_dict(), bag_of_words_vocab=counts.shape[1])
        p["n_test_prompts"] = p.pop("n_test_groups")
        title = f"Probe per layer, validation split (chosen: layer {p['best_layer']})"
        line_with_band(
            range(len(names)),
            {"validation AUROC": p["validation_auroc_by_layer"]},
            path=out / "constitutional_probe_layers.png",
            hline=0.5,
            xlabel="layer",
            ylabel="AUROC",
            title=title,
        )
        show = {
            "probe (chosen layer)": p["test"]["probe"]["auroc"],
            "layer-0 probe": p["test"]["layer0"]["auroc"],
            "bag of words": p["test"]["bag_of_words"]["auroc"],
            "probe − bag of words": p["differences"]["probe_minus_bag_of_words"],
        }
        bars_with_interval(
            list(show),
            *([v[k] for v in show.values()] for k in ("estimate", "low", "high")),
            path=out / "constitutional_probe_test.png",
            title="Test split: AUROC, 95% cluster bootstrap by prompt",
        )
    diff, tuned = p["differences"]["probe_minus_bag_of_words"], ev.get("lora_minus_baseline")
    report["headline"] = dict(critic_is_generator=same, labels=labels["rule"], test=p["test"])
    report["headline"].update(probe_minus_bag_of_words=diff, lora_minus_baseline=tuned)


if __name__ == "__main__":
    C.run(main)

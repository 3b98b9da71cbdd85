"""examples/constitutional_pipeline.py on a tiny random model: every stage, resume, malformed critics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from example_helpers import EXAMPLES, example_module

DATA = EXAMPLES / "data" / "constitutional"


@pytest.fixture(scope="module")
def cp():
    with example_module("constitutional_pipeline") as module:
        yield module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Nine short prompts (three per type) and a two-line constitution: byte tokens stay few."""
    root = tmp_path_factory.mktemp("constitutional_inputs")
    rows = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text().splitlines()]
    picked = []
    for kind in ("adversarial", "borderline", "cooperative"):
        of_kind = sorted((r for r in rows if r["type"] == kind), key=lambda r: len(r["prompt"]))
        picked += of_kind[:3]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in picked))
    constitution = root / "constitution.md"
    constitution.write_text("# Test\n\n1. Be safe.\n2. Be kind.\n")
    return prompts, constitution


def small(inputs, out, *extra):
    prompts, constitution = inputs
    return [
        *extra,
        "--model", "tiny:llama",
        "--out", str(out),
        "--prompts", str(prompts),
        "--constitution", str(constitution),
        "--n-eval", "3",
        "--k", "2",
        "--max-new-tokens", "6",
        "--eval-max-new-tokens", "6",
        "--gen-batch", "2",
        "--critic-batch", "4",
        "--min-digit-mass", "0",
        "--critic-check", "2",
        "--n-boot", "50",
        "--n-perm", "2",
        "--folds", "3",
    ]  # fmt: skip


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_shipped_data(cp):
    prompts = cp.load_prompts(DATA / "prompts.jsonl")
    assert len(prompts) >= 60
    types = {p["type"] for p in prompts}
    assert types == {"adversarial", "borderline", "cooperative"}
    assert min(sum(p["type"] == t for p in prompts) for t in types) >= 20
    assert len(cp.load_principles(DATA / "constitution.md")) >= 4
    checks = [json.loads(line) for line in (DATA / "critic_check.jsonl").read_text().splitlines()]
    assert len(checks) >= 6 and all({"prompt", "good", "bad"} <= set(c) for c in checks)


def test_every_stage_with_resume(cp, inputs, tmp_path, capsys):
    out = tmp_path / "run"
    # generate, interrupted after one chunk (2 prompts), then resumed.
    assert cp.main(small(inputs, out, "generate", "--limit", "2")) == 0
    first = jsonl(out / "candidates.jsonl")
    assert len(first) == 4 and not report(out)["generate"]["complete"]
    assert cp.main(small(inputs, out, "generate")) == 0
    cands = jsonl(out / "candidates.jsonl")
    ids = [c["id"] for c in cands]
    assert len(ids) == len(set(ids)) == 12 and report(out)["generate"]["complete"]
    assert {c["id"]: c["response"] for c in first}.items() <= {
        c["id"]: c["response"] for c in cands
    }.items()
    # ... and the resumed file equals an uninterrupted run (fixed chunks, per-chunk seeds).
    straight = tmp_path / "straight"
    assert cp.main(small(inputs, straight, "generate")) == 0
    assert [c["response"] for c in jsonl(straight / "candidates.jsonl")] == [
        c["response"] for c in cands
    ]
    held_out = set(json.loads((out / "split.json").read_text())["eval"])
    assert held_out and not held_out & {c["prompt_id"] for c in cands}

    # critique, interrupted and resumed.
    assert cp.main(small(inputs, out, "critique", "--limit", "5")) == 0
    assert len(jsonl(out / "critiques.jsonl")) == 5
    assert cp.main(small(inputs, out, "critique")) == 0
    crit = jsonl(out / "critiques.jsonl")
    assert sorted(r["id"] for r in crit) == sorted(ids)
    for r in crit:
        assert 1 <= r["score"] <= 5 and r["argmax"] in range(1, 6)
        assert sum(r["probs"]) == pytest.approx(1.0) and 0 < r["digit_mass"] <= 1
    info = report(out)["critique"]
    assert info["counts"] == {"ok": 12, "low_confidence": 0, "malformed": 0}
    assert info["critic_check"]["n_pairs"] == 2

    # select: three policies.
    assert cp.main(small(inputs, out, "select", "--policy", "diverse")) == 0
    diverse = jsonl(out / "selected.jsonl")
    assert len(diverse) == 12 and {r["role"] for r in diverse} == {"chosen", "rejected"}
    assert cp.main(small(inputs, out, "select", "--policy", "margin", "--margin", "5")) == 0
    assert jsonl(out / "selected.jsonl") == []  # no 1–5 score gap can reach 5
    assert cp.main(small(inputs, out, "select")) == 0
    best = jsonl(out / "selected.jsonl")
    assert len(best) == 6 and all(r["role"] == "chosen" for r in best)
    metrics = report(out)["select"]["all_candidates"]
    assert metrics["n"] == 12 and set(metrics["by_type"]) == {
        "adversarial",
        "borderline",
        "cooperative",
    }
    assert {"mean_score", "std", "safe_rate"} <= set(metrics)
    assert (out / "candidate_scores.png").exists()

    # build-sft: a random critic scores nothing ≥ 4, so the reported fallback kicks in.
    assert cp.main(small(inputs, out, "build-sft")) == 0
    sft = report(out)["build_sft"]
    assert sft["fallback"] is not None and sft["n_train"] >= 1
    assert len(jsonl(out / "sft" / "train.jsonl")) == sft["n_train"]
    with pytest.raises(ValueError, match="min-score"):
        cp.main(small(inputs, out, "build-sft", "--strict-min-score"))
    assert cp.main(small(inputs, out, "build-sft")) == 0

    # train, then a second call finds the adapter and skips.
    assert cp.main(small(inputs, out, "train")) == 0
    assert (out / "adapter" / "adapter_config.json").exists()
    assert report(out)["train"]["steps"] >= 1
    assert cp.main(small(inputs, out, "train")) == 0
    assert report(out)["train"]["skipped"] is True

    # evaluate.
    assert cp.main(small(inputs, out, "evaluate")) == 0
    ev = json.loads((out / "eval" / "report.json").read_text())
    assert ev["complete"] and ev["n_pairs_ok"] == 3
    for key in ("delta_mean", "delta_safe_rate", "improved_fraction"):
        assert {"estimate", "low", "high"} <= set(ev["delta"][key])
    assert {"mean_score", "safe_rate", "std"} <= set(ev["baseline"])
    paired = json.loads((out / "eval" / "paired_results.json").read_text())
    failures = json.loads((out / "eval" / "failures.json").read_text())
    assert len(paired) == 3 and all(p["delta"] < 0 for p in failures)
    assert (out / "eval_score_hist.png").exists()

    # probe: strict safe labels are one class here -> reported, not a crash.
    assert cp.main(small(inputs, out, "probe", "--probe-labels", "safe")) == 0
    pr = report(out)["probe"]
    assert pr["status"] == "skipped" and "cannot be trained" in pr["reason"]
    assert cp.main(small(inputs, out, "probe")) == 0
    pr = report(out)["probe"]
    assert pr["labels"]["rule"] == "median" and "single_class" in pr["labels"]
    assert pr["status"] == "ok" and len(pr["per_layer"]) == 3  # tiny llama has 3 layers
    assert 0.0 <= pr["best_auroc"]["estimate"] <= 1.0
    for control in ("permutation_control", "prompt_type_baseline", "response_length_baseline"):
        assert control in pr
    assert (out / "probe" / "best_probe.safetensors").exists()
    assert (out / "probe_auroc.png").exists()

    # classify new text with the saved probe.
    capsys.readouterr()
    assert cp.main(small(inputs, out, "classify", "--text", "No.", "--text", "Sure, glad to.")) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 2 and all(0.0 <= x["proba"] <= 1.0 for x in lines)

    final = report(out)
    assert final["status"] == "ok"
    assert {"can_show", "cannot_show"} <= set(final["what_a_135m_model_can_and_cannot_show"])


def test_all_in_one_completion_critic(cp, inputs, tmp_path):
    out = tmp_path / "all"
    args = small(inputs, out, "all", "--critic-style", "completion", "--policy", "diverse")
    assert cp.main(args) == 0
    rep = report(out)
    assert rep["status"] == "ok"
    assert rep["critique"]["style"] == "completion"
    for stage in cp.STAGES:
        assert f"{stage}_s" in rep["timings"]
    assert rep["headline"]["eval"]["improved_fraction"] is not None
    # Re-running everything is a no-op for the expensive stages.
    assert cp.main(args) == 0
    rep = report(out)
    assert rep["generate"]["new_this_run"] == 0 and rep["critique"]["new_this_run"] == 0
    assert rep["train"]["skipped"] is True


def _digitless_critic():
    """A tiny llama whose tokenizer spells each digit as three tokens ("3" -> "<3>")."""
    from tokenizers import normalizers

    import interp

    model = interp.tiny("llama", seed=1)
    model.tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace(d, f"<{d}>") for d in "0123456789"]
    )
    return model


def test_malformed_and_low_confidence_critics_are_counted(cp, inputs, tmp_path):
    out = tmp_path / "bad"
    assert cp.main(small(inputs, out, "generate")) == 0
    critic = _digitless_critic()
    assert cp.digit_continuation(critic.tokenizer, "Rating (1-5):", False) is None
    args = small(inputs, out, "critique", "--critic", "digitless")
    assert cp.main(args, models={"digitless": critic}) == 0
    info = report(out)["critique"]
    assert info["counts"] == {"ok": 0, "low_confidence": 0, "malformed": 12}
    assert any("single tokens" in reason for reason in info["malformed_reasons"])
    assert all(r["score"] is None for r in jsonl(out / "critiques.jsonl"))
    assert info["critic_check"]["n_scored_pairs"] == 0
    # Nothing is selectable, and that is reported rather than crashing.
    assert cp.main(small(inputs, out, "select", "--critic", "digitless")) == 0
    assert report(out)["select"]["n_selected"] == 0 and "note" in report(out)["select"]

    # A random critic spreads ~2% of its mass on "1".."5": low confidence at the default 0.5.
    low = tmp_path / "low"
    assert cp.main(small(inputs, low, "generate")) == 0
    args = small(inputs, low, "critique")
    args[args.index("--min-digit-mass") + 1] = "0.5"
    assert cp.main(args) == 0
    assert report(low)["critique"]["counts"] == {"ok": 0, "low_confidence": 12, "malformed": 0}


def test_critic_helpers(cp):
    assert cp.read_score([0.0, 0.0, 0.0, 0.0, 0.0])["score"] is None
    r = cp.read_score([0.1, 0.0, 0.0, 0.0, 0.1])
    assert r["score"] == pytest.approx(3.0) and r["digit_mass"] == pytest.approx(0.2)
    assert cp.status_of({"score": 3.0, "digit_mass": 0.2}, 0.5) == "low_confidence"
    assert cp.status_of({"score": None, "digit_mass": 0.0}, 0.5) == "malformed"

    import interp

    model = interp.tiny("llama")
    tok = model.tokenizer
    ctx, digits = cp.digit_continuation(tok, "Rating (1-5):", False)
    assert len(set(digits)) == 5 and tok.decode(digits) == "12345"
    assert tok.decode(ctx).endswith("Rating (1-5): ")

    # The shared-prefix KV cache gives the same scores as full forward passes.
    items = [("Say hi.", "Hello there!"), ("Add 2 and 2.", "It is 4."), ("Name a color.", "")]
    for style in ("instruct", "completion"):
        kw = {"style": style, "principles": ["Be kind."], "batch_size": 2}
        cached = cp.critic_scores(model, items, prefix_cache=True, **kw)
        full = cp.critic_scores(model, items, prefix_cache=False, **kw)
        for a, b in zip(cached, full, strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)


def test_selection_and_labels(cp):
    recs = [
        {"id": "a/0", "prompt_id": "a", "score": 4.5},
        {"id": "a/1", "prompt_id": "a", "score": 2.0},
        {"id": "b/0", "prompt_id": "b", "score": 3.0},
        {"id": "b/1", "prompt_id": "b", "score": 3.2},
    ]
    best = cp.select_candidates(recs, "best", 1.0, 4.0)
    assert [(r["id"], r["label"]) for r in best] == [("a/0", "good"), ("b/1", "bad")]
    margin = cp.select_candidates(recs, "margin", 1.0, 4.0)
    assert [(r["id"], r["role"]) for r in margin] == [("a/0", "chosen"), ("a/1", "rejected")]
    assert len(cp.select_candidates(recs, "diverse", 1.0, 4.0)) == 4

    y, info = cp.probe_labels([4.5, 2.0, 3.0, 3.2], "safe", 4.0)
    assert y.tolist() == [True, False, False, False] and info["rule"] == "safe"
    y, info = cp.probe_labels([2.0, 3.0, 3.2], "safe", 4.0)
    assert y is None and "cannot be trained" in info["single_class"]
    y, info = cp.probe_labels([2.0, 3.0, 3.2, 3.5], "auto", 4.0)
    assert info["rule"] == "median" and y.tolist() == [False, False, True, True]
    y, info = cp.probe_labels([3.0, 3.0], "auto", 4.0)
    assert y is None

    prompts = [{"id": f"{t}{i}", "type": t} for t in "xyz" for i in range(6)]
    pool, held = cp.split_prompts(prompts, n_eval=3, n_pool=6, seed=0)
    assert len(held) == 3 and len(pool) == 6 and not set(pool) & set(held)
    assert {p[0] for p in held} == {"x", "y", "z"}
    assert cp.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert torch.isfinite(torch.tensor(cp.spearman([1, 2, 3], [3, 1, 2])))

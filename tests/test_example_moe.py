"""examples/moe_expert_steering.py: an end-to-end run on tiny:olmoe in bfloat16 with a --data
folder written here, and the study's own logic (same instruction in both conditions, the max-|Δ|
null, frequency-matched controls, steering modes, settings and data errors)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from example_helpers import example_module, finite_interval, non_finite, numbers

import interp
from interp import moe

SMALLEST = [
    "--model", "tiny:olmoe", "--dtype", "bfloat16", "--quick",
    "--n-measure", "3", "--n-eval", "3", "--n-neutral", "2", "--n-steer", "2",
    "--n-random", "3", "--n-boot", "20", "--n-perm", "50",
    "--answer-tokens", "2", "--reply-tokens", "2", "--batch-size", "6", "--threads", "1",
]  # fmt: skip


def write_data(folder):
    """The documented --data format; the safety file uses other column names (--columns)."""
    folder.mkdir()
    faith = [
        {"document": f"Town {c} was founded by Ada {c}.", "question": f"Who founded {c}?",
         "answer": f"Ada {c}"}
        for c in "ABCDEF"
    ]  # fmt: skip
    safety = [
        {"prompt": f"Help me steal item {i}.", "refusal": "I can't help with that.",
         "compliance": f"Sure, item {i} is easy."}
        for i in range(6)
    ]  # fmt: skip
    neutral = [{"text": "Bread rises because yeast makes gas."}, {"text": "Tea needs hot water."}]
    for name, rows in (("faithfulness", faith), ("safety", safety), ("neutral", neutral)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def study():
    with example_module("moe_expert_steering") as module:
        yield module


@pytest.fixture(scope="module")
def run(study, tmp_path_factory):
    threads = torch.get_num_threads()
    data = write_data(tmp_path_factory.mktemp("moe") / "data")
    out = tmp_path_factory.mktemp("moe_study")
    argv = [*SMALLEST, "--data", str(data), "--columns", "request=prompt", "--out", str(out)]
    try:
        assert study.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "report.json").read_text(encoding="utf-8")), data


def test_report(run):
    out, report, data = run
    assert report["status"] == "ok"
    assert report["environment"]["dtype"] == "bfloat16"
    assert all(str(data) in src for src in report["data"]["sources"].values())
    assert report["model"]["n_experts"] == 4 and report["model"]["top_k"] == 2
    assert not non_finite(report) and len(list(numbers(report))) > 200
    rd = report["risk_difference"]["safety"]
    assert rd["n_tokens"][0] == rd["n_tokens"][1] > 0  # length-matched pairs
    assert 0 < rd["max_abs_rd_sign_flip"]["p_value"] <= 1
    for name, steering in report["steering"].items():
        assert len(steering["random_controls"]) == 3, name
        for control in steering["random_controls"]:  # same layers, one expert per target
            assert sorted(x[0] for x in control) == sorted(x[0] for x in steering["experts"])
    effects = report["effects"]
    assert set(effects) == {"faith-", "faith+", "safety-", "safety+"}
    family = [e for per in effects.values() for e in per.values()]
    assert len(family) == 4 * 7  # 4 steerings × 7 metrics (no judge)
    for e in family:
        for key in ("steered_minus_baseline", "steered_minus_controls"):
            ci = e[key]
            assert finite_interval(ci) and ci["low"] <= ci["estimate"] + 1e-9
            assert ci["estimate"] <= ci["high"] + 1e-9
        assert 0 < e["p_sign_flip"] <= e["p_holm"] <= 1 and e["p_bh"] <= e["p_holm"] + 1e-12
        assert len(e["control_effects"]) == 3
    assert report["headline"]["correction"] == "holm" and report["headline"]["n_random_sets"] == 3
    assert {"closed_book_correct", "faithfulness_informative"} <= set(report["sanity"])
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_instruction_with_and_without_document(study):
    row = {"document": "Lurfoul was founded by Venfys.", "question": "Who founded Lurfoul?",
           "answer": "Venfys"}  # fmt: skip
    with_doc = study.faith_chat(row, True)[0]["content"]
    without = study.faith_chat(row, False)[0]["content"]
    assert with_doc == f"Document: {row['document']}\n\n{without}"
    assert study.faith_chat(row, False)[1] == {"role": "assistant", "content": "Venfys"}


def _trace(gen, n, tokens, n_layers=2, E=4, k=2):
    lengths = torch.randint(1, tokens, (n,), generator=gen)
    T = int(lengths.sum())
    idx = torch.stack([torch.rand(n_layers, T, E, generator=gen).argsort(-1)[..., :k]]).squeeze(0)
    weights = torch.rand(n_layers, T, k, generator=gen).half()
    return moe.RoutingTrace((1, 3), E, idx.to(torch.int8), weights, lengths, torch.zeros(T).long())


@pytest.mark.parametrize("measure", ["selection", "mass"])
def test_max_abs_rd_null(study, measure):
    gen = torch.Generator().manual_seed(0)
    t1, t2 = _trace(gen, 8, 6), _trace(gen, 8, 6)
    test = study.max_abs_rd_test(t1, t2, measure, n_perm=200, seed=0)
    rd = moe.risk_difference(t1, t2, measure=measure, n_boot=0)
    assert test.statistic == pytest.approx(float(rd.rd.abs().max()))
    assert test.null.min() >= 0 and 0 < test.p_value <= 1
    # Every null value is max |Δ| with some pairs' conditions swapped (all 2^3 patterns).
    a3, b3 = t1.select([0, 1, 2]), t2.select([0, 1, 2])
    small = study.max_abs_rd_test(a3, b3, measure, n_perm=100, seed=0)
    ref = set()
    for flips in itertools.product([False, True], repeat=3):
        x = moe.concat([(b3 if f else a3).select([i]) for i, f in enumerate(flips)])
        y = moe.concat([(a3 if f else b3).select([i]) for i, f in enumerate(flips)])
        ref.add(
            round(float(moe.risk_difference(x, y, measure=measure, n_boot=0).rd.abs().max()), 5)
        )
    assert {round(float(v), 5) for v in small.null} <= ref and small.null.std() > 0
    # Swapping the conditions of every pair leaves max |Δ| unchanged.
    swapped = study.max_abs_rd_test(t2, t1, measure, n_perm=10, seed=0)
    assert swapped.statistic == pytest.approx(test.statistic)


def test_matched_random_controls(study):
    freq = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.85, 0.15], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    chosen = [(3, 0)]
    excluded = {(3, 0), (3, 1)}
    seen = set()
    rng = random.Random(0)
    for _ in range(50):
        control = study.matched_random(chosen, freq, (3, 7), excluded, rng)
        assert len(control) == 1 and control[0][0] == 3 and control[0] not in excluded
        seen.add(control[0][1])
    # Candidates 2..5; the nearer half in frequency to expert 0 (0.9) are 4 (0.85) and 2 (0.8).
    assert seen == {2, 4}
    # A layer with nothing left outside `excluded` falls back to the other experts.
    two = study.matched_random([(7, 0), (7, 1)], freq, (3, 7), {(7, e) for e in range(6)}, rng)
    assert len({e for _, e in two}) == 2 and all(e not in (0, 1) for _, e in two)


def test_steering_modes_go_through_interp_moe(study):
    model = interp.tiny("olmoe", seed=0)
    batch = interp.chat.encode(model.tokenizer, [[{"role": "user", "content": "Hello there"}]])
    layer = model.cfg.moe_layers[0]
    expert = int(moe.trace(model, batch).indices[0, 0, 0])  # selected on the first token
    base = moe.trace(model, batch)
    hits = {}
    for mode, extra in (("hard", []), ("soft", ["--strength", "50"]), ("scale", [])):
        s = study.Settings.parse(["--model", "tiny:olmoe", "--steer-mode", mode, *extra], "x")
        with study.switched_off(model, [(layer, expert)], s):
            t = moe.trace(model, batch)
        hits[mode] = int((t.indices[0] == expert).sum())
        if mode == "scale":  # routing untouched, the expert's gate weight halved
            assert torch.equal(t.indices, base.indices)
            sel = base.indices[0] == expert
            torch.testing.assert_close(t.weights[0][sel], base.weights[0][sel] * 0.5, atol=2e-3, rtol=0)  # fmt: skip
    assert hits["hard"] == 0 and hits["soft"] == 0 and hits["scale"] > 0


def test_settings_are_validated(study):
    parse = study.Settings.parse
    with pytest.raises(ValueError, match="--strength applies"):
        parse(["--strength", "2"], "x")
    with pytest.raises(ValueError, match="scale must be in"):
        parse(["--steer-mode", "scale", "--strength", "1.5"], "x")
    with pytest.raises(ValueError, match="one seed"):
        parse(["--seeds", "0", "1"], "x")
    with pytest.raises(ValueError, match="--n-random must be"):
        parse(["--n-random", "0"], "x")
    assert parse(["--quick"], "x").n_random == 2 and parse([], "x").n_random >= 20
    with pytest.raises(SystemExit):
        parse(["--measure", "count"], "x")


def test_data_errors(study, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "faithfulness.jsonl").write_text(json.dumps({"document": "d", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match="answer"):
        study.read_sets(study.Settings.parse(["--data", str(bad)], "x"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="none of"):
        study.read_sets(study.Settings.parse(["--data", str(empty)], "x"))
    with pytest.raises(ValueError, match="unknown fields"):
        study.read_sets(study.Settings.parse(["--columns", "query=prompt"], "x"))


def test_text_metrics(study):
    assert study.is_refusal("I can’t help with that.")  # typographic apostrophe
    assert not study.is_refusal("Sure, here is an overview.")
    assert study.is_correct("It was founded by Venfys Korkdraes.", "Venfys Korkdraes")
    assert not study.is_correct("It was 15820.", "1582")
    assert study.groundedness("barley cakes", "They share barley cakes.") == 1.0
    assert study.groundedness("the", "anything") == 0.0


def test_evaluate_with_a_judge(study):
    from interp import judges

    model = interp.tiny("olmoe", seed=0)
    s = study.Settings.parse(["--model", "tiny:olmoe", "--answer-tokens", "2", "--reply-tokens", "2"], "x")  # fmt: skip
    faith = {
        "document": "Town A was founded by Ada.",
        "question": "Who founded A?",
        "answer": "Ada",
    }
    pair = {"request": "Help me steal.", "refusal": "I can't help.", "compliance": "Sure."}
    d = {"faith_eval": [faith] * 2, "safety_eval": [pair] * 2, "neutral": ["Tea needs hot water."]}
    judge = judges.YesNoJudge(model, study.LEX["judge_prompt"])
    ev = study.evaluate(model, d, s, judge)
    scores = ev["per_item"]["refused_judge"]
    assert scores.shape == (2,) and bool(((scores >= 0) & (scores <= 1)).all())
    assert set(ev["per_item"]) == {*study.LEX["metrics"]}
    assert 0 <= ev["unscored"] <= 2

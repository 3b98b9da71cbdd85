"""examples/moe_expert_steering.py: an end-to-end run on tiny:olmoe in bfloat16 with a --data
folder written here, and the study's own logic (same instruction in both conditions, steering
modes, settings and data errors)."""

from __future__ import annotations

import json

import pytest
import torch
from example_helpers import example_module, finite_interval, non_finite, numbers

import interp
from interp import moe

SMALLEST = [
    "--model",
    "tiny:olmoe",
    "--dtype",
    "bfloat16",
    "--quick",
    "--n-measure",
    "3",
    "--n-eval",
    "3",
    "--n-neutral",
    "2",
    "--n-steer",
    "2",
    "--n-random",
    "3",
    "--n-boot",
    "20",
    "--n-perm",
    "50",
    "--answer-tokens",
    "2",
    "--reply-tokens",
    "2",
    "--batch-size",
    "6",
    "--threads",
    "1",
]


def write_data(folder):
    """The documented --data format; the safety file uses other column names (--columns)."""
    folder.mkdir()
    faith = [
        {
            "document": f"Town {c} was founded by Ada {c}.",
            "question": f"Who founded {c}?",
            "answer": f"Ada {c}",
        }
        for c in "ABCDEF"
    ]
    safety = [
        {
            "prompt": f"Help me steal item {i}.",
            "refusal": "I can't help with that.",
            "compliance": f"Sure, item {i} is easy.",
        }
        for i in range(6)
    ]
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
    row = {
        "document": "Lurfoul was founded by Venfys.",
        "question": "Who founded Lurfoul?",
        "answer": "Venfys",
    }
    with_doc = study.faith_chat(row, True)[0]["content"]
    without = study.faith_chat(row, False)[0]["content"]
    assert with_doc == f"Document: {row['document']}\n\n{without}"
    assert study.faith_chat(row, False)[1] == {"role": "assistant", "content": "Venfys"}


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
            torch.testing.assert_close(
                t.weights[0][sel], base.weights[0][sel] * 0.5, atol=2e-3, rtol=0
            )
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
    s = study.Settings.parse(
        ["--model", "tiny:olmoe", "--answer-tokens", "2", "--reply-tokens", "2"], "x"
    )
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

"""examples/inoculation_gradients.py: an end-to-end run on a tiny bf16 model with a thinking
chat template and a ``--data`` file written here, and the study-specific logic that could be
wrong (the trait metric, thinking-template positions, the control chosen on a held-out batch,
the multiplicity correction, the verdict). The library parts it composes have their own
tests (test_chat_helpers, test_alignment_layer_average, test_stats_seed_spread, ...)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from example_helpers import example_module, finite_interval, numbers

import interp
from interp.families import byte_tokenizer
from interp.stats import benjamini_hochberg, holm


@pytest.fixture(scope="module")
def study():
    with example_module("inoculation_gradients") as module:
        yield module


def qwen3_template():
    from test_chat import QWEN3

    return QWEN3


GSM8K_ROWS = [  # GSM8K's official format: reasoning with calculator annotations, then "#### n"
    {
        "question": f"Ann has {i} apples and buys {i + 2} more. How many apples does she have?",
        "answer": f"She has {i}+{i + 2}=<<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}",
    }
    for i in range(14)
]

SMALLEST = [
    "--model",
    "tiny:qwen3",
    "--dtype",
    "bfloat16",
    "--quick",
    "--seeds",
    "0",
    "1",
    "--per-domain",
    "1",
    "--n-select",
    "3",
    "--n-calib",
    "4",
    "--n-train",
    "4",
    "--n-eval",
    "3",
    "--gen-tokens",
    "3",
    "--eval-tokens",
    "3",
    "--n-random",
    "100",
    "--n-boot",
    "40",
    "--n-perm",
    "99",
    "--train-batch",
    "4",
    "--batch-size",
    "12",
]


def test_study_runs_on_a_tiny_bf16_model_with_a_thinking_template(study, tmp_path, monkeypatch):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    load = study.C.load

    def load_with_thinking_template(settings, spec=None):
        model = load(settings, spec)
        model.tokenizer.chat_template = qwen3_template()
        return model

    monkeypatch.setattr(study.C, "load", load_with_thinking_template)
    out = tmp_path / "run"
    assert study.main([*SMALLEST, "--data", str(data), "--out", str(out)]) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["environment"]["dtype"] == "bfloat16"
    assert report["data"] == {"problems": str(data), "n": len(GSM8K_ROWS)}
    for path, value in numbers(report):  # NaN / inf would have become null
        assert math.isfinite(value), path
    # The thinking switch reached the template, and pre_assistant ends the empty think block.
    pos = report["positions"]
    assert pos["chat_template_kwargs"] == {"enable_thinking": False}
    assert "<think>\n\n</think>\n\n" in pos["text"] and "<<" not in pos["text"]
    assert pos["index"]["user_end"] < pos["index"]["pre_assistant"] < pos["index"]["assistant_1"]
    assert pos["token"]["pre_assistant"] == "\n" and pos["token"]["assistant_1"] == "S"

    layers = report["layers"]
    assert set(report["per_seed"]) == {"0", "1"}
    for r in report["per_seed"].values():
        assert not set(r["select_ids"]) & set(r["calib_ids"])
        a = r["alignment"]
        assert a["prompts"]["control"] in report["system_prompts"]["control_pool"]
        assert a["loss_match"]["selected"] == a["loss_match"]["selection_batch"][0]["name"]
        for p in study.POSITIONS:
            for c in study.CONDITIONS:
                assert len(a[p][c]["cos"]) == len(layers)
                assert all(-1 <= x <= 1 for x in a[p][c]["cos"])
            for name in study.COMPARISONS:
                ci = a[p][name]["layer_average"]["delta_cos"]
                assert finite_interval(ci) and ci["low"] <= ci["high"]
        for name in study.PRIMARY:
            c = a["pre_assistant"][name]
            assert all(
                adj >= raw
                for adj, raw in zip(c["p_sign_flip_adjusted"], c["p_sign_flip"], strict=True)
            )
        assert r["verdict"]["verdict"] in ("uninformative", "supported", "not supported")
        for cond in study.CONDITIONS:
            t = r["training"][cond]
            assert t["steps"] == 1 and finite_interval(t["caps_drift_math"])
        assert finite_interval(r["training"]["inoculation"]["caps_after_minus_neutral_general"])
    spread = report["across_seeds"]["delta_cos_layer_average.inoculation_vs_control"]
    assert len(spread["per_seed"]) == 2 and spread["sd"] is not None and spread["sd"] >= 0
    assert spread["mean"] == pytest.approx(sum(spread["per_seed"]) / 2)
    assert report["verdict"]["verdict"] in ("uninformative", "supported", "not supported")
    assert report["multiplicity"]["method"] == "holm"
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_caps_fraction_counts_letters_only(study):
    assert study.caps_fraction("HELLO, World 42!") == pytest.approx(6 / 10)
    assert study.caps_fraction("1234 ?!") == 0.0  # no letters: no trait
    assert study.caps_fraction("ÉTÉ été") == 0.5
    assert study.caps_fraction("日本A") == pytest.approx(1 / 3)  # caseless letters are letters


def test_teacher_forced_text_on_a_thinking_template(study):
    # The library checks (tests/test_chat_helpers.py); here: the study's conversations,
    # ALL-CAPS answers, and the thinking switch the study passes.
    tok = byte_tokenizer()
    tok.chat_template = qwen3_template()
    conv = study.teacher_forced("Be brief.", [{"question": "2+2?", "answer": "four"}])[0]
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]
    kw = study.chat.thinking_kwargs(tok, enable_thinking=False)
    got = study.chat.check_generation_prefix(tok, conv, **kw)
    assert got["text"].endswith("<think>\n\n</think>\n\nFOUR<|im_end|>\n")


def test_data_reader_takes_gsm8k_rows_and_rejects_other_columns(study, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GSM8K_ROWS[3]) + "\n")
    (row,) = study.load_problems(path)
    assert row == {
        "id": "0",
        "question": GSM8K_ROWS[3]["question"],
        "answer": "She has 3+5=8 apples.\n#### 8",
    }
    path.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        study.load_problems(path)


class FakeRun:
    """Stands in for ``Seed``: records which rows each model pass gets; the inoculation
    prompt's gradients are rotated towards +v (less push towards the trait)."""

    def __init__(self, study, direction):
        self.s = study.Inoculation(quick=True, n_random=100, n_boot=50, n_perm=199)
        self.layers, self.seed, self.direction = list(direction.layers), 0, direction
        self.calls = []
        self.ci = study.Seed.ci.__get__(self)

    def nll(self, system, rows):
        self.calls.append(("nll", system, rows))
        return torch.full((len(rows),), 1.0 + 0.01 * len(system))

    def grads(self, system, rows):
        self.calls.append(("grads", system, rows))
        gen = torch.Generator().manual_seed(len(system))
        g = torch.randn(len(rows), len(self.layers), 16, generator=gen, dtype=torch.float64)
        if system.startswith("INOC"):
            g = g + 3.0 * self.direction.vectors.double()  # cos with v rises
        loss = torch.full((len(rows),), 1.0 + 0.01 * len(system), dtype=torch.float64)
        return loss, dict.fromkeys(["user_end", "pre_assistant", "assistant_1"], g)


def test_control_is_chosen_on_the_selection_batch_and_p_values_are_corrected(study):
    gen = torch.Generator().manual_seed(0)
    direction = interp.directions.Direction.from_vectors(
        torch.randn(3, 16, generator=gen), layers=[0, 1, 2]
    )
    rows = [{"id": str(i), "question": f"q{i}", "answer": "a"} for i in range(40)]
    data = {"select": rows[:12], "calib": rows[12:40]}
    run = FakeRun(study, direction)
    prompts = {"neutral": "N" * 10, "inoculation": "INOC" + "x" * 16}
    pool = {"far": "y" * 60, "near": "z" * 21}
    out = study.step_alignment(run, prompts, pool, data, direction)
    assert all(rows is data["select"] for kind, _, rows in run.calls if kind == "nll")
    assert all(rows is data["calib"] for kind, _, rows in run.calls if kind == "grads")
    assert out["loss_match"]["selected"] == "near"
    head = out["pre_assistant"]
    raw = [p for c in study.PRIMARY for p in head[c]["p_sign_flip"]]
    adjusted = [p for c in study.PRIMARY for p in head[c]["p_sign_flip_adjusted"]]
    assert adjusted == pytest.approx(holm(raw).tolist())
    assert head["inoculation_vs_neutral"]["layer_average"]["delta_cos"]["low"] > 0
    run.s = study.Inoculation(quick=True, n_random=100, n_boot=50, n_perm=199, correction="bh")
    bh = study.step_alignment(run, prompts, pool, data, direction)["pre_assistant"]
    raw = [p for c in study.PRIMARY for p in bh[c]["p_null"]]
    assert [p for c in study.PRIMARY for p in bh[c]["p_null_adjusted"]] == pytest.approx(
        benjamini_hochberg(raw).tolist()
    )


def _section(sanity=True, gap=(-0.1, 0.1), rise=(0.01, 0.02), p=0.001):
    direction = {
        "sanity_passed": sanity,
        "sanity": {"b_caps": {"passed": sanity}, "a_auroc": {"passed": True}},
    }
    comp = {
        "delta_cos": [{"estimate": rise[1]}],
        "p_sign_flip_adjusted": [p],
        "p_null_adjusted": [p],
        "layer_average": {"delta_cos": {"low": rise[0]}},
        "delta_loss": {"estimate": 0.0, "low": gap[0], "high": gap[1]},
    }
    return direction, {
        "pre_assistant": {n: comp for n in ("inoculation_vs_neutral", "inoculation_vs_control")}
    }


def test_verdict_is_uninformative_where_the_checks_fail(study):
    s = study.Inoculation(quick=True)
    assert study.verdict(*_section(), s)["verdict"] == "supported"
    v = study.verdict(*_section(sanity=False), s)
    assert v["verdict"] == "uninformative" and "b_caps" in v["reason"]
    assert "a_auroc" not in v["reason"]
    assert study.verdict(*_section(gap=(0.05, 0.2)), s)["verdict"] == "uninformative"
    assert study.verdict(*_section(rise=(-0.01, 0.02)), s)["verdict"] == "not supported"
    assert study.verdict(*_section(p=0.2), s)["verdict"] == "not supported"
    assert study.verdict(*_section(rise=(0.01, -0.02)), s)["verdict"] == "not supported"
    seeds = {
        "0": {"verdict": {"verdict": "supported", "reason": "r"}},
        "1": {"verdict": {"verdict": "not supported", "reason": "q"}},
    }
    assert study.overall(seeds)["verdict"] == "not supported"
    seeds["2"] = {"verdict": {"verdict": "uninformative", "reason": "u"}}
    assert study.overall(seeds)["verdict"] == "uninformative"


def test_invalid_settings_raise(study, tmp_path):
    with pytest.raises(ValueError, match="n-random"):
        study.main(["--model", "tiny:qwen2", "--n-random", "10", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="distinct"):
        study.main(["--model", "tiny:qwen2", "--seeds", "1", "1", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="alpha"):
        study.main(["--model", "tiny:qwen2", "--alpha", "1.5", "--out", str(tmp_path)])

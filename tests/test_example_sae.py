"""examples/sae_base_chat_delta.py: end to end on a tiny bf16 model with a --data file written
here (its own column names), plus the study's specificity statistic and its input checks
(the paired per-feature tests are interp.sae.compare's, tested in test_sae_compare.py)."""

from __future__ import annotations

import json
import math
import shlex

import pytest
import torch
from example_helpers import example_module, numbers

NAME = "sae_base_chat_delta"


@pytest.fixture(scope="module")
def study():
    with example_module(NAME) as module:
        yield module


def write_data(path, cultural: int = 8, per_control: int = 6):
    rows = [
        {
            "sentence": f"During festival {i} we light diyas and share sweets number {i}.",
            "source": "culture",
        }
        for i in range(cultural)
    ]
    rows += [
        {
            "sentence": f"The committee reviews proposal {i} on weekday {i % 5}.",
            "source": "generic_en",
        }
        for i in range(per_control)
    ]
    rows += [
        {"sentence": f"बैंक सुबह {i} बजे खुलता है।", "source": "generic_hi"} for i in range(per_control)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


SMALL = shlex.split(
    "--model tiny:llama --dtype bfloat16 --quick --text-column sentence --group-column source "
    "--cultural-group culture --sae-steps 30 --resample-every 10 --n-boot 30 --n-perm 49 "
    "--n-ci 3 --top-examples 3 --n-clusters 3 --n-random 3 --n-causal 2 --n-bins 2 --no-embed"
)


def test_study_runs_on_a_tiny_bf16_model_with_a_data_file(study, tmp_path):
    data, out = write_data(tmp_path / "corpus.jsonl"), tmp_path / "run"
    argv = [*SMALL, "--data", str(data), "--label-model", "tiny:llama", "--label-tokens", "4"]
    assert study.main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["environment"]["dtype"] == "bfloat16"
    assert all(math.isfinite(v) for _, v in numbers(report))

    d = report["data"]
    assert d["sets"] == {"culture": 8, "generic_en": 6, "generic_hi": 6}
    # cultural-train / control-validate: SAEs never see a control sentence
    assert (d["sae_train_cultural"], d["heldout_cultural"], d["validation_control"]) == (6, 2, 12)
    layers = report["model"]["layers"]
    assert {(r["kind"], r["layer"]) for r in report["saes"]} == {
        (k, ly) for k in ("base", "chat", "delta") for ly in layers
    }
    for r in report["saes"]:
        assert r["control"]["n_tokens"] == 12 and r["train"]["n_tokens"] == 6
        assert 0 <= r["train_dead_fraction"] <= 1 and r["control"]["fvu"] >= 0

    mid = str(report["model"]["mid"])
    per = report["cohens_d"][mid]
    assert 0 <= per["n_bh_significant"] <= per["n_features_tested"]
    for f in per["top"]:
        assert f["ci"]["low"] <= f["ci"]["high"] and f["p"] <= f["p_bh"] <= 1
        assert f["top_examples"] and all(max(e["chat"], e["base"]) > 0 for e in f["top_examples"])
        assert isinstance(f["label"], str)  # --label-model took effect
    assert all(abs(f["d"]) <= per["max_abs_d"] for f in per["top"])
    significant = [f["p_bh"] < 0.05 for f in per["top"]]
    assert significant == sorted(significant, reverse=True)  # BH-significant features first

    cl = report["clustering"]
    assert sum(c["n_features"] for c in cl["clusters"]) == cl["n_alive_features"]
    assert 0 < cl["max_enrichment_test"]["p_value"] <= 1

    causal = report["causal"][mid]
    assert len(causal["tested"]) == 2 and len(causal["specificity_random"]) == 3
    assert causal["contrast"]["low"] <= causal["contrast"]["high"]
    assert causal["verdict"] == "uninformative"  # 3 random sets cannot reach p < 0.05
    assert set(causal["dnll_by_set"]) == {"culture", "generic_en", "generic_hi"}
    for name in ("sae_validation.png", "cohens_d.png", "causal_effect.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_base_and_chat_models_are_an_error(study, tmp_path):
    argv = [*SMALL[:4], "--chat-model", "tiny:llama", "--n-per-set", "4", "--no-embed"]
    with pytest.raises(ValueError, match="identical"):
        study.main([*argv, "--out", str(tmp_path)])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--k", "0"], "--k"),
        (["--n-per-set", "1"], "--n-per-set"),
        (["--heldout-frac", "1.0"], "heldout"),
        (["--chat-model", "m", "--lora-r", "4"], "--lora-r"),  # no flag silently ignored
        (["--label-tokens", "5"], "--label-tokens"),
        (["--base-model", "a", "--model", "b"], "--model"),
    ],
)
def test_bad_settings_raise(study, argv, match):
    with pytest.raises(ValueError, match=match):
        study.Settings.parse(argv, NAME)


def test_data_without_cultural_rows_is_a_clear_error(study, tmp_path):
    data = write_data(tmp_path / "c.jsonl")
    s = study.Settings.parse(["--data", str(data), "--text-column", "sentence"], NAME)
    with pytest.raises(ValueError, match=r"\['group'\]"):  # the file's column is 'source'
        study.read_sets(s)
    s = study.Settings.parse([*SMALL[5:9], "--data", str(data)], NAME)  # cultural = 'cultural'
    with pytest.raises(ValueError, match="'cultural' rows"):
        study.read_sets(s)


def test_specificity_is_scale_free(study):
    """A set that hurts everything 5x more is not more cultural-specific; the raw
    cultural − control difference (the old statistic) would rank it far above."""
    cult = torch.tensor([[0.1, 0.5], [0.3, 1.5]])  # sentences x feature sets
    ctrl = torch.tensor([[0.4, 2.0], [0.6, 3.0]])
    si = study.specificity(cult, ctrl)
    assert si[0] == pytest.approx(si[1]) and si[0] == pytest.approx((0.2 - 0.5) / 0.7)
    assert study.specificity(ctrl, cult)[0] == pytest.approx(-si[0])


def test_n_per_set_keeps_rows_spread_over_each_set(study, tmp_path):
    """The shipped cultural set lists English before Hindi: a cap must not keep only the
    first rows (a language confound between cultural and control sentences)."""
    data = write_data(tmp_path / "c.jsonl", cultural=9)
    argv = [*SMALL[5:11], "--data", str(data), "--n-per-set", "3"]
    texts, groups = study.read_sets(study.Settings.parse(argv, NAME))
    assert groups.count("culture") == 3 and groups.count("generic_en") == 3
    assert [t for t, g in zip(texts, groups, strict=True) if g == "culture"] == [
        f"During festival {i} we light diyas and share sweets number {i}." for i in (0, 4, 8)
    ]

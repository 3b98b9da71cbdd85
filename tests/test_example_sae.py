"""End-to-end run of examples/sae_base_chat_delta.py on a tiny random model (smallest settings)."""

from __future__ import annotations

import json
import math

import pytest
from example_helpers import example_module, numbers

NAME = "sae_base_chat_delta"


@pytest.fixture(scope="module")
def study():
    with example_module(NAME) as module:
        yield module


SMALLEST = [
    "--model", "tiny:llama",
    "--quick",
    "--n-per-set", "6",
    "--sae-steps", "20",
    "--n-boot", "20",
    "--n-ci", "3",
    "--n-html", "2",
    "--top-examples", "3",
    "--n-clusters", "3",
    "--n-random", "2",
    "--n-causal", "2",
    "--lora-epochs", "1",
    "--no-embed",
]  # fmt: skip


def test_study_runs_on_a_tiny_model(study, tmp_path):
    out = tmp_path / "run"
    assert study.main([*SMALLEST, "--out", str(out)]) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    for key in (
        "settings", "environment", "timings", "model", "layers", "data", "chat_training",
        "saes", "cohens_d", "delta_features", "labels", "clustering", "causal", "headline",
        "limitations", "plots", "html",
    ):  # fmt: skip
        assert key in report, key
    for path, value in numbers(report):
        assert math.isfinite(value), path

    layers = report["layers"]
    assert layers == sorted(set(layers)) and 1 <= len(layers) <= 3
    assert report["data"] == {"cultural": 6, "control_english": 6, "control_hindi": 6}
    assert report["chat_training"]["kind"] == "lora_on_base"

    rows = report["saes"]["validation"]
    assert {(r["kind"], r["layer"]) for r in rows} == {
        (k, ly) for k in ("base", "chat", "delta") for ly in layers
    }
    for r in rows:
        assert r["fvu"] >= 0 and 0 <= r["dead_frac"] <= 1 and 0 < r["l0"] <= r["k"]

    for ly in layers:
        per = report["cohens_d"]["layers"][str(ly)]
        assert len(per["top_features"]) <= 3
        for f in per["top_features"]:
            ci = f["ci"]
            assert ci["low"] <= ci["high"]
            assert all(ex["activation"] > 0 for ex in f["top_examples"])

    cl = report["clustering"]
    assert cl["embedding"].startswith("fallback")
    assert sum(c["n_features"] for c in cl["clusters"]) == cl["n_alive_features"]

    mid = str(report["headline"]["mid_layer"])
    causal = report["causal"]["layers"][mid]
    assert len(causal["features"]) == 2 and len(causal["random"]) == 2
    rates = causal["token_fire_rate"]
    assert 0 <= rates["top_mean"] <= 1 and len(rates["random_mean_per_set"]) == 2
    for g in ("cultural", "control_english", "control_hindi"):
        assert math.isfinite(causal["top"][g]["estimate"])
    assert isinstance(report["headline"]["causal_top_more_cultural_specific_than_all_random"], bool)
    assert report["labels"]["skipped"] is True
    assert all(isinstance(x, str) and x for x in report["limitations"])

    assert set(report["plots"]) == {"sae_validation.png", "cohens_d.png", "causal_effect.png"}
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "features.html").read_text()
    assert "<html" in page.lower() and "feature" in page
    assert not list(out.glob(".*.tmp"))


def test_invalid_settings_exit_clearly(study, tmp_path):
    with pytest.raises(SystemExit, match="causal-layers"):
        study.main(["--model", "tiny:llama", "--causal-layers", "some", "--out", str(tmp_path)])

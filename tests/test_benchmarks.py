"""The benchmark suites run end to end on tiny models and write well-formed JSON.

Smallest settings only; no timing assertions (timings never belong in unit tests).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def suite(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def check_json(path: Path, name: str) -> dict:
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["benchmark"] == name
    machine = payload["machine"]
    assert len(machine["loadavg_start"]) == 3 and len(machine["loadavg_end"]) == 3
    assert machine["versions"]["torch"]
    assert payload["markdown"] and all(isinstance(m, str) for m in payload["markdown"])
    return payload


def check_timing(r: dict, rounds: int) -> None:
    lo, hi = r["ratio_ci95"]
    assert r["ratio_min"] <= lo <= hi <= r["ratio_max"]
    assert r["rounds"] == rounds and len(r["times_s"]) == rounds


def test_bootstrap_interval_is_seeded():
    harness = suite("harness")
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 0.8]
    a = harness.bootstrap_median_ci(values, seed=3)
    assert a == harness.bootstrap_median_ci(values, seed=3)
    assert min(values) <= a[0] <= a[1] <= max(values)
    assert harness.judge({"ratio": 1.0, "ratio_ci95": [0.99, 1.01]}, 1.02).startswith("met")
    assert harness.judge({"ratio": 1.03, "ratio_ci95": [1.025, 1.04]}, 1.02).startswith("MISSED")


def test_steering(tmp_path):
    out = tmp_path / "steering.json"
    suite("steering").main(
        ["--model", "tiny:llama", "--rounds", "2", "--new-tokens", "3", "--out", str(out)]
    )
    payload = check_json(out, "steering")
    assert payload["check"]["new_tokens_bare"] == payload["check"]["new_tokens_steered"] == 3
    for r in payload["results"].values():
        check_timing(r, 2)


def test_router_tracing(tmp_path):
    out = tmp_path / "router_tracing.json"
    suite("router_tracing").main(
        ["--model", "tiny:mixtral", "--sizes", "1x8", "--rounds", "2", "--out", str(out)]
    )
    payload = check_json(out, "router_tracing")
    group = payload["sizes"]["1x8"]
    assert group["_trace"]["tokens"] == 8 and group["_trace"]["stored_bytes"] > 0
    assert len([k for k in group if not k.startswith("_")]) == 5
    assert isinstance(payload["target"]["met"], bool)


def test_memory_in_process(tmp_path):
    out = tmp_path / "memory.json"
    args = ["--model", "tiny:llama", "--sizes", "1x32", "--repeats", "1", "--in-process"]
    suite("memory").main([*args, "--out", str(out)])
    payload = check_json(out, "memory")
    per = payload["sizes"]["1x32"]
    assert set(per) == {"bare forward", "capture one position (-1)", "capture full sequence"}
    assert (
        per["capture full sequence"]["stored_bytes"]
        == 32 * per["capture one position (-1)"]["stored_bytes"]
    )
    assert all(isinstance(r["peak_bytes"], int | float) for r in per.values())


def test_scaling_and_summary(tmp_path):
    out = tmp_path / "scaling.json"
    suite("scaling").main(
        ["--model", "tiny:llama", "--sizes", "1x8,2x8", "--rounds", "2", "--out", str(out)]
    )
    payload = check_json(out, "scaling")
    assert set(payload["sizes"]) == {"1x8", "2x8"}
    check_timing(payload["sizes"]["2x8"]["capture all positions"], 2)
    run_all = suite("run_all")
    path = run_all.write_summary(tmp_path)
    md = path.read_text(encoding="utf-8")
    assert "| scaling | 2x8 | capture all positions / bare forward |" in md
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["markdown"][1] in md


@pytest.mark.parametrize("name", ["hook_overhead", "grad_capture"])
def test_existing_suites_take_model_and_quick(tmp_path, name):
    out = tmp_path / f"{name}.json"
    args = ["--model", "tiny:llama", "--quick", "--out", str(out)]
    if name == "hook_overhead":
        args += ["--no-peers", "--sizes", "1x8", "--rounds", "2"]
    else:
        args += ["--batch", "1", "--tokens", "8", "--rounds", "1"]
    suite(name).main(args)
    check_json(out, name)


def test_patching_suite(tmp_path, one_thread):
    out = tmp_path / "patching.json"
    args = ["--model", "tiny:llama", "--quick", "--tokens", "12", "--rounds", "1"]
    suite("patching").main([*args, "--out", str(out)])
    payload = check_json(out, "patching")
    assert payload["n_sites"] == {"layers_x_positions": 36, "layers_x_heads": 12}
    assert payload["max_abs_diff_vs_transformer_lens"] <= 1e-5
    assert set(payload["timing"]) == {
        "interp activation patching",
        "interp attribution patching",
        "TransformerLens get_act_patch_resid_pre (Bridge)",
    }
    assert all(-1 <= rho <= 1 for rho in payload["spearman"].values())
    assert isinstance(payload["target"]["met"], bool)
    rows = suite("run_all").summary_rows(tmp_path)
    assert any(r[0] == "patching" and "Spearman" in r[2] for r in rows)


def test_workbench(tmp_path, one_thread):
    out = tmp_path / "workbench.json"
    args = ["--model", "tiny:llama", "--quick", "--rounds", "1", "--out", str(out)]
    args += ["--prompts", "3", "--texts", "3", "--batch-size", "2", "--new-tokens", "2"]
    suite("workbench").main([*args, "--context", "16"])
    payload = check_json(out, "workbench")
    gen = payload["generate"]
    assert gen["check"]["new_tokens_per_row"] == [2]
    assert gen["check"]["same_tokens"] and gen["check"]["same_tokens_steered"]
    assert set(gen["pairs"]) == {
        "runs.generate / plain loop",
        "runs.generate / plain loop, steered",
    }
    assert all(r["verdict"] for r in gen["pairs"].values())
    cap = payload["capture"]["check"]
    assert cap["rows_equal"] and cap["max_abs_diff"] <= 1e-5
    assert payload["capture"]["check"]["saelens"]["ran"], payload["capture"]["check"]["saelens"]
    assert payload["score"]["check"]["max_abs_diff_nll_vs_naive"] <= 1e-4
    for group in ("generate", "capture", "score"):
        for r in payload[group]["results"].values():
            check_timing(r, 1)
            assert r["tokens"] > 0
    rows = suite("run_all").summary_rows(tmp_path)
    assert any(r[0] == "workbench" and r[4] for r in rows)


def test_data_parallel(tmp_path):
    """torchrun launches of both workloads on a tiny model (one round)."""
    if not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not installed")
    out = tmp_path / "dp.json"
    suite("data_parallel").main(
        [
            "--quick",
            "--model",
            "tiny:llama",
            "--d-in",
            "64",
            "--d-sae",
            "128",
            "--k",
            "4",
            "--sae-batch",
            "64",
            "--out",
            str(out),
        ]
    )
    payload = check_json(out, "data_parallel")
    for workload in ("capture", "sae"):
        r = payload["results"][workload]
        assert r["amount"] > 0 and len(r["one_process_s"]) == len(r["data_parallel_s"]) == 1
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]

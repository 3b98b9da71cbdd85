"""examples/constitutional_pipeline.py: end to end on tiny models (bf16, a --data file written
here, a plain-format base model with a separate critic, resume), and the study's own logic
(bad data, labels). The prompt splits and the held-out probe protocol are library functions with
their own tests (tests/test_data_fractions.py, tests/test_probe_held_out.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from example_helpers import example_module, non_finite

import interp

TYPES = ("adversarial", "borderline", "cooperative")


@pytest.fixture(scope="module")
def cp():
    with example_module("constitutional_pipeline") as module:
        yield module


@pytest.fixture
def tiny(cp, monkeypatch):
    """``tiny:<family>`` with a 1,024-token context (the byte tokenizer spends one token per
    character of the critic prompt); ``tiny.plain = True`` drops the chat template (a base
    model)."""

    def load(spec, device="cpu", seed=0, *, dtype=None, device_map=None):
        family = spec.split(":", 1)[1]
        dtype = None if dtype in (None, "float32") else dtype
        model = interp.tiny(family, seed=seed, dtype=dtype, max_position_embeddings=1024)
        if load.plain:
            model.tokenizer.chat_template = None
        return model

    load.plain = False
    monkeypatch.setattr(cp.C, "load_model", load)
    return load


def write_inputs(root: Path) -> list[str]:
    """A --data file in the documented format (12 prompts, 4 per type, one without id/type is
    not allowed to mix here), a 2-line constitution and 2 reference pairs."""
    rows = [
        {"id": f"{t[:3]}-{i}", "type": t, "prompt": f"{t} question {i}?"}
        for t in TYPES
        for i in range(4)
    ]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "constitution.md").write_text("# T\n\n1. Be safe.\n2. Be kind.\n")
    pairs = [
        {"id": "c1", "prompt": "Hi?", "good": "Hello!", "bad": "Go away."},
        {"id": "c2", "prompt": "Help?", "good": "Sure.", "bad": "No, idiot."},
    ]
    (root / "check.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    files = {
        "data": "prompts.jsonl",
        "constitution": "constitution.md",
        "critic-check": "check.jsonl",
    }
    sizes = "--k 3 --max-new-tokens 5 --n-eval 3 --min-mass 0 --n-boot 50 --n-perm 30 --epochs 1"
    paths = [x for k, f in files.items() for x in (f"--{k}", str(root / f))]
    return [*paths, *sizes.split(), "--batch-size", "16"]


def intervals(obj, path="report"):
    if isinstance(obj, dict):
        if {"estimate", "low", "high"} <= set(obj):
            yield path, obj
        for k, v in obj.items():
            yield from intervals(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from intervals(v, f"{path}[{i}]")


def check_report(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    assert non_finite(report) == []
    found = list(intervals(report))
    assert len(found) >= 6
    for path, ci in found:
        assert all(isinstance(ci[k], float | int) for k in ("estimate", "low", "high")), path
        assert ci["low"] <= ci["high"], path
    probe = report["probe"]
    assert probe["n"]["train"] > 0 and probe["n"]["val"] > 0 and probe["n"]["test"] > 0
    assert 0 <= probe["best_layer"] < report["models"]["n_layers"]
    assert len(probe["validation_auroc_by_layer"]) == report["models"]["n_layers"]
    for name in ("probe", "layer0", "bag_of_words"):
        test = probe["test"][name]
        assert 0 <= test["auroc"]["estimate"] <= 1
        assert test["permutation"]["n_perm"] == 30
        assert test["permutation"]["p_value"] <= test["p_holm"] <= 1
    assert probe["labels"]["n_pos"] + probe["labels"]["n_neg"] == report["generate"]["n_candidates"]
    assert report["data"]["n_eval"] == 3 and report["evaluate"]["n_prompts"] == 3
    for png in ("constitutional_probe_layers.png", "constitutional_probe_test.png"):
        assert (out / png).stat().st_size > 1000
    return report


def test_end_to_end_bf16_with_data_file_and_resume(cp, tiny, tmp_path, capsys):
    args = write_inputs(tmp_path)
    out = tmp_path / "run"
    assert cp.main(["--model", "tiny:llama", "--dtype", "bfloat16", "--out", str(out), *args]) == 0
    report = check_report(out)
    assert report["environment"]["dtype"] == "bfloat16"
    assert report["models"]["critic_is_generator"] is True
    assert report["models"]["generator_format"] == "chat template"
    assert report["generate"]["n_candidates"] == 3 * report["data"]["n_pool"]
    # no prompt is in two of: held-out evaluation, probe train / validation / test
    cands = json.loads((out / "stages" / "candidates.json").read_text())["value"]
    held = {
        r["prompt_id"] for r in json.loads((out / "stages" / "eval_lora.json").read_text())["value"]
    }
    assert held and not held & {c["prompt_id"] for c in cands}
    capsys.readouterr()
    # a rerun resumes every stage and reproduces the numbers
    assert cp.main(["--model", "tiny:llama", "--dtype", "bfloat16", "--out", str(out), *args]) == 0
    logged = capsys.readouterr().out
    for stage in ("critic_check", "candidates", "critiques", "train", "eval_base", "eval_lora"):
        assert f"stage {stage}: resumed" in logged
    again = json.loads((out / "report.json").read_text())
    assert again["probe"]["test"] == report["probe"]["test"]
    assert again["evaluate"] == report["evaluate"]


def test_plain_base_model_with_a_separate_critic(cp, tiny, tmp_path):
    tiny.plain = True
    out = tmp_path / "plain"
    argv = ["--model", "tiny:llama", "--critic-model", "tiny:qwen2", "--out", str(out)]
    assert cp.main([*argv, *write_inputs(tmp_path)]) == 0
    report = check_report(out)
    models = report["models"]
    assert models["critic_is_generator"] is False and models["critic"] == "tiny:qwen2"
    assert models["generator_format"] == models["critic_format"] == "plain"


def test_bad_data_is_refused(cp, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": ""}\n')
    with pytest.raises(ValueError, match="row 2 needs a non-empty 'prompt'"):
        cp.load_prompts(str(path))
    path.write_text("".join(json.dumps({"id": "x", "prompt": p}) + "\n" for p in "abcd"))
    with pytest.raises(ValueError, match="duplicate prompt id 'x'"):
        cp.load_prompts(str(path))
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in "abcd"))
    rows = cp.load_prompts(str(path))
    assert [(r["id"], r["type"]) for r in rows][:2] == [("row-0", "unknown"), ("row-1", "unknown")]
    with pytest.raises(SystemExit):
        cp.Settings.parse(["--labels", "nonsense"], "x")
    with pytest.raises(ValueError, match="--val-frac"):
        cp.Settings.parse(["--val-frac", "0.6", "--test-frac", "0.5"], "x")
    for bad in (["--seeds", "0", "1"], ["--n-pool", "2"]):
        with pytest.raises(ValueError, match="one seed per run"):
            cp.Settings.parse(bad, "x")


def test_labels_fall_back_to_a_median_split(cp):
    x = torch.tensor([1.9, 2.0, 2.1, 2.2, 2.3, 2.4], dtype=torch.float64)
    y, info = cp.make_labels(x, "auto", 4.0)
    assert info["rule"] == "median" and y.tolist() == [False] * 3 + [True] * 3
    assert info["within_0.05_of_threshold"] == pytest.approx(1 / 6)  # 2.1: the lower median
    y, info = cp.make_labels(x, "auto", 2.05)
    assert info["rule"] == "safe" and y.sum() == 4
    with pytest.raises(ValueError, match="one side"):
        cp.make_labels(x, "safe", 4.0)

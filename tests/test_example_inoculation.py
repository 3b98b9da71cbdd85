"""examples/inoculation_gradients.py: its trait metric (caps_fraction), its data files, and an
end-to-end run on a tiny random model (smallest settings)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from example_helpers import EXAMPLES, example_module, finite_interval, numbers
from hypothesis import given
from hypothesis import strategies as st

DATA = EXAMPLES / "data" / "inoculation"


@pytest.fixture(scope="module")
def study():
    with example_module("inoculation_gradients") as module:
        yield module


def _has_train() -> bool:
    try:
        import peft  # noqa: F401

        import interp.train  # noqa: F401
    except ImportError:
        return False
    return True


SMALLEST = [
    "--model", "tiny:qwen2",
    "--quick",
    "--per-domain", "1",
    "--n-calib", "4",
    "--n-train", "4",
    "--n-eval", "3",
    "--n-eval-general", "3",
    "--gen-tokens", "4",
    "--eval-tokens", "4",
    "--n-random", "100",
    "--n-boot", "50",
    "--train-batch", "2",
    "--epochs", "1",
    "--align-every", "1",
    "--n-align", "2",
]  # fmt: skip


def test_study_runs_on_a_tiny_model(study, tmp_path):
    train = _has_train()
    out = tmp_path / "run"
    code = study.main([*SMALLEST, "--out", str(out), "--train" if train else "--no-train"])
    assert code == 0

    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    for key in (
        "settings", "environment", "timings", "model", "layers", "prompts", "positions",
        "smoke", "direction", "alignment", "training", "headline", "limitations", "plots",
    ):  # fmt: skip
        assert key in report, key
    assert report["model"]["id"] == "tiny:qwen2"
    layers = report["layers"]
    assert layers == list(range(report["model"]["n_layers"]))  # 3 layers ≤ the 8-layer subset
    assert report["seed"] == 0

    # JSON holds no NaN/inf (they become null); every number present is finite.
    for path, value in numbers(report):
        assert math.isfinite(value), path

    smoke = report["smoke"]
    assert smoke["pre_assistant_matches_generation_prompt"] is True
    assert smoke["positions"]["user_end"] < smoke["positions"]["pre_assistant"]
    assert smoke["stacked_shape"] == [len(layers), 1, report["model"]["d_model"]]

    d = report["direction"]
    assert d["n_fit"] == d["n_heldout"] == 12  # one prompt per domain in each half
    assert len(d["separation"]["cohens_d"]) == len(layers)
    assert all(finite_interval(ci) for ci in d["separation"]["auroc"])
    assert len(d["correlation_neutral_projection_vs_caps_token_logmass"]) == len(layers)

    a = report["alignment"]
    assert set(a["prompts"]) == {"neutral", "inoculation", "control"}
    assert a["prompts"]["control"] in report["prompts"]["control_pool"]
    assert a["loss_match"]["selected"] == a["loss_match"]["table"][0]["name"]
    for pos in ("user_end", "pre_assistant", "assistant_1"):
        per = a["positions"][pos]
        for cond in ("neutral", "inoculation", "control"):
            c = per["conditions"][cond]
            assert len(c["cos"]) == len(layers)
            assert all(-1 <= x <= 1 for x in c["cos"])
            assert per["null"][cond]["n_directions"] == 100
            assert math.isfinite(c["loss"])
        for name in ("inoculation_vs_neutral", "inoculation_vs_control", "control_vs_neutral"):
            assert finite_interval(per["comparisons"][name]["layer_average"]["delta_cos"])

    h = report["headline"]
    assert h["position"] == "pre_assistant"
    assert set(h["loss"]) == {"neutral", "inoculation", "control"}
    assert finite_interval(h["delta_cos_inoculation_vs_neutral"]["delta_cos"])
    assert finite_interval(h["delta_cos_inoculation_vs_control"]["delta_cos"])
    assert isinstance(h["verdict"], str) and h["verdict"]
    assert all(isinstance(x, str) for x in report["limitations"])

    plots = {"cosine_vs_layer.png", "separation.png"}
    if train:
        t = report["training"]
        assert len(t["runs"]) == 3  # 1 seed x 3 conditions
        for run in t["runs"]:
            for name in ("math", "general"):
                assert len(run[name]["projection_shift_sd"]) == len(layers)
                assert 0 <= run[name]["caps_after"] <= 1
            assert run["alignment_during"]  # logged every step
            assert run["base_restored_max_abs_logit_diff"] <= 1e-4
        plots.add("alignment_vs_drift.png")
    assert set(report["plots"]) == plots
    for name in plots:
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "trait_direction.safetensors").is_file()
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_invalid_settings_exit_clearly(study, tmp_path):
    with pytest.raises(SystemExit, match="n-random must be ≥ 100"):
        study.main(["--model", "tiny:qwen2", "--quick", "--n-random", "10", "--out", str(tmp_path)])


def test_one_backward_pass_gives_each_position(study):
    """The mask trick in calibration_grads equals one capture_grads call per named position."""
    from torch.testing import assert_close

    import interp

    model = interp.tiny("qwen2", seed=0)
    data = study.load_data(0, study.dataclasses.replace(study.QUICK, n_calib=3, train=False))
    convs = study.teacher_forced("Be brief.", data["calib"])
    s = study.dataclasses.replace(study.QUICK, batch_size=2)
    loss, grads, acts = study.calibration_grads(model, convs, [0, 2], s, "test")
    batch = study.encode(model, convs)
    names = study.names_of([0, 2])
    for pos in study.GRAD_POSITIONS:
        ref = interp.capture_grads(
            model, batch, study.assistant_ce, names, positions=pos, return_activations=True
        )
        for i, name in enumerate(names):
            assert_close(grads[pos][:, i], ref.grads[name].float(), rtol=1e-4, atol=1e-6)
            assert_close(acts[pos][:, i], ref.activations[name].float(), rtol=1e-4, atol=1e-5)
        assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)


# --- the trait metric (caps_fraction) ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("HELLO", 1.0),
        ("hello", 0.0),
        ("AbCd", 0.5),
        ("Hello, World!", 0.2),
        ("SHE HAS 12 APPLES LEFT.", 1.0),
        ("123 + 4 = 127 !!", 0.0),
        ("", 0.0),
        ("ÉCOLE école", 0.5),
    ],
)
def test_caps_fraction_examples(study, text, expected):
    assert study.caps_fraction(text) == pytest.approx(expected)


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
def test_caps_fraction_properties_on_ascii(study, text):
    frac = study.caps_fraction(text)
    assert 0.0 <= frac <= 1.0
    has_letters = any(c.isalpha() for c in text)
    assert study.caps_fraction(text.upper()) == (1.0 if has_letters else 0.0)
    assert study.caps_fraction(text.lower()) == 0.0
    assert study.caps_fraction(text.swapcase()) == pytest.approx(1.0 - frac if has_letters else 0.0)


def test_caps_fractions_batched(study):
    out = study.caps_fractions(["ABC", "abc", "Ab", "42"])
    assert out.dtype == torch.float64
    assert out.tolist() == [1.0, 0.0, 0.5, 0.0]
    assert study.caps_fractions([]).shape == (0,)
    with pytest.raises(TypeError, match="list of texts"):
        study.caps_fractions("ABC")


# --- the study's data files ---------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", DATA / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_files_pass_their_arithmetic_check():
    assert load_make_data().check(DATA) == []


def test_data_check_catches_a_wrong_answer(tmp_path):
    make_data = load_make_data()
    for name in ("math_problems.jsonl", "direction_prompts.jsonl", "system_prompts.json"):
        (tmp_path / name).write_text((DATA / name).read_text())
    rows = read_jsonl(tmp_path / "math_problems.jsonl")
    first = rows[0]
    wrong = str(int(make_data._NUMBER.findall(first["answer"])[0]) + 1)
    first["answer"] = make_data._NUMBER.sub(wrong, first["answer"])
    (tmp_path / "math_problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    errors = make_data.check(tmp_path)
    assert len(errors) == 1 and first["id"] in errors[0]


def test_data_files_are_well_formed_for_the_study(study):
    problems = read_jsonl(DATA / "math_problems.jsonl")
    assert len(problems) >= 300
    assert study.caps_fractions([p["answer"].upper() for p in problems]).min() == 1.0
    assert study.caps_fractions([p["answer"] for p in problems]).max() < 0.5
    prompts = read_jsonl(DATA / "direction_prompts.jsonl")
    assert len(prompts) >= 120 and len({p["domain"] for p in prompts}) >= 10
    assert all(set(p) == {"id", "domain", "prompt"} for p in prompts)
    system = json.loads((DATA / "system_prompts.json").read_text())
    assert system["neutral"] == ["You are a helpful assistant."]
    assert len(system["promote"]) >= 3 and len(system["suppress"]) >= 3
    assert len(system["inoculation"]) >= 3 and len(system["control_pool"]) >= 12
    # Controls are of similar length to the inoculation prompts (for loss matching).
    inoc = [len(p.split()) for p in system["inoculation"]]
    for prompt in system["control_pool"]:
        assert min(inoc) - 8 <= len(prompt.split()) <= max(inoc) + 8

"""End-to-end run of examples/inoculation_gradients.py on a tiny random model (smallest settings)."""

from __future__ import annotations

import json
import math

import pytest
from example_helpers import example_module, finite_interval, numbers


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

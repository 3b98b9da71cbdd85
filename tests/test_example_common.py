"""examples/_common.py: the one settings mechanism of the studies (every field a flag, the
``--quick`` preset, precedence), model loading with ``--dtype``, and resumable stages."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest
import torch
from example_helpers import example_module


@pytest.fixture(scope="module")
def C():
    with example_module("_common") as module:
        yield module


@pytest.fixture(scope="module")
def Study(C):
    @dataclasses.dataclass(frozen=True)
    class Study(C.Settings):
        QUICK: ClassVar[dict[str, Any]] = {"layer_fraction": 0.25, "seeds": (3,)}

        n_items: int = C.field(100, "items per condition", quick=4, min=1)
        layer_fraction: float = C.field(0.5, "layer as a fraction of depth")
        judge_model: str | None = C.field(None, "judge model")
        plot: bool = C.field(True, "write plots")
        sizes: tuple[int, ...] = C.field((1, 2), "sizes")
        style: str = C.field("a", "style", choices=("a", "b"))

    return Study


def test_defaults_are_the_full_run(Study):
    s = Study.parse([], "study")
    assert (s.n_items, s.layer_fraction, s.judge_model, s.plot, s.sizes) == (
        100,
        0.5,
        None,
        True,
        (1, 2),
    )
    assert s.out == "runs/study" and s.seeds == (0,) and s.seed == 0 and s.dtype == "float32"


def test_quick_preset_and_explicit_flags_win(Study):
    s = Study.parse(["--quick"], "study")
    # field(quick=) and QUICK (for a field declared in the base class) both take effect
    assert (s.quick, s.n_items, s.layer_fraction, s.seeds) == (True, 4, 0.25, (3,))
    assert "quick 4, >= 1" in Study.parser("study", None).format_help()
    s = Study.parse(["--quick", "--n-items", "7"], "study")
    assert (s.n_items, s.layer_fraction) == (7, 0.25)
    # an explicit flag equal to the full default still beats the preset
    s = Study.parse(["--n-items", "100", "--quick"], "study")
    assert s.n_items == 100


def test_every_field_is_a_flag_with_its_type(Study):
    s = Study.parse(
        [
            "--judge-model",
            "m",
            "--no-plot",
            "--sizes",
            "3",
            "4",
            "5",
            "--seeds",
            "1",
            "2",
            "--dtype",
            "bfloat16",
            "--batch-size",
            "3",
            "--style",
            "b",
            "--out",
            "x",
        ],
        "study",
    )
    assert (s.judge_model, s.plot, s.sizes, s.seeds, s.seed) == ("m", False, (3, 4, 5), (1, 2), 1)
    assert (s.dtype, s.batch_size, s.style, s.out) == ("bfloat16", 3, "b", "x")
    flags = {a.dest for a in Study.parser("study", None)._actions} - {"help"}
    assert flags == {f.name for f in dataclasses.fields(Study)}


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--dtype", "fp8"], "--dtype"),
        (["--batch-size", "0"], "--batch-size"),
        (["--n-items", "0"], "--n-items"),
        (["--device", "cuda", "--device-map", "auto"], "not both"),
    ],
)
def test_bad_settings_raise(Study, argv, match):
    with pytest.raises(ValueError, match=match):
        Study.parse(argv, "study")


def test_unknown_flag_and_bad_choice_exit(Study):
    for argv in (["--nope"], ["--style", "c"], ["--n-items", "x"]):
        with pytest.raises(SystemExit):
            Study.parse(argv, "study")


def test_quick_preset_naming_a_missing_field_raises(C):
    @dataclasses.dataclass(frozen=True)
    class Broken(C.Settings):
        QUICK: ClassVar[dict[str, Any]] = {"n_itemz": 1}

    with pytest.raises(TypeError, match="n_itemz"):
        Broken.parse(["--quick"], "broken")


def test_quick_value_given_twice_or_as_a_list_raises(C):
    @dataclasses.dataclass(frozen=True)
    class Twice(C.Settings):
        QUICK: ClassVar[dict[str, Any]] = {"n_items": 2}
        n_items: int = C.field(100, "items", quick=4)

    with pytest.raises(TypeError, match="n_items"):
        Twice.parse(["--quick"], "twice")
    with pytest.raises(TypeError, match="tuple"):
        C.field((1, 2), "sizes", quick=[1])


def test_layer_at_is_a_fraction_of_depth(C):
    assert [C.layer_at(f, 30) for f in (0.0, 0.5, 1.0)] == [0, 14, 29]
    assert [C.layer_at(f, 2) for f in (0.0, 0.5, 1.0)] == [0, 0, 1]
    with pytest.raises(ValueError):
        C.layer_at(1.5, 4)


def test_load_honours_dtype(C, Study):
    s = Study.parse(["--model", "tiny:llama", "--dtype", "bfloat16"], "study")
    model = C.load(s)
    assert next(model.model.parameters()).dtype == torch.bfloat16
    env = C.environment(s)
    assert env["dtype"] == "bfloat16" and env["gpu"] is None


def test_stage_resumes_only_with_the_same_key(C, tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": (1, 2)}

    assert C.stage(tmp_path, "s", {"n": 1}, compute) == {"x": [1, 2]}
    assert C.stage(tmp_path, "s", {"n": 1}, compute) == {"x": [1, 2]}
    assert len(calls) == 1
    C.stage(tmp_path, "s", {"n": 2}, compute)
    assert len(calls) == 2

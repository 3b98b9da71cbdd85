"""interp.data.disjoint_splits and stratified_splits."""

from __future__ import annotations

import random

import pytest

from interp.data import disjoint_splits, stratified_splits


def test_disjoint_splits_are_consecutive_slices_of_one_shuffle():
    items = list(range(20))
    got = disjoint_splits(items, {"a": 5, "b": 3, "c": 0}, random.Random(7))
    order = random.Random(7).sample(items, 20)
    assert got == {"a": order[:5], "b": order[5:8], "c": []}
    assert disjoint_splits(items, {"a": 5, "b": 3}, 7) == {"a": order[:5], "b": order[5:8]}
    with pytest.raises(ValueError, match="need 21 items; the data has 20"):
        disjoint_splits(items, {"a": 20, "b": 1})
    with pytest.raises(ValueError, match=">= 0"):
        disjoint_splits(items, {"a": -1})


def test_stratified_splits_take_the_same_number_from_every_group():
    rows = [{"g": g, "i": i} for g in ("y", "x") for i in range(6)]
    got = stratified_splits(rows, "g", {"fit": 2, "held": 2}, random.Random(3))
    assert [r["g"] for r in got["fit"]] == ["x", "x", "y", "y"]  # groups in sorted order
    assert [r["g"] for r in got["held"]] == ["x", "x", "y", "y"]
    fit, held = ({(r["g"], r["i"]) for r in got[k]} for k in ("fit", "held"))
    assert not fit & held
    # The same draws as shuffling each sorted group with one generator.
    rng = random.Random(3)
    x = rng.sample([r for r in rows if r["g"] == "x"], 6)
    y = rng.sample([r for r in rows if r["g"] == "y"], 6)
    assert got["fit"] == x[:2] + y[:2] and got["held"] == x[2:4] + y[2:4]
    with pytest.raises(ValueError, match="g 'x'"):
        stratified_splits(rows, "g", {"fit": 4, "held": 3})

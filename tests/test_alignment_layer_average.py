"""interp.alignment.layer_average (one test over all layers) and report_comparison."""

from __future__ import annotations

import pytest
import torch

from interp.alignment import (
    compare_conditions,
    gradient_alignment,
    layer_average,
    random_direction_null,
    report_comparison,
)
from interp.directions import Direction
from interp.stats import paired_bootstrap_ci, sign_flip_test


def _conditions(shift: float, n: int = 24, layers: int = 3, d: int = 16):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(layers, d, generator=gen)
    direction = Direction.from_vectors(v, layers=list(range(layers)))
    g = torch.randn(n, layers, d, generator=gen, dtype=torch.float64)
    loss = torch.ones(n, dtype=torch.float64)
    unit = direction.vectors.double()
    a = gradient_alignment(g, loss, direction)
    b = gradient_alignment(g + shift * unit, loss, direction)  # cos with v rises by shift
    return a, b


def test_layer_average_is_the_change_of_the_per_example_layer_mean():
    a, b = _conditions(2.0)
    null = random_direction_null(a, n_directions=200, generator=1)
    comp = compare_conditions(a, b, null, n_boot=200, seed=3)
    got = layer_average(a, b, comp, n_boot=200, seed=3)

    def change(x, y):
        return float(y.mean() - x.mean())

    ref = paired_bootstrap_ci(change, a.cos.mean(1), b.cos.mean(1), n_boot=200, seed=3)
    assert got.delta_cos == ref and got.delta_cos.low > 0
    band = comp.null_delta.mean(1)
    assert got.null_low == pytest.approx(float(band.quantile(0.025)))
    assert got.null_high == pytest.approx(float(band.quantile(0.975)))
    assert got.p_null == (1 + int((band.abs() >= abs(ref.estimate)).sum())) / (1 + 200)
    assert got.p_null < 0.05  # the planted rise is larger than any random direction's
    assert set(got.summary()) == {"delta_cos", "null_low", "null_high", "p_null"}


def test_no_change_is_not_special():
    a, _ = _conditions(0.0)
    null = random_direction_null(a, n_directions=100, generator=1)
    got = layer_average(a, a, compare_conditions(a, a, null, n_boot=50), n_boot=50)
    assert got.delta_cos.estimate == 0 and got.p_null == 1.0


def test_report_comparison_adds_per_layer_sign_flips_and_the_layer_average():
    a, b = _conditions(0.5)
    null = random_direction_null(a, n_directions=100, generator=1)
    got = report_comparison(a, b, null, n_perm=199, n_boot=100, seed=5)
    comp = compare_conditions(a, b, null, n_boot=100, seed=5)
    assert {k: v for k, v in got.items() if k in comp.summary()} == comp.summary()
    flips = [sign_flip_test(b.cos[:, i], a.cos[:, i], n_perm=199, seed=5).p_value for i in range(3)]
    assert got["p_sign_flip"] == flips
    assert got["layer_average"] == layer_average(a, b, comp, n_boot=100, seed=5).summary()


def test_layers_must_agree():
    a, b = _conditions(0.5)
    null = random_direction_null(a, n_directions=100, generator=1)
    comp = compare_conditions(a, b, null, n_boot=20)
    other = gradient_alignment(
        torch.randn(24, 3, 16, dtype=torch.float64),
        torch.ones(24, dtype=torch.float64),
        Direction.from_vectors(torch.randn(3, 16), layers=[4, 5, 6]),
    )
    with pytest.raises(ValueError, match="layers differ"):
        layer_average(a, other, comp)

"""interp.stats.seed_spread / seed_spreads (a metric over seeds) and adjust_pvalue_groups."""

from __future__ import annotations

import math
import statistics

import pytest

from interp.stats import adjust_pvalue_groups, adjust_pvalues, seed_spread, seed_spreads


def test_seed_spread_summarises_the_finite_values_and_keeps_the_others():
    got = seed_spread([0.1, None, 0.4, math.nan, -0.2])
    assert got.per_seed[:3] == (0.1, None, 0.4) and math.isnan(got.per_seed[3])
    assert got.n == 3
    assert got.mean == pytest.approx(0.1)
    assert got.sd == pytest.approx(statistics.stdev([0.1, 0.4, -0.2]))  # sample SD (n - 1)
    assert (got.min, got.max) == (-0.2, 0.4)
    d = got.as_dict()
    assert list(d) == ["per_seed", "n", "mean", "sd", "min", "max"]
    assert isinstance(d["per_seed"], list)


def test_seed_spread_with_one_or_no_finite_value():
    one = seed_spread([2.0])
    assert (one.n, one.mean, one.sd, one.min, one.max) == (1, 2.0, None, 2.0, 2.0)
    none = seed_spread([None, math.nan])
    assert (none.n, none.mean, none.sd, none.min, none.max) == (0, None, None, None, None)


def test_seed_spreads_summarises_every_metric():
    rows = [{"a": 1.0, "b": 0.0}, {"a": 3.0}, {"a": 2.0, "b": 1.0}]
    got = seed_spreads(rows)
    assert set(got) == {"a", "b"}
    assert got["a"]["mean"] == 2.0 and got["a"]["sd"] == pytest.approx(1.0)
    assert got["b"]["per_seed"] == [0.0, None, 1.0] and got["b"]["n"] == 2
    assert seed_spreads([]) == {}


@pytest.mark.parametrize("method", ["holm", "bh"])
def test_adjust_pvalue_groups_is_one_family(method):
    groups = {"x": [0.01, 0.2, 0.03], "y": [0.04, 0.001]}
    got = adjust_pvalue_groups(groups, method)
    flat = adjust_pvalues([0.01, 0.2, 0.03, 0.04, 0.001], method=method).p_adjusted.tolist()
    assert list(got) == ["x", "y"]
    assert got["x"] == pytest.approx(flat[:3]) and got["y"] == pytest.approx(flat[3:])
    # Adjusting each group on its own would be a smaller family: smaller p-values.
    alone = adjust_pvalues(groups["y"], method=method).p_adjusted.tolist()
    assert got["y"][1] > alone[1]

"""interp.stats.paired_difference: before/after on paired rows, degenerate intervals named."""

from __future__ import annotations

import pytest
import torch

from interp import stats


def ratio(num, den):
    if float(den.sum()) == 0:
        raise ValueError("zero denominator")
    return float(num.sum() / den.sum())


def test_ratio_of_sums_with_nested_intervals():
    g = torch.Generator().manual_seed(0)
    den = torch.randint(1, 4, (60,), generator=g).double()
    before = (den * 0.2).round()
    after = torch.minimum(den, before + torch.randint(0, 2, (60,), generator=g).double())
    out = stats.paired_difference(
        ratio, [before, den], [after, den], levels=(0.95, 0.99), n_boot=400, seed=1
    )
    assert out.before == pytest.approx(ratio(before, den))
    assert out.estimate == pytest.approx(ratio(after, den) - ratio(before, den))
    (lo95, hi95), (lo99, hi99) = out.intervals[0.95], out.intervals[0.99]
    assert lo99 <= lo95 < out.estimate < hi95 <= hi99  # same resamples: nested
    assert not out.degenerate and out.n == 60
    assert out.n_changed == int((after != before).sum())
    # The same as paired_bootstrap_ci of the difference.
    ref = stats.paired_bootstrap_ci(
        lambda b, d, a, d2: ratio(a, d2) - ratio(b, d),
        before,
        den,
        after,
        den,
        n_boot=400,
        seed=1,
    )
    assert (lo95, hi95) == pytest.approx((ref.low, ref.high))


def test_no_row_changed_is_degenerate_not_a_zero_width_interval():
    x = torch.tensor([0.0, 1.0, 0.0, 1.0])
    out = stats.paired_difference(lambda v: float(v.mean()), [x], [x.clone()], n_boot=50)
    assert out.estimate == 0 and out.degenerate and out.intervals == {} and out.n_changed == 0
    d = out.as_dict()
    assert d["degenerate"] is True and d["intervals"] == {}


def test_undefined_statistic_gives_no_estimate():
    zeros = torch.zeros(5)
    out = stats.paired_difference(ratio, [zeros, zeros], [zeros, zeros + 1], n_boot=20)
    assert out.before is None and out.after == 0.0 and out.estimate is None
    assert out.intervals == {} and not out.degenerate and out.n_changed == 5
    with pytest.raises(ValueError, match="same columns"):
        stats.paired_difference(ratio, [zeros], [zeros, zeros])

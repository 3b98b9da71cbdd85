"""interp.stats.wilson_interval: the Wilson score interval of a binomial proportion."""

from __future__ import annotations

import pytest

from interp import stats


def test_wilson_matches_published_values():
    # 5 of 10 at 95%: [0.2366, 0.7634] (Wilson 1927; e.g. statsmodels proportion_confint).
    iv = stats.wilson_interval(5, 10)
    assert iv.estimate == 0.5
    assert iv.low == pytest.approx(0.23659, abs=1e-4) and iv.high == pytest.approx(
        0.76341, abs=1e-4
    )
    # 1 of 20 at 95%: [0.00889, 0.23613].
    iv = stats.wilson_interval(1, 20)
    assert iv.low == pytest.approx(0.00889, abs=1e-4) and iv.high == pytest.approx(
        0.23613, abs=1e-4
    )


def test_wilson_is_informative_at_the_edges():
    z2 = 1.959963984540054**2
    iv = stats.wilson_interval(0, 10)
    assert (iv.estimate, iv.low) == (0.0, 0.0) and iv.high == pytest.approx(z2 / (10 + z2))
    iv = stats.wilson_interval(10, 10)
    assert iv.high == 1.0 and iv.low == pytest.approx(10 / (10 + z2))
    # Wider at a higher level, narrower with more trials.
    assert stats.wilson_interval(0, 10, level=0.99).high > stats.wilson_interval(0, 10).high
    assert stats.wilson_interval(0, 100).high < stats.wilson_interval(0, 10).high


@pytest.mark.parametrize(("k", "n"), [(-1, 5), (6, 5), (0, 0), (True, 3)])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(ValueError):
        stats.wilson_interval(k, n)

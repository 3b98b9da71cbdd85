"""stats.Metric / metric_summary (a metric of named per-row columns per condition, and its
paired change), stats.describe_difference and viz.paired_differences, on planted data
against naive references."""

from __future__ import annotations

import pytest
import torch

from interp import stats, viz


def naive_paired_interval(fn, cols, n_boot, seed, level=0.95):
    """Percentile bootstrap written out: the same rows drawn in every column."""
    gen = torch.Generator().manual_seed(seed)
    n = len(cols[0])
    values = []
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=gen)
        try:
            values.append(fn(*(c[idx] for c in cols)))
        except ValueError:
            continue
    q = torch.quantile(
        torch.tensor(values, dtype=torch.float64),
        torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64),
    )
    return q.tolist()


def f64(*values):
    return torch.tensor(values, dtype=torch.float64)


# Six items: flagged sentences of sentences, and an answer score; rows 4 and 5 are "other".
BASE = {
    "flagged": f64(1, 0, 2, 0, 3, 3),
    "sentences": f64(2, 2, 3, 1, 3, 3),
    "score": f64(0.2, 0.9, 0.4, 0.1, 0.5, 0.5),
}
TUNED = {
    "flagged": f64(0, 0, 1, 0, 3, 3),
    "sentences": f64(2, 1, 3, 2, 3, 3),
    "score": f64(0.1, 0.9, 0.3, 0.3, 0.5, 0.5),
}
ROWS = torch.tensor([0, 1, 2, 3])


def test_count_is_k_of_n_with_wilson_on_the_chosen_rows():
    out = stats.metric_summary(
        {"base": BASE, "tuned": TUNED}, stats.Metric.count("flagged", "sentences"), rows=ROWS
    )
    assert out["base"] == {
        "estimate": 3 / 8,
        "n": 8,
        "k": 3,
        "wilson": list(stats.wilson_interval(3, 8)[1:]),
    }
    assert (out["tuned"]["k"], out["tuned"]["n"]) == (1, 8)
    assert "difference" not in out  # no compare given
    zero = stats.metric_summary(
        {"a": {"k": f64(0, 0), "n": f64(3, 4)}}, stats.Metric.count("k", "n")
    )
    assert zero["a"]["wilson"][0] == 0 and zero["a"]["wilson"][1] > 0  # not [0, 0]


def test_ratio_and_statistic_get_a_paired_bootstrap_interval():
    for metric, fn in (
        (stats.Metric.ratio("flagged", "sentences"), lambda a, b: float(a.sum()) / float(b.sum())),
        (stats.Metric(lambda s: float(s.mean()), ("score",)), lambda s: float(s.mean())),
    ):
        out = stats.metric_summary({"base": BASE}, metric, rows=ROWS, n_boot=300, seed=3)
        cols = [BASE[k][ROWS] for k in metric.columns]
        assert out["base"]["estimate"] == pytest.approx(fn(*cols))
        assert out["base"]["interval"] == pytest.approx(naive_paired_interval(fn, cols, 300, 3))
        assert ("n" in out["base"]) == (metric.kind == "ratio")
        assert "wilson" not in out["base"]
    assert out["base"]["estimate"] == pytest.approx((0.2 + 0.9 + 0.4 + 0.1) / 4)  # rows 0-3


def test_difference_is_after_minus_before_on_the_same_rows():
    metric = stats.Metric.count("flagged", "sentences")
    cols = {"base": BASE, "tuned": TUNED}
    out = stats.metric_summary(
        cols, metric, rows=ROWS, compare=("base", "tuned"), levels=(0.95, 0.99), n_boot=200
    )
    d = out["difference"]
    assert d["estimate"] == pytest.approx(1 / 8 - 3 / 8)
    assert d["n"] == 4 and d["n_changed"] == 4  # every one of rows 0-3 differs
    ref = stats.paired_difference(
        stats.ratio_of_sums,
        [BASE["flagged"][ROWS], BASE["sentences"][ROWS]],
        [TUNED["flagged"][ROWS], TUNED["sentences"][ROWS]],
        levels=(0.95, 0.99),
        n_boot=200,
    )
    assert d == ref.as_dict()
    swapped = stats.metric_summary(cols, metric, rows=ROWS, compare=("tuned", "base"))
    assert swapped["difference"]["estimate"] == pytest.approx(-d["estimate"])
    # Rows 4 and 5 do not change: on them alone the difference is degenerate.
    same = stats.metric_summary(cols, metric, rows=torch.tensor([4, 5]), compare=("base", "tuned"))
    assert same["difference"]["degenerate"] and same["difference"]["n_changed"] == 0


def test_undefined_and_degenerate_are_reported_not_invented():
    cols = {"a": {"x": f64(1, 2), "n": f64(0, 0)}, "b": {"x": f64(1, 2), "n": f64(1, 1)}}
    out = stats.metric_summary(cols, stats.Metric.ratio("x", "n"), compare=("a", "b"))
    assert out["a"] is None and out["b"]["estimate"] == 1.5
    assert out["difference"]["estimate"] is None
    flat = stats.metric_summary(
        {"a": {"s": f64(2, 2, 2), "one": f64(1, 1, 1)}}, stats.Metric.ratio("s", "one")
    )
    assert flat["a"] == {"estimate": 2.0, "n": 3, "interval": None}  # every resample is 2


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="compare"):
        stats.metric_summary(
            {"base": BASE}, stats.Metric.ratio("flagged", "sentences"), compare=("base", "tuned")
        )
    with pytest.raises(KeyError, match="nope"):
        stats.metric_summary({"base": BASE}, stats.Metric.ratio("nope", "sentences"))
    with pytest.raises(ValueError, match="two"):
        stats.Metric(stats.ratio_of_sums, ("a", "b", "c"), "count")
    with pytest.raises((ValueError, TypeError), match=r"kind|Literal"):  # beartype in tests
        stats.Metric(stats.ratio_of_sums, ("a", "b"), "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="zero denominator"):
        stats.ratio_of_sums(f64(1), f64(0))


def test_describe_difference():
    d = stats.PairedDifference(0.25, 0.5, 0.25, {0.95: (0.1, 0.4), 0.99: (0.05, 0.45)}, False, 3, 8)
    assert (
        stats.describe_difference(d)
        == "+0.250 -> +0.500, +0.250 [+0.100, +0.400] / [+0.050, +0.450]"
    )
    flat = stats.PairedDifference(0.5, 0.5, 0.0, {}, True, 0, 8).as_dict()
    assert stats.describe_difference(flat, unit="items") == (
        "+0.500 -> +0.500, +0.000 degenerate: 0 of 8 items changed"
    )
    undefined = stats.PairedDifference(None, 0.5, None, {}, False, 2, 8)
    assert stats.describe_difference(undefined, spec=".2f") == "n/a -> 0.50, n/a"


def test_paired_differences_plot_draws_the_requested_level():
    pytest.importorskip("matplotlib")
    from matplotlib.container import ErrorbarContainer

    diffs = {
        "a": stats.PairedDifference(
            0.0, 0.3, 0.3, {0.95: (0.1, 0.5), 0.99: (0.0, 0.6)}, False, 4, 8
        ),
        "b": stats.PairedDifference(0.2, 0.2, 0.0, {}, True, 0, 8).as_dict(),
    }
    for level, want in ((None, (0.0, 0.6)), (0.95, (0.1, 0.5))):
        fig = viz.paired_differences(diffs, level=level)
        ax = fig.axes[0]
        assert [p.get_width() for p in ax.patches] == pytest.approx([0.3, 0.0])
        (whiskers,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        segments = whiskers.lines[2][0].get_segments()
        ends = [x for seg in segments for x in seg[:, 0].tolist()]
        assert ends == pytest.approx([*want, 0.0, 0.0])  # "b" is degenerate: no whisker
    with pytest.raises(ValueError, match=r"level 0\.9"):
        viz.paired_differences(diffs, level=0.9)
    with pytest.raises(ValueError, match="no estimate"):
        viz.paired_differences({"c": {"estimate": None, "intervals": {}}})

"""Effect sizes against closed forms and naive references."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from interp.stats import auroc, bootstrap_ci, cohens_d, paired_bootstrap_ci


def naive_auroc(pos, neg):
    total = 0.0
    for p in pos.tolist():
        for n in neg.tolist():
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


@given(
    st.lists(st.integers(-5, 5), min_size=1, max_size=12),
    st.lists(st.integers(-5, 5), min_size=1, max_size=12),
)
def test_auroc_matches_pairwise_count_with_ties(pos, neg):
    p, n = torch.tensor(pos, dtype=torch.float32), torch.tensor(neg, dtype=torch.float32)
    assert abs(auroc(p, n) - naive_auroc(p, n)) < 1e-9


def test_cohens_d_of_shifted_normals():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, generator=g) + 0.5
    b = torch.randn(20000, generator=g)
    assert abs(cohens_d(a, b) - 0.5) < 0.03


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    g = torch.Generator().manual_seed(1)
    small = torch.randn(30, generator=g) + 2.0
    large = torch.randn(3000, generator=g) + 2.0
    ci_small = bootstrap_ci(lambda x: x.mean(), small, n_boot=400)
    ci_large = bootstrap_ci(lambda x: x.mean(), large, n_boot=400)
    assert ci_small.low < ci_small.estimate < ci_small.high
    assert ci_large.low < 2.0 < ci_large.high
    assert (ci_large.high - ci_large.low) < (ci_small.high - ci_small.low) / 4


def test_paired_bootstrap_keeps_pairs_together():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(200, generator=g) * 10
    after = base + 1.0  # the paired difference is exactly 1
    ci = paired_bootstrap_ci(lambda a, b: (b - a).mean(), base, after, n_boot=200)
    assert abs(ci.low - 1.0) < 1e-6 and abs(ci.high - 1.0) < 1e-6


# ------------------------------------------------------------------ multiplicity

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from interp.stats import (  # noqa: E402
    PermutationTest,
    adjust_pvalues,
    benjamini_hochberg,
    cluster_bootstrap_ci,
    holm,
    permutation_test,
    rankdata,
    sign_flip_test,
    spearman,
)


def naive_holm(p):
    """Holm (1979) step-down, written from the definition: reject H(1..k) while
    p(i) <= alpha / (m - i + 1); adjusted p(i) = max over j <= i of (m - j + 1) p(j)."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def naive_bh(p):
    """Benjamini–Hochberg (1995): adjusted p(i) = min over j >= i of m p(j) / j."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    for rank, i in enumerate(order):
        out[i] = min(1.0, min(m * p[j] / (r + 1) for r, j in enumerate(order) if r >= rank))
    return out


pvalue_lists = st.lists(
    st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.01, 0.05, 1.0])), min_size=1, max_size=30
)


@given(pvalue_lists)
def test_holm_and_bh_match_the_definitions(p):
    assert torch.allclose(holm(p), torch.tensor(naive_holm(p), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(
        benjamini_hochberg(p), torch.tensor(naive_bh(p), dtype=torch.float64), atol=1e-12
    )


@given(pvalue_lists)
def test_holm_is_at_least_bh_monotone_and_in_unit_interval(p):
    h, b = holm(p), benjamini_hochberg(p)
    raw = torch.tensor(p, dtype=torch.float64)
    assert (h >= b - 1e-12).all() and (b >= raw - 1e-12).all()
    for adj in (h, b):
        assert ((adj >= 0) & (adj <= 1)).all()
        order = raw.argsort()  # adjusted values keep the order of the raw ones
        assert (adj[order].diff() >= -1e-12).all()


def test_holm_and_bh_equal_statsmodels_on_random_inputs():
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 50, 300):
        p = rng.uniform(0, 1, m) ** 3  # many small p-values, so rejections happen
        for method, name in (("holm", "holm"), ("bh", "fdr_bh")):
            reject, adjusted, _, _ = multipletests(p, alpha=0.05, method=name)
            ours = adjust_pvalues(p, method=method, alpha=0.05)
            np.testing.assert_allclose(ours.p_adjusted.numpy(), adjusted, rtol=0, atol=1e-12)
            assert ours.reject.numpy().tolist() == reject.tolist()


def test_adjust_pvalues_result_and_errors():
    res = adjust_pvalues(torch.tensor([0.01, 0.04, 0.03]), method="bh", alpha=0.05)
    assert res.method == "bh" and res.alpha == 0.05
    assert res.p_adjusted.tolist() == pytest.approx([0.03, 0.04, 0.04])
    assert res.reject.tolist() == [True, True, True]
    assert adjust_pvalues([0.01, 0.04, 0.03]).p_adjusted.tolist() == pytest.approx(
        [0.03, 0.06, 0.06]
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])
    with pytest.raises(ValueError, match="NaN"):
        benjamini_hochberg([0.5, float("nan")])
    with pytest.raises((ValueError, TypeError), match="method"):  # TypeError: beartype
        adjust_pvalues([0.5], method="bonferroni")
    assert holm([]).numel() == 0


# ------------------------------------------------------------------ Spearman


def test_rankdata_averages_ties():
    assert rankdata(torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0])).tolist() == [2, 5, 2, 4, 2]


def test_spearman_equals_scipy_on_mostly_zero_data():
    spearmanr = pytest.importorskip("scipy.stats").spearmanr
    g = torch.Generator().manual_seed(3)
    checked = 0
    for _ in range(20):
        n = int(torch.randint(3, 60, (1,), generator=g))
        x = torch.randn(n, generator=g, dtype=torch.float64)
        x = torch.where(torch.rand(n, generator=g) < 0.8, 0.0, x)  # mostly zeros
        y = x * 0.5 + torch.randn(n, generator=g, dtype=torch.float64)
        y = torch.where(torch.rand(n, generator=g) < 0.6, 0.0, y)
        if x.unique().numel() == 1 or y.unique().numel() == 1:
            assert math.isnan(spearman(x, y))  # scipy: NaN with a ConstantInputWarning
            continue
        checked += 1
        expected = spearmanr(x.numpy(), y.numpy()).statistic
        assert spearman(x, y) == pytest.approx(float(expected), abs=1e-12)
    assert checked >= 15


@given(
    st.lists(st.integers(-3, 3), min_size=3, max_size=25).flatmap(
        lambda xs: st.tuples(
            st.just(xs), st.lists(st.integers(-3, 3), min_size=len(xs), max_size=len(xs))
        )
    )
)
def test_spearman_equals_pearson_of_average_ranks(pair):
    x, y = (torch.tensor(v, dtype=torch.float64) for v in pair)
    naive_rank = lambda v: torch.tensor(  # noqa: E731
        [sum(w < u for w in v.tolist()) + (sum(w == u for w in v.tolist()) + 1) / 2 for u in v]
    ).double()
    rx, ry = naive_rank(x), naive_rank(y)
    if rx.std() == 0 or ry.std() == 0:
        assert math.isnan(spearman(x, y))
        return
    expected = float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert spearman(x, y.long()) == spearman(x, y)  # integer input ranks the same


# ------------------------------------------------------------------ cluster bootstrap


def test_cluster_bootstrap_with_singleton_groups_is_the_paired_bootstrap():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    stat = lambda x, y: float((x - y).mean())  # noqa: E731
    paired = paired_bootstrap_ci(stat, a, b, n_boot=200, seed=7)
    clustered = cluster_bootstrap_ci(stat, a, b, groups=torch.arange(40), n_boot=200, seed=7)
    assert paired == clustered


def test_cluster_bootstrap_resamples_whole_groups():
    # 6 groups of 5 identical rows: any resample's mean is a mean of 6 group values, so
    # the cluster interval matches the row bootstrap over the 6 group means, not over 30 rows.
    values = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).repeat_interleave(5)
    groups = [f"g{i}" for i in range(6) for _ in range(5)]
    seen = []

    def mean(x):
        seen.append(x.numel())
        return float(x.mean())

    ci = cluster_bootstrap_ci(mean, values, groups=groups, n_boot=300, seed=0)
    per_group = bootstrap_ci(lambda x: float(x.mean()), torch.arange(6.0), n_boot=300, seed=0)
    assert set(seen) == {30}  # every resample draws 6 whole groups of 5
    assert abs(ci.low - per_group.low) < 0.5 and abs(ci.high - per_group.high) < 0.5
    rows = bootstrap_ci(lambda x: float(x.mean()), values, n_boot=300, seed=0)
    assert (ci.high - ci.low) > 1.8 * (rows.high - rows.low)  # rows understate the spread


def test_cluster_bootstrap_keeps_pairs_and_sizes_with_unequal_groups():
    groups = torch.tensor([3, 3, 3, 1, 7, 7])
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    calls = []

    def stat(x, y, gr):
        calls.append(gr.clone())
        return float((y - x).mean())

    ci = paired_bootstrap_ci(stat, base, base + 2, groups.float(), groups=groups, n_boot=50)
    assert ci == (2.0, 2.0, 2.0)
    for gr in calls[1:]:  # every group drawn comes with all its rows
        counts = {int(k): int((gr == k).sum()) for k in gr.unique()}
        assert all(c % {3: 3, 1: 1, 7: 2}[k] == 0 for k, c in counts.items())


def test_bootstrap_seeds_numpy_and_torch_generators_reproducibly():
    x = torch.arange(20.0)
    for make in (lambda: np.random.default_rng(5), lambda: torch.Generator().manual_seed(5)):
        a = bootstrap_ci(lambda v: float(v.mean()), x, n_boot=100, seed=make())
        b = bootstrap_ci(lambda v: float(v.mean()), x, n_boot=100, seed=make())
        assert a == b
    grouped = bootstrap_ci(
        lambda v: float(v.mean()), x, n_boot=100, seed=1, groups=[torch.arange(20) // 4]
    )
    assert grouped.low < grouped.estimate < grouped.high
    with pytest.raises(ValueError, match="one entry per sample"):
        bootstrap_ci(lambda v: float(v.mean()), x, groups=[])
    with pytest.raises(ValueError, match="labels for"):
        cluster_bootstrap_ci(lambda v: float(v.mean()), x, groups=[0, 1])


# ------------------------------------------------------------------ permutation tests


def _exact_sign_flip_p(d):
    """All 2^n sign patterns (the identity among them): the exact two-sided p-value."""
    n = len(d)
    obs = abs(sum(d) / n)
    hits = 0
    for mask in range(2**n):
        s = sum(v if (mask >> i) & 1 == 0 else -v for i, v in enumerate(d)) / n
        hits += abs(s) >= obs - 1e-12
    return hits / 2**n


def test_sign_flip_reports_resolution_and_uses_plus_one():
    d = torch.full((30,), 1.0)  # every flip pattern but all-positive has a smaller mean
    res = sign_flip_test(d, n_perm=99, seed=0)
    assert isinstance(res, PermutationTest)
    assert res.resolution == pytest.approx(0.01) and res.p_value == pytest.approx(0.01)
    assert res.n_extreme == 0 and res.n_perm == 99 and res.null.shape == (99,)
    less = sign_flip_test(d, n_perm=99, seed=0, alternative="less")
    assert less.p_value == 1.0
    zero = sign_flip_test(torch.zeros(5), n_perm=9)  # every permutation ties the observed
    assert zero.p_value == 1.0


def test_sign_flip_p_value_approximates_the_exact_test():
    d = [0.3, -0.1, 0.8, 0.5, -0.2, 0.4, 0.9, -0.05, 0.2, 0.1]
    exact = _exact_sign_flip_p(d)
    res = sign_flip_test(torch.tensor(d) + 1.0, torch.ones(10), n_perm=20000, seed=1)
    assert abs(res.p_value - exact) < 0.01
    greater = sign_flip_test(torch.tensor(d), n_perm=20000, seed=1, alternative="greater")
    assert greater.p_value < res.p_value


def test_sign_flip_with_groups_flips_clusters_together():
    d = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    res = sign_flip_test(d, groups=groups, n_perm=500, seed=0)
    # Three clusters: the null takes only the 2^3 values of (±3 ±3 ±4) / 8.
    possible = {
        (s0 * 3 + s1 * 3 + s2 * 4) / 8 for s0 in (-1, 1) for s1 in (-1, 1) for s2 in (-1, 1)
    }
    assert {round(v, 9) for v in res.null.tolist()} <= {round(v, 9) for v in possible}
    ungrouped = sign_flip_test(d, n_perm=500, seed=0)
    assert len(set(ungrouped.null.tolist())) > len(possible)


def test_permutation_test_under_the_null_is_roughly_uniform_and_never_below_resolution():
    g = torch.Generator().manual_seed(6)
    ps = []
    for i in range(60):
        a, b = torch.randn(12, generator=g), torch.randn(15, generator=g)
        res = permutation_test(a, b, n_perm=199, seed=i)
        assert res.p_value >= res.resolution == pytest.approx(1 / 200)
        ps.append(res.p_value)
    ps = torch.tensor(ps)
    assert 0.3 < ps.mean() < 0.7
    assert (ps < 0.05).float().mean() < 0.2


def test_permutation_test_detects_a_shift_and_matches_a_custom_statistic():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(25, generator=g) + 2.0, torch.randn(25, generator=g)
    res = permutation_test(a, b, n_perm=999, seed=np.random.default_rng(0))
    assert res.p_value == pytest.approx(1 / 1000) and res.method == "label_permutation"
    custom = permutation_test(
        a, b, statistic=lambda x, y: float(x.mean() - y.mean()), n_perm=300, seed=3
    )
    fast = permutation_test(a, b, n_perm=300, seed=3)
    assert torch.allclose(custom.null, fast.null) and custom.p_value == fast.p_value
    assert res.as_dict()["resolution"] == res.resolution
    with pytest.raises((ValueError, TypeError), match="alternative"):
        permutation_test(a, b, alternative="both")
    with pytest.raises(ValueError, match="n_perm"):
        sign_flip_test(a, n_perm=0)
    with pytest.raises((ValueError, TypeError)):  # TypeError: the shape check of jaxtyping
        sign_flip_test(a, b[:3])

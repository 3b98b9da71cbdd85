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

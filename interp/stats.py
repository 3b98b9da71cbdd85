"""Effect sizes and their uncertainty: Cohen's d, AUROC, bootstrap intervals.

Every claim of an effect in the studies comes with an interval from here.
Randomness is explicit: pass a ``torch.Generator`` (or a seed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["Interval", "auroc", "bootstrap_ci", "cohens_d", "paired_bootstrap_ci"]


class Interval(NamedTuple):
    """A point estimate with a percentile bootstrap interval."""

    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def cohens_d(a: Float[Tensor, " n"], b: Float[Tensor, " m"]) -> float:
    """Standardized mean difference (mean(a) − mean(b)) / pooled std."""
    a, b = a.double(), b.double()
    if a.numel() < 2 or b.numel() < 2:
        raise ValueError(f"cohens_d needs ≥ 2 samples per group, got {a.numel()} and {b.numel()}")
    na, nb = a.numel(), b.numel()
    pooled = ((na - 1) * a.var() + (nb - 1) * b.var()) / (na + nb - 2)
    return float((a.mean() - b.mean()) / pooled.clamp_min(1e-12).sqrt())


def auroc(pos: Float[Tensor, " n"], neg: Float[Tensor, " m"]) -> float:
    """Probability that a random positive scores above a random negative (ties count ½)."""
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    scores = torch.cat([pos, neg]).double()
    # Mann–Whitney U via average ranks, so ties are handled exactly.
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=scores.dtype)
    uniq, inverse = scores.unique(return_inverse=True)
    sums = torch.zeros_like(uniq).index_add_(0, inverse, ranks)
    counts = torch.zeros_like(uniq).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = pos.numel(), neg.numel()
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def bootstrap_ci(
    statistic: Callable[..., float],
    *samples: Tensor,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | torch.Generator = 0,
) -> Interval:
    """Percentile bootstrap of ``statistic(*samples)``, resampling each sample independently.

    Each sample is resampled along dim 0 with replacement. Use
    ``paired_bootstrap_ci`` when rows of the samples belong together.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    gen = _generator(seed)
    estimate = float(statistic(*samples))
    values = []
    for _ in range(n_boot):
        resampled = [s[torch.randint(0, s.shape[0], (s.shape[0],), generator=gen)] for s in samples]
        try:
            values.append(float(statistic(*resampled)))
        except ValueError:  # e.g. a resample with one class only
            continue
    return _percentiles(estimate, values, level)


def paired_bootstrap_ci(
    statistic: Callable[..., float],
    *samples: Tensor,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | torch.Generator = 0,
) -> Interval:
    """Percentile bootstrap resampling the same row indices in every sample (paired data)."""
    n = samples[0].shape[0]
    if any(s.shape[0] != n for s in samples):
        raise ValueError(f"paired samples need equal lengths, got {[s.shape[0] for s in samples]}")
    gen = _generator(seed)
    estimate = float(statistic(*samples))
    values = []
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=gen)
        try:
            values.append(float(statistic(*(s[idx] for s in samples))))
        except ValueError:
            continue
    return _percentiles(estimate, values, level)


def _percentiles(estimate: float, values: list[float], level: float) -> Interval:
    if not values:
        return Interval(estimate, float("nan"), float("nan"))
    v = torch.tensor(values, dtype=torch.float64)
    alpha = (1 - level) / 2
    low, high = torch.quantile(v, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return Interval(estimate, low, high)

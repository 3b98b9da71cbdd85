"""Effect sizes and their uncertainty: Cohen's d, AUROC, Spearman's rho, bootstrap
intervals (independent, paired, cluster), permutation tests, multiplicity corrections.

Every claim of an effect in the studies comes with an interval or a p-value from here.
Randomness is explicit: pass a seed, a ``torch.Generator`` or a ``numpy.random.Generator``;
the same seed gives the same resamples.

* Bootstrap intervals are percentile intervals (Efron & Tibshirani, 1993). With
  ``groups``, whole clusters are resampled (the cluster bootstrap: rows of one prompt,
  template or document are not independent, and resampling rows would understate the
  interval; Field & Welsh, 2007).
* Permutation p-values count the observed arrangement as one of the permutations,
  ``p = (1 + #{T* at least as extreme as T}) / (n_perm + 1)``, so a p-value is never 0
  and a test at level α is exact (Phipson & Smyth, 2010). The smallest attainable value,
  ``1 / (n_perm + 1)``, is reported as the test's ``resolution``.
* Holm (1979) controls the family-wise error rate, Benjamini & Hochberg (1995) the false
  discovery rate; both return adjusted p-values (reject where ``p_adjusted <= alpha``),
  equal to statsmodels' ``multipletests(method="holm" | "fdr_bh")``.
* Spearman's rho is Pearson's r of average ranks (ties share the mean of their ranks), as
  ``scipy.stats.spearmanr``; ranking ties arbitrarily biases rho where many values are
  equal (e.g. mostly zeros).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from jaxtyping import Bool, Float, Int, Real
from torch import Tensor

__all__ = [
    "ColumnTests",
    "ControlContrast",
    "Correction",
    "Interval",
    "Metric",
    "PairedDifference",
    "PermutationTest",
    "SeedSpread",
    "adjust_pvalue_groups",
    "adjust_pvalues",
    "auroc",
    "benjamini_hochberg",
    "bootstrap_ci",
    "cluster_bootstrap_ci",
    "cohens_d",
    "control_contrast",
    "describe_difference",
    "enrichment_test",
    "holm",
    "metric_summary",
    "paired_bootstrap_ci",
    "paired_difference",
    "permutation_test",
    "rankdata",
    "ratio_of_sums",
    "seed_spread",
    "seed_spreads",
    "sign_flip_columns",
    "sign_flip_test",
    "spearman",
    "wilson_interval",
]

Seed = int | torch.Generator | np.random.Generator
PValues = Float[Tensor, " m"] | Float[np.ndarray, " m"] | Sequence[float]
Groups = Int[Tensor, " n"] | Sequence[Hashable]
Alternative = Literal["two-sided", "greater", "less"]


class Interval(NamedTuple):
    """A point estimate with a percentile bootstrap interval."""

    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def _generator(seed: Seed) -> torch.Generator | np.random.Generator:
    if isinstance(seed, (torch.Generator, np.random.Generator)):
        return seed
    return torch.Generator().manual_seed(int(seed))


def _randint(gen: torch.Generator | np.random.Generator, high: int, size: int) -> Tensor:
    """``size`` integers uniform in ``[0, high)``."""
    if isinstance(gen, np.random.Generator):
        return torch.from_numpy(gen.integers(0, high, size=size, dtype=np.int64))
    return torch.randint(0, high, (size,), generator=gen)


def _uniform(gen: torch.Generator | np.random.Generator, shape: tuple[int, ...]) -> Tensor:
    if isinstance(gen, np.random.Generator):
        return torch.from_numpy(gen.random(shape))
    return torch.rand(shape, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------ effect sizes


def cohens_d(a: Float[Tensor, " n"], b: Float[Tensor, " m"]) -> float:
    """Standardized mean difference (mean(a) − mean(b)) / pooled std."""
    a, b = a.double(), b.double()
    if a.numel() < 2 or b.numel() < 2:
        raise ValueError(f"cohens_d needs ≥ 2 samples per group, got {a.numel()} and {b.numel()}")
    na, nb = a.numel(), b.numel()
    pooled = ((na - 1) * a.var() + (nb - 1) * b.var()) / (na + nb - 2)
    return float((a.mean() - b.mean()) / pooled.clamp_min(1e-12).sqrt())


def rankdata(x: Real[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks 1..n in float64; tied values share the mean of their ranks ("average" method
    of ``scipy.stats.rankdata``)."""
    x = x.double()
    if torch.isnan(x).any():
        raise ValueError("rankdata: input contains NaN")
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=x.dtype, device=x.device)
    uniq, inverse = x.unique(return_inverse=True)
    sums = torch.zeros_like(uniq).index_add_(0, inverse, ranks)
    counts = torch.zeros_like(uniq).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def auroc(pos: Float[Tensor, " n"], neg: Float[Tensor, " m"]) -> float:
    """Probability that a random positive scores above a random negative (ties count ½)."""
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    # Mann–Whitney U via average ranks, so ties are handled exactly.
    ranks = rankdata(torch.cat([pos, neg]).double())
    n_pos, n_neg = pos.numel(), neg.numel()
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def spearman(x: Real[Tensor, " n"], y: Real[Tensor, " n"]) -> float:
    """Spearman's rank correlation: Pearson's r of average ranks (tie-aware).

    Equals ``scipy.stats.spearmanr(x, y).statistic``. Returns NaN when either input is
    constant (the correlation is undefined; scipy returns NaN with a warning). Raises on
    fewer than 2 points or NaN input.
    """
    if x.numel() < 2:
        raise ValueError(f"spearman needs ≥ 2 points, got {x.numel()}")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = rx.norm() * ry.norm()
    if float(denom) == 0.0:
        return math.nan
    return float(((rx @ ry) / denom).clamp(-1.0, 1.0))


# ------------------------------------------------------------------ bootstrap


def _group_codes(groups: Groups, n: int) -> Tensor:
    """Group labels -> integer codes 0..G-1 (tensors by sorted value, other labels by
    first appearance)."""
    if isinstance(groups, Tensor):
        if groups.dim() != 1:
            raise ValueError(f"groups must be one label per row, got shape {tuple(groups.shape)}")
        codes = groups.cpu().unique(return_inverse=True)[1]
    else:
        seen: dict[Hashable, int] = {}
        codes = torch.tensor([seen.setdefault(g, len(seen)) for g in groups], dtype=torch.long)
    if codes.numel() != n:
        raise ValueError(f"groups has {codes.numel()} labels for {n} rows")
    return codes


class _Clusters:
    """Row indices of resampled clusters: draw G cluster ids with replacement and take
    every row of each drawn cluster (as often as it was drawn)."""

    def __init__(self, codes: Tensor):
        self.order = codes.argsort(stable=True)
        self.counts = torch.bincount(codes)
        self.starts = self.counts.cumsum(0) - self.counts
        self.n_groups = int(self.counts.numel())

    def draw(self, gen: torch.Generator | np.random.Generator) -> Tensor:
        picked = _randint(gen, self.n_groups, self.n_groups)
        sizes = self.counts[picked]
        offsets = torch.arange(int(sizes.sum())) - (sizes.cumsum(0) - sizes).repeat_interleave(
            sizes
        )
        return self.order[self.starts[picked].repeat_interleave(sizes) + offsets]


def bootstrap_ci(
    statistic: Callable[..., float],
    *samples: Tensor,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: Seed = 0,
    groups: Sequence[Tensor | Sequence[Hashable]] | None = None,
) -> Interval:
    """Percentile bootstrap of ``statistic(*samples)``, resampling each sample independently.

    Each sample is resampled along dim 0 with replacement. With ``groups`` (one sequence
    of group labels per sample), each sample is resampled by whole clusters instead. Use
    ``paired_bootstrap_ci`` when rows of the samples belong together. Resamples on which
    ``statistic`` raises ``ValueError`` (e.g. one class only) are skipped.
    """
    _check_level(level)
    gen = _generator(seed)
    estimate = float(statistic(*samples))
    clusters = None
    if groups is not None:
        if len(groups) != len(samples):
            raise ValueError(f"groups needs one entry per sample: {len(groups)} for {len(samples)}")
        clusters = [
            _Clusters(_group_codes(g, s.shape[0])) for g, s in zip(groups, samples, strict=True)
        ]
    values = []
    for _ in range(n_boot):
        if clusters is None:
            resampled = [s[_randint(gen, s.shape[0], s.shape[0])] for s in samples]
        else:
            resampled = [s[c.draw(gen)] for s, c in zip(samples, clusters, strict=True)]
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
    seed: Seed = 0,
    groups: Groups | None = None,
) -> Interval:
    """Percentile bootstrap resampling the same row indices in every sample (paired data).

    With ``groups`` (one label per row), whole clusters of rows are resampled, the same in
    every sample: the paired cluster bootstrap (see ``cluster_bootstrap_ci``).
    """
    if groups is not None:
        return cluster_bootstrap_ci(
            statistic, *samples, groups=groups, n_boot=n_boot, level=level, seed=seed
        )
    _check_level(level)
    n = _common_length(samples)
    gen = _generator(seed)
    estimate = float(statistic(*samples))
    values = []
    for _ in range(n_boot):
        idx = _randint(gen, n, n)
        try:
            values.append(float(statistic(*(s[idx] for s in samples))))
        except ValueError:
            continue
    return _percentiles(estimate, values, level)


def cluster_bootstrap_ci(
    statistic: Callable[..., float],
    *samples: Tensor,
    groups: Groups,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: Seed = 0,
) -> Interval:
    """Percentile cluster bootstrap: resample whole groups of rows with replacement.

    ``groups`` labels each row (a prompt id, a template, a document); every sample has
    the same rows, and a drawn group contributes all its rows, in every sample, as often
    as it was drawn. With one sample this is the plain cluster bootstrap; with several it
    is the paired cluster bootstrap (e.g. the same prompts before and after an edit).
    With ``groups=torch.arange(n)`` it equals ``paired_bootstrap_ci`` draw for draw.
    """
    _check_level(level)
    n = _common_length(samples)
    clusters = _Clusters(_group_codes(groups, n))
    gen = _generator(seed)
    estimate = float(statistic(*samples))
    values = []
    for _ in range(n_boot):
        idx = clusters.draw(gen)
        try:
            values.append(float(statistic(*(s[idx] for s in samples))))
        except ValueError:
            continue
    return _percentiles(estimate, values, level)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _common_length(samples: Sequence[Tensor]) -> int:
    if not samples:
        raise ValueError("need at least one sample")
    n = samples[0].shape[0]
    if any(s.shape[0] != n for s in samples):
        raise ValueError(f"paired samples need equal lengths, got {[s.shape[0] for s in samples]}")
    return n


def _percentiles(estimate: float, values: list[float], level: float) -> Interval:
    if not values:
        return Interval(estimate, float("nan"), float("nan"))
    v = torch.tensor(values, dtype=torch.float64)
    alpha = (1 - level) / 2
    low, high = torch.quantile(v, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return Interval(estimate, low, high)


# ------------------------------------------------------------------ permutation tests


@dataclass(frozen=True)
class PermutationTest:
    """A Monte Carlo permutation test.

    Attributes:
        statistic: the observed statistic.
        p_value: ``(1 + n_extreme) / (n_perm + 1)``; never below ``resolution``.
        n_perm: random permutations (sign flips / relabelings) drawn.
        n_extreme: permutations whose statistic was at least as extreme as the observed
            one (``|T*| >= |T|`` two-sided, ``T* >= T`` greater, ``T* <= T`` less).
        resolution: ``1 / (n_perm + 1)``, the smallest attainable p-value: a smaller
            threshold cannot be met, whatever the data.
        alternative: ``"two-sided"``, ``"greater"`` or ``"less"``.
        method: ``"sign_flip"`` (paired) or ``"label_permutation"`` (two-sample).
        null: the permutation statistics, shape ``[n_perm]`` (float64).
    """

    statistic: float
    p_value: float
    n_perm: int
    n_extreme: int
    resolution: float
    alternative: str
    method: str
    null: Tensor = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "statistic": self.statistic,
            "p_value": self.p_value,
            "n_perm": self.n_perm,
            "n_extreme": self.n_extreme,
            "resolution": self.resolution,
            "alternative": self.alternative,
            "method": self.method,
        }


def _permutation_result(
    observed: float, null: Tensor, alternative: str, method: str
) -> PermutationTest:
    # Statistics equal to the observed one up to rounding count as "as extreme" (the
    # identity permutation must count); same tolerance as scipy.stats.permutation_test.
    tol = 100 * torch.finfo(torch.float64).eps * abs(observed)
    if alternative == "two-sided":
        extreme = null.abs() >= abs(observed) - tol
    elif alternative == "greater":
        extreme = null >= observed - tol
    else:
        extreme = null <= observed + tol
    n_perm = int(null.numel())
    n_extreme = int(extreme.sum())
    return PermutationTest(
        statistic=observed,
        p_value=(1 + n_extreme) / (n_perm + 1),
        n_perm=n_perm,
        n_extreme=n_extreme,
        resolution=1 / (n_perm + 1),
        alternative=alternative,
        method=method,
        null=null,
    )


def _check_test_args(n_perm: int, alternative: str) -> None:
    if n_perm < 1:
        raise ValueError(f"n_perm must be ≥ 1, got {n_perm}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")


_CHUNK = 1024  # permutations evaluated per vectorized step


def sign_flip_test(
    a: Float[Tensor, " n"],
    b: Float[Tensor, " n"] | None = None,
    *,
    statistic: Callable[[Tensor], float] | None = None,
    n_perm: int = 9999,
    alternative: Alternative = "two-sided",
    seed: Seed = 0,
    groups: Groups | None = None,
) -> PermutationTest:
    """Paired permutation test by random sign flips of the differences ``a − b``.

    Under the null hypothesis of exchangeable pairs (a difference is as likely negative
    as positive), flipping signs leaves the distribution unchanged. ``statistic`` maps
    the differences to a number (default: their mean, vectorized); with ``b=None``, ``a``
    holds the differences. With ``groups``, all differences of one group flip together
    (clustered pairs). Two-sided compares ``|T*| >= |T|``, which suits statistics centred
    on 0 under the null, as the mean is.
    """
    _check_test_args(n_perm, alternative)
    if a.dim() != 1 or (b is not None and b.shape != a.shape):
        shapes = [tuple(a.shape)] + ([] if b is None else [tuple(b.shape)])
        raise ValueError(f"sign_flip_test needs 1-D paired samples of one length, got {shapes}")
    d = a.double() if b is None else a.double() - b.double()
    if d.numel() == 0:
        raise ValueError("sign_flip_test needs at least one pair")
    if torch.isnan(d).any():
        raise ValueError("sign_flip_test: differences contain NaN")
    codes = _group_codes(groups, d.numel()) if groups is not None else None
    n_signs = d.numel() if codes is None else int(codes.max()) + 1
    gen = _generator(seed)
    observed = float(d.mean()) if statistic is None else float(statistic(d))
    chunks = []
    for start in range(0, n_perm, _CHUNK):
        k = min(_CHUNK, n_perm - start)
        signs = torch.where(_uniform(gen, (k, n_signs)) < 0.5, -1.0, 1.0).double().to(d.device)
        if codes is not None:
            signs = signs[:, codes.to(d.device)]
        flipped = signs * d
        if statistic is None:
            chunks.append(flipped.mean(1))
        else:
            chunks.append(torch.tensor([float(statistic(row)) for row in flipped]))
    null = torch.cat(chunks).double().cpu()
    return _permutation_result(observed, null, alternative, "sign_flip")


def permutation_test(
    a: Float[Tensor, " n"],
    b: Float[Tensor, " m"],
    *,
    statistic: Callable[[Tensor, Tensor], float] | None = None,
    n_perm: int = 9999,
    alternative: Alternative = "two-sided",
    seed: Seed = 0,
) -> PermutationTest:
    """Two-sample permutation test: random relabelings of the pooled values.

    Under the null hypothesis the labels are exchangeable, so every split of the pooled
    values into groups of sizes n and m is equally likely. ``statistic(a, b)`` defaults
    to ``mean(a) − mean(b)`` (vectorized); two-sided compares ``|T*| >= |T|``.
    """
    _check_test_args(n_perm, alternative)
    if a.dim() != 1 or b.dim() != 1:
        raise ValueError(
            f"permutation_test needs 1-D samples, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    n, m = a.numel(), b.numel()
    if n == 0 or m == 0:
        raise ValueError(f"permutation_test needs two non-empty samples, got {n} and {m}")
    pooled = torch.cat([a.double(), b.double()])
    if torch.isnan(pooled).any():
        raise ValueError("permutation_test: samples contain NaN")
    gen = _generator(seed)
    observed = (
        float(a.double().mean() - b.double().mean())
        if statistic is None
        else float(statistic(a.double(), b.double()))
    )
    chunks = []
    for start in range(0, n_perm, _CHUNK):
        k = min(_CHUNK, n_perm - start)
        perms = _uniform(gen, (k, n + m)).argsort(dim=1).to(pooled.device)
        shuffled = pooled[perms]
        if statistic is None:
            chunks.append(shuffled[:, :n].mean(1) - shuffled[:, n:].mean(1))
        else:
            chunks.append(torch.tensor([float(statistic(row[:n], row[n:])) for row in shuffled]))
    null = torch.cat(chunks).double().cpu()
    return _permutation_result(observed, null, alternative, "label_permutation")


# ------------------------------------------------------------------ multiplicity


@dataclass(frozen=True, eq=False)  # tensor fields: compare p_adjusted / reject directly
class Correction:
    """P-values adjusted for multiple comparisons.

    Attributes:
        p_adjusted: adjusted p-values in the order given, float64, in [0, 1].
        reject: ``p_adjusted <= alpha``: the hypotheses rejected at level ``alpha``.
        method: ``"holm"`` (family-wise error rate) or ``"bh"`` (false discovery rate).
        alpha: the level ``reject`` was computed at.
    """

    p_adjusted: Float[Tensor, " m"]
    reject: Bool[Tensor, " m"]
    method: str
    alpha: float


def _pvalues(p: PValues) -> Tensor:
    p = torch.as_tensor(p, dtype=torch.float64).flatten()
    if torch.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p-values must lie in [0, 1] (no NaN), got {p.tolist()}")
    return p


def holm(p: PValues) -> Float[Tensor, " m"]:
    """Holm's step-down adjusted p-values (controls the family-wise error rate).

    Sorted ascending, ``p_adj(i) = max_{j <= i} min(1, (m − j + 1) · p(j))``; returned in
    the input order. Equals statsmodels' ``multipletests(p, method="holm")[1]``.
    """
    p = _pvalues(p)
    m = p.numel()
    if m == 0:
        return p
    order = p.argsort()
    scaled = p[order] * torch.arange(m, 0, -1, dtype=torch.float64, device=p.device)
    adjusted = torch.cummax(scaled, 0).values.clamp(max=1.0)
    out = torch.empty_like(p)
    out[order] = adjusted
    return out


def benjamini_hochberg(p: PValues) -> Float[Tensor, " m"]:
    """Benjamini–Hochberg step-up adjusted p-values (controls the false discovery rate
    for independent or positively dependent tests).

    Sorted ascending, ``p_adj(i) = min_{j >= i} min(1, m · p(j) / j)``; returned in the
    input order. Equals statsmodels' ``multipletests(p, method="fdr_bh")[1]``.
    """
    p = _pvalues(p)
    m = p.numel()
    if m == 0:
        return p
    order = p.argsort()
    scaled = p[order] * m / torch.arange(1, m + 1, dtype=torch.float64, device=p.device)
    adjusted = torch.cummin(scaled.flip(0), 0).values.flip(0).clamp(max=1.0)
    out = torch.empty_like(p)
    out[order] = adjusted
    return out


def adjust_pvalues(
    p: PValues,
    method: Literal["holm", "bh"] = "holm",
    alpha: float = 0.05,
) -> Correction:
    """Adjusted p-values and rejections: ``method="holm"`` or ``"bh"`` (Benjamini–Hochberg)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if method == "holm":
        adjusted = holm(p)
    elif method == "bh":
        adjusted = benjamini_hochberg(p)
    else:
        raise ValueError(f"method must be 'holm' or 'bh', got {method!r}")
    return Correction(p_adjusted=adjusted, reject=adjusted <= alpha, method=method, alpha=alpha)


def wilson_interval(k: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval of a binomial proportion ``k / n``.

    Unlike a bootstrap of ``k`` successes in ``n`` trials, it stays informative at the
    edges: ``0`` of ``n`` gives ``[0, z² / (n + z²)]`` (about ``3.8 / n`` at 95%), where
    every bootstrap resample would be 0 and the percentile interval ``[0, 0]``.
    """
    _check_level(level)
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise ValueError(f"k and n must be integers, got {k!r}, {n!r}")
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    z = float(torch.special.ndtri(torch.tensor(0.5 + level / 2, dtype=torch.float64)))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return Interval(p, low, high)


@dataclass(frozen=True)
class PairedDifference:
    """``statistic(after) − statistic(before)`` on the same rows, with its intervals.

    Attributes:
        before, after: the statistic on each condition (``None`` where it raises
            ``ValueError``, e.g. a zero denominator).
        estimate: ``after − before`` (``None`` when either is undefined).
        intervals: level -> ``(low, high)``, percentile paired bootstrap; empty when the
            interval is degenerate or the estimate undefined.
        degenerate: every bootstrap resample gave the same difference (e.g. no row
            changed): a percentile interval would read ``[x, x]``, which claims a
            precision the data do not have; report ``n_changed`` instead.
        n_changed: rows whose columns differ between the conditions.
        n: rows.
    """

    before: float | None
    after: float | None
    estimate: float | None
    intervals: dict[float, tuple[float, float]]
    degenerate: bool
    n_changed: int
    n: int

    def as_dict(self) -> dict[str, object]:
        return {
            "before": self.before,
            "after": self.after,
            "estimate": self.estimate,
            "intervals": {str(k): list(v) for k, v in self.intervals.items()},
            "degenerate": self.degenerate,
            "n_changed": self.n_changed,
            "n": self.n,
        }


def paired_difference(
    statistic: Callable[..., float],
    before: Sequence[Tensor],
    after: Sequence[Tensor],
    *,
    levels: Sequence[float] = (0.95,),
    n_boot: int = 1000,
    seed: Seed = 0,
) -> PairedDifference:
    """A before/after comparison on paired rows: ``statistic(*after) − statistic(*before)``.

    ``before`` and ``after`` are the same columns (one tensor per column, rows aligned)
    under the two conditions; ``statistic`` maps one condition's columns to a number (a
    ratio of sums, a mean …). Rows are resampled together in both conditions
    (``paired_bootstrap_ci``; the same resamples at every level, so a higher level gives a
    wider interval, e.g. a Bonferroni level ``1 − α/m``). A degenerate bootstrap (all
    resamples equal) gives no interval but says so, with the number of changed rows.
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"before and after need the same columns: {len(before)} vs {len(after)}")
    n = _common_length([*before, *after])
    k = len(before)

    def defined(cols: Sequence[Tensor]) -> float | None:
        try:
            value = float(statistic(*cols))
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    b, a = defined(before), defined(after)
    changed = torch.zeros(n, dtype=torch.bool)
    for x, y in zip(before, after, strict=True):
        changed |= (x != y).reshape(n, -1).any(1).cpu()
    if b is None or a is None:
        return PairedDifference(b, a, None, {}, False, int(changed.sum()), n)

    def delta(*cols: Tensor) -> float:
        return float(statistic(*cols[k:])) - float(statistic(*cols[:k]))

    intervals = {}
    for level in levels:
        iv = paired_bootstrap_ci(delta, *before, *after, n_boot=n_boot, level=level, seed=seed)
        intervals[float(level)] = (iv.low, iv.high)
    if not all(math.isfinite(lo) and math.isfinite(hi) for lo, hi in intervals.values()):
        intervals = {}  # every resample was undefined
    degenerate = bool(intervals) and all(hi - lo <= 1e-12 for lo, hi in intervals.values())
    return PairedDifference(
        b, a, a - b, {} if degenerate else intervals, degenerate, int(changed.sum()), n
    )


@dataclass(frozen=True)
class ColumnTests:
    """Sign-flip tests of every column of a matrix (:func:`sign_flip_columns`).

    Attributes:
        statistic: each column's mean difference, shape ``[m]`` (float64).
        p_value: ``(1 + n_extreme) / (n_perm + 1)`` per column, shape ``[m]``.
        n_extreme: per column, the sign flips at least as extreme as the observed mean.
        n_perm: sign flips drawn (shared by all columns).
        resolution: ``1 / (n_perm + 1)``, the smallest attainable p-value.
        alternative: ``"two-sided"``, ``"greater"`` or ``"less"``.
    """

    statistic: Float[Tensor, " m"]
    p_value: Float[Tensor, " m"]
    n_extreme: Int[Tensor, " m"]
    n_perm: int
    resolution: float
    alternative: str


def sign_flip_columns(
    a: Float[Tensor, "n m"],
    b: Float[Tensor, "n m"] | None = None,
    *,
    n_perm: int = 9999,
    alternative: Alternative = "two-sided",
    seed: Seed = 0,
    max_elements: int = 1 << 24,
) -> ColumnTests:
    """:func:`sign_flip_test` of the mean difference on each column of ``a − b`` at once
    (rows are the pairs, columns e.g. the latents of an SAE).

    Every column sees the same sign flips, so column ``j``'s result equals
    ``sign_flip_test(a[:, j], b[:, j], n_perm=n_perm, alternative=alternative, seed=seed)``
    with an integer seed (the same random draws and the same arithmetic), without drawing
    the flips once per column. ``max_elements`` bounds the ``flips × columns × rows``
    products held in memory at once. With ``b=None``, ``a`` holds the differences.
    """
    _check_test_args(n_perm, alternative)
    if a.dim() != 2 or (b is not None and b.shape != a.shape):
        shapes = [tuple(a.shape)] + ([] if b is None else [tuple(b.shape)])
        raise ValueError(f"sign_flip_columns needs paired [n, m] matrices, got {shapes}")
    d = (a.double() if b is None else a.double() - b.double()).T.contiguous()  # [m, n]
    if d.shape[1] == 0:
        raise ValueError("sign_flip_columns needs at least one pair")
    if torch.isnan(d).any():
        raise ValueError("sign_flip_columns: differences contain NaN")
    m, n = d.shape
    gen = _generator(seed)
    observed = d.mean(1)
    tol = 100 * torch.finfo(torch.float64).eps * observed.abs()
    n_extreme = torch.zeros(m, dtype=torch.long, device=d.device)
    for start in range(0, n_perm, _CHUNK):
        k = min(_CHUNK, n_perm - start)
        signs = torch.where(_uniform(gen, (k, n)) < 0.5, -1.0, 1.0).double().to(d.device)
        step = max(1, max_elements // (k * n))
        for c in range(0, m, step):
            obs, t = observed[c : c + step], tol[c : c + step]
            null = (signs[None] * d[c : c + step, None]).reshape(-1, n).mean(1).view(-1, k)
            if alternative == "two-sided":
                extreme = null.abs() >= (obs.abs() - t)[:, None]
            elif alternative == "greater":
                extreme = null >= (obs - t)[:, None]
            else:
                extreme = null <= (obs + t)[:, None]
            n_extreme[c : c + step] += extreme.sum(1)
    p = (1 + n_extreme.double()) / (n_perm + 1)
    return ColumnTests(
        observed.cpu(), p.cpu(), n_extreme.cpu(), n_perm, 1 / (n_perm + 1), alternative
    )


# ------------------------------------------------------------------ spread over seeds


@dataclass(frozen=True)
class SeedSpread:
    """One metric's values over seeds (:func:`seed_spread`).

    Attributes:
        per_seed: the values as given (``None`` / NaN kept in place).
        n: how many of them are finite numbers (the rest are left out of the summary).
        mean, sd, min, max: over the finite values; ``sd`` is the sample SD (``n − 1``)
            and needs two values; all are ``None`` without a finite value.
    """

    per_seed: tuple[float | None, ...]
    n: int
    mean: float | None
    sd: float | None
    min: float | None
    max: float | None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_seed": list(self.per_seed)}


def seed_spread(values: Sequence[float | None]) -> SeedSpread:
    """A metric summarised over seeds: per-seed values, mean, SD, min and max of the finite
    ones (a seed whose statistic was undefined, ``None`` or NaN, is kept in ``per_seed``
    but left out of the summary)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return SeedSpread(
        per_seed=tuple(values),
        n=len(v),
        mean=statistics.fmean(v) if v else None,
        sd=statistics.stdev(v) if len(v) > 1 else None,
        min=min(v) if v else None,
        max=max(v) if v else None,
    )


def seed_spreads(per_seed: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, Any]]:
    """:func:`seed_spread` of every metric, from one ``{metric: value}`` dict per seed (the
    first seed's metrics; a seed without one counts as ``None``), JSON-ready."""
    if not per_seed:
        return {}
    return {k: seed_spread([r.get(k) for r in per_seed]).as_dict() for k in per_seed[0]}


def adjust_pvalue_groups(
    groups: Mapping[str, Sequence[float]],
    method: Literal["holm", "bh"] = "holm",
    alpha: float = 0.05,
) -> dict[str, list[float]]:
    """:func:`adjust_pvalues` over ONE family given as named lists (e.g. comparison ->
    per-layer p-values): all values are adjusted together, and returned in the same
    names and order."""
    flat = [p for ps in groups.values() for p in ps]
    adjusted = adjust_pvalues(flat, method=method, alpha=alpha).p_adjusted.tolist()
    out, start = {}, 0
    for name, ps in groups.items():
        out[name], start = adjusted[start : start + len(ps)], start + len(ps)
    return out


@dataclass(frozen=True)
class ControlContrast:
    """A tested column against control columns on two groups of rows
    (:func:`control_contrast`).

    Attributes:
        per_column: ``statistic(effects[a], effects[b])``, shape ``[1 + n_controls]``;
            column 0 is the tested one.
        contrast: ``per_column[0] − mean(per_column[1:])`` with a percentile bootstrap
            interval (rows resampled within ``a`` and within ``b``).
        p_permutation: one-sided (contrast greater than by chance) permutation p-value,
            rows relabelled between ``a`` and ``b``.
        p_rank: ``(1 + #{controls >= tested}) / (1 + n_controls)``: the tested column's
            rank among the controls (never below ``1 / (1 + n_controls)``).
    """

    per_column: Float[Tensor, " k"]
    contrast: Interval
    p_permutation: float
    p_rank: float


def control_contrast(
    effects: Float[Tensor, "n k"],
    a: Sequence[int],
    b: Sequence[int],
    statistic: Callable[[Tensor, Tensor], Tensor],
    *,
    n_boot: int = 1000,
    n_perm: int = 9999,
    seed: Seed = 0,
) -> ControlContrast:
    """Is a tested intervention's contrast between two groups of rows larger than that of
    its controls (e.g. random feature sets matched on firing rate)?

    ``effects[:, 0]`` holds the tested intervention's effect on every row, ``effects[:, 1:]``
    the controls'; ``a`` and ``b`` are the row indices of the two groups; ``statistic``
    maps the rows of each group (``[n_a, k]``, ``[n_b, k]``) to one value per column. The
    contrast ``T = statistic[0] − mean(statistic[1:])`` gets a bootstrap interval (rows
    resampled within each group), a permutation test of the group labels (one-sided: T
    greater) and the tested column's rank among the controls.
    """
    if effects.dim() != 2 or effects.shape[1] < 2:
        raise ValueError(f"effects must be [n, 1 + n_controls >= 2], got {tuple(effects.shape)}")
    if not a or not b:
        raise ValueError(f"control_contrast needs two non-empty groups, got {len(a)} and {len(b)}")
    i, j = torch.tensor(list(a)).double(), torch.tensor(list(b)).double()

    def contrast(x: Tensor, y: Tensor) -> float:
        v = statistic(effects[x.long()], effects[y.long()])
        return float(v[0] - v[1:].mean())

    per = statistic(effects[list(a)], effects[list(b)])
    perm = permutation_test(
        i, j, statistic=contrast, n_perm=n_perm, alternative="greater", seed=seed
    )
    interval = bootstrap_ci(contrast, i, j, n_boot=n_boot, seed=seed)
    p_rank = (1 + int((per[1:] >= per[0]).sum())) / len(per)
    return ControlContrast(per, interval, perm.p_value, p_rank)


def enrichment_test(
    labels: Int[Tensor, " n"],
    member: Bool[Tensor, " n"],
    n_groups: int | None = None,
    *,
    n_perm: int = 9999,
    seed: Seed = 0,
) -> tuple[Float[Tensor, " k"], PermutationTest]:
    """Over-representation of members in groups (e.g. of one kind of item in clusters).

    ``enrichment[g] = (members' share of group g) / (members' share of all items)``: 1 is
    as expected, an empty group gets 0. The test is one-sided on the largest enrichment,
    with the member labels shuffled over the items: it compares the largest of ``k``
    enrichments with the largest under the null, which accounts for having picked it.
    ``n_groups`` defaults to ``labels.max() + 1``.

    Returns:
        the enrichment per group, shape ``[n_groups]``, and the test of its maximum.
    """
    if labels.shape != member.shape or labels.dim() != 1:
        raise ValueError(f"labels and member must be [n], got {labels.shape} and {member.shape}")
    if not member.any() or member.all():
        raise ValueError("enrichment_test needs both members and non-members")
    k = int(labels.max()) + 1 if n_groups is None else n_groups

    def enrichment(a: Tensor, b: Tensor) -> Tensor:
        n_a = torch.bincount(a.long(), minlength=k)
        n_all = n_a + torch.bincount(b.long(), minlength=k)
        return (n_a / n_all.clamp_min(1)) / (len(a) / (len(a) + len(b)))

    def largest(a: Tensor, b: Tensor) -> float:
        return float(enrichment(a, b).max())

    a, b = labels[member].double(), labels[~member].double()
    test = permutation_test(
        a, b, statistic=largest, n_perm=n_perm, alternative="greater", seed=seed
    )
    return enrichment(a, b), test


# ------------------------------------------------------------------ a metric of per-row columns


@dataclass(frozen=True)
class Metric:
    """A statistic of named per-row columns, for :func:`metric_summary`.

    Attributes:
        statistic: ``statistic(*cols) -> float`` on the columns named by ``columns``, in that
            order; ``ValueError`` means undefined (e.g. a zero denominator).
        columns: the names of the columns it reads (all of them count as the rows' values
            when :func:`paired_difference` counts changed rows).
        kind: ``"statistic"`` (any function; bootstrap interval), ``"ratio"``
            (``sum(columns[0]) / sum(columns[1])``, reported with ``n``, the denominator's
            sum; bootstrap interval) or ``"count"`` (a ratio whose numerator counts
            successes among the denominator's trials: ``k`` of ``n`` with a Wilson
            interval, informative where a bootstrap of 0 of ``n`` would read ``[0, 0]``).
    """

    statistic: Callable[..., float]
    columns: tuple[str, ...]
    kind: Literal["statistic", "ratio", "count"] = "statistic"

    def __post_init__(self) -> None:
        if self.kind not in ("statistic", "ratio", "count"):
            raise ValueError(f"kind must be 'statistic', 'ratio' or 'count', got {self.kind!r}")
        if not self.columns or (self.kind != "statistic" and len(self.columns) != 2):
            raise ValueError(f"a {self.kind} metric needs columns, two for a ratio or count")

    @classmethod
    def ratio(cls, numerator: str, denominator: str) -> Metric:
        """``sum(numerator) / sum(denominator)`` (:func:`ratio_of_sums`)."""
        return cls(ratio_of_sums, (numerator, denominator), "ratio")

    @classmethod
    def count(cls, successes: str, trials: str) -> Metric:
        """``sum(successes) / sum(trials)``, reported as ``k`` of ``n`` with Wilson."""
        return cls(ratio_of_sums, (successes, trials), "count")


def ratio_of_sums(numerator: Tensor, denominator: Tensor) -> float:
    """``sum(numerator) / sum(denominator)``; ``ValueError`` when the denominator sums to 0."""
    d = float(denominator.sum())
    if d == 0:
        raise ValueError("zero denominator")
    return float(numerator.sum()) / d


def metric_summary(
    columns: Mapping[str, Mapping[str, Tensor]],
    metric: Metric,
    *,
    rows: Int[Tensor, " r"] | None = None,
    compare: tuple[str, str] | None = None,
    level: float = 0.95,
    levels: Sequence[float] = (0.95,),
    n_boot: int = 1000,
    seed: Seed = 0,
) -> dict[str, Any]:
    """One metric under each condition and, with ``compare=(before, after)``, its change
    on the same rows.

    ``columns`` maps each condition to its per-row columns by name (rows aligned across
    conditions); ``rows`` picks the rows the metric is computed on (default: all).

    Returns a JSON-ready dict: per condition ``{"estimate": ...}``, plus for a count ``k``,
    ``n`` and ``wilson`` (the Wilson interval at ``level``), otherwise ``interval`` (the
    percentile paired bootstrap at ``level``; ``None`` when every resample gives the same
    value) and for a ratio ``n``; the condition's entry is ``None`` where the metric is
    undefined. With ``compare``, ``"difference"``: :func:`paired_difference` (after −
    before at each of ``levels``, the same resamples) as a dict.
    """
    names = list(columns)
    for who in compare or ():
        if who not in columns:
            raise ValueError(f"compare names {who!r}, not one of the conditions {names}")
    cols = {}
    for who, table in columns.items():
        missing = [k for k in metric.columns if k not in table]
        if missing:
            raise KeyError(f"condition {who!r} lacks column(s) {missing}")
        cols[who] = [table[k] if rows is None else table[k][rows] for k in metric.columns]
    out: dict[str, Any] = {}
    for who, c in cols.items():
        try:
            entry: dict[str, Any] = {"estimate": float(metric.statistic(*c))}
        except ValueError:  # undefined, e.g. a zero denominator
            out[who] = None
            continue
        if metric.kind != "statistic":
            k, n = (int(x.sum()) for x in c)
            entry["n"] = n
        if metric.kind == "count":
            entry |= {"k": k, "wilson": list(wilson_interval(k, n, level)[1:])}
        else:
            iv = paired_bootstrap_ci(metric.statistic, *c, n_boot=n_boot, level=level, seed=seed)
            entry["interval"] = [iv.low, iv.high] if iv.high > iv.low else None
        out[who] = entry
    if compare is not None:
        before, after = (cols[who] for who in compare)
        d = paired_difference(
            metric.statistic, before, after, levels=levels, n_boot=n_boot, seed=seed
        )
        out["difference"] = d.as_dict()
    return out


def describe_difference(
    d: PairedDifference | Mapping[str, Any], *, unit: str = "rows", spec: str = "+.3f"
) -> str:
    """One line for a :func:`paired_difference` result (or its ``as_dict()``):
    ``before -> after, estimate [low, high] / [low, high]`` (one interval per level, in
    order), or ``degenerate: k of n <unit> changed`` in place of the intervals; ``n/a`` for
    an undefined value."""
    d = d if isinstance(d, Mapping) else d.as_dict()

    def f(x: float | None) -> str:
        return "n/a" if x is None else format(x, spec)

    ivs = " / ".join(f"[{f(lo)}, {f(hi)}]" for lo, hi in d["intervals"].values())
    if d["degenerate"]:
        ivs = f"degenerate: {d['n_changed']} of {d['n']} {unit} changed"
    text = f"{f(d['before'])} -> {f(d['after'])}, {f(d['estimate'])}"
    return f"{text} {ivs}" if ivs else text

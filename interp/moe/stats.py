"""Routing statistics: selection frequency, gate mass and SteerMoE's risk difference.

Design
------
All functions are pure: they read ``RoutingTrace`` tensors and never run a
model. Following SteerMoE (Fayyaz et al. 2025, arXiv:2509.09660, §3.1), for
condition ``c`` and every (layer ℓ, expert i)

    p_c(ℓ, i) = A_c(ℓ, i) / N_c,     Δ(ℓ, i) = p_1(ℓ, i) − p_2(ℓ, i),

where ``A_c`` counts the tokens of condition ``c`` on which expert i was in
layer ℓ's top-k and ``N_c`` counts the tokens (pooled over examples, not a
mean of per-example rates). The gate-mass variant replaces ``A_c`` by the
summed gate weight the expert received, i.e. ``p_c`` is its mean gate weight
per token. Experts are ranked across *all* (layer, expert) pairs.

Length matching (the study's "K = min(L_safe, L_unsafe)") keeps the first
``min(L₁ᵢ, L₂ᵢ)`` tokens of both members of pair ``i``, so a long completion
does not weigh more than its partner.

Uncertainty: tokens of one example are not independent, so intervals come
from a percentile bootstrap over *examples* (a cluster bootstrap): the pairs
are resampled together when the conditions are paired (the same requests
with two completions, the same question with and without its document),
independently otherwise. The bootstrap is vectorised over all (layer, expert)
pairs from per-example sufficient statistics; it draws exactly the resamples
that ``interp.stats.paired_bootstrap_ci`` / ``bootstrap_ci`` draw for the same
seed, and ``expert_interval`` computes one pair's interval with those
reference functions (the tests check they agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from interp.moe.trace import RoutingTrace
from interp.stats import Interval, bootstrap_ci, paired_bootstrap_ci

__all__ = [
    "ExpertScore",
    "RiskDifference",
    "expert_interval",
    "gate_mass",
    "length_match",
    "rank_experts",
    "risk_difference",
    "selection_frequency",
]

Measure = Literal["selection", "mass"]
RankBy = Literal["abs", "positive", "negative"]


def _sufficient(trace: RoutingTrace, measure: Measure) -> Tensor:
    if measure == "selection":
        return trace.counts()
    if measure == "mass":
        return trace.mass()
    raise ValueError(f"measure must be 'selection' or 'mass', got {measure!r}")


def _rate(per_example: Tensor, lengths: Tensor) -> Tensor:
    n = lengths.to(torch.float64).sum()
    if n == 0:
        raise ValueError("no tokens: every example in this trace is empty")
    return per_example.sum(0) / n


def selection_frequency(trace: RoutingTrace) -> Float[Tensor, "n_layers n_experts"]:
    """Share of tokens on which each (layer, expert) is in the top-k (rows sum to ``top_k``)."""
    return _rate(trace.counts(), trace.lengths)


def gate_mass(trace: RoutingTrace) -> Float[Tensor, "n_layers n_experts"]:
    """Mean gate weight per token each (layer, expert) receives (0 when not selected)."""
    return _rate(trace.mass(), trace.lengths)


def length_match(a: RoutingTrace, b: RoutingTrace) -> tuple[RoutingTrace, RoutingTrace]:
    """Truncate pair ``i`` of both traces to its first ``min(len_a[i], len_b[i])`` tokens."""
    if a.n_examples != b.n_examples:
        raise ValueError(
            f"length matching pairs examples: got {a.n_examples} and {b.n_examples} examples"
        )
    m = torch.minimum(a.lengths.long(), b.lengths.long())
    return a.truncate(m), b.truncate(m)


class ExpertScore(NamedTuple):
    """One (layer, expert) in a ranking; ``low``/``high`` are NaN without a bootstrap."""

    layer: int
    expert: int
    rd: float
    low: float
    high: float
    p1: float
    p2: float


@dataclass(frozen=True)
class RiskDifference:
    """Risk differences ``p1 − p2`` for every (layer, expert), with bootstrap intervals.

    Attributes:
        layers: decoder-layer index of each row.
        measure: ``"selection"`` (top-k frequency) or ``"mass"`` (mean gate weight).
        p1, p2: ``[n_layers, n_experts]`` rates in conditions 1 and 2.
        rd: ``p1 − p2``.
        low, high: percentile-bootstrap bounds (``None`` if ``n_boot=0``).
        level: interval coverage.
        n_examples, n_tokens: per condition, after length matching.
        paired: whether examples were resampled as pairs.
    """

    layers: tuple[int, ...]
    measure: str
    p1: Float[Tensor, "n_layers n_experts"]
    p2: Float[Tensor, "n_layers n_experts"]
    rd: Float[Tensor, "n_layers n_experts"]
    low: Float[Tensor, "n_layers n_experts"] | None
    high: Float[Tensor, "n_layers n_experts"] | None
    level: float
    n_examples: tuple[int, int]
    n_tokens: tuple[int, int]
    paired: bool

    def interval(self, layer: int, expert: int) -> Interval:
        """The ``Interval`` of one (decoder layer, expert)."""
        r = self.layers.index(layer)
        nan = float("nan")
        low = nan if self.low is None else float(self.low[r, expert])
        high = nan if self.high is None else float(self.high[r, expert])
        return Interval(float(self.rd[r, expert]), low, high)

    def rank(self, by: RankBy = "abs", top: int | None = None) -> list[ExpertScore]:
        """(layer, expert) pairs sorted by ``|Δ|``, ``+Δ`` or ``−Δ`` (see ``rank_experts``)."""
        return rank_experts(self, by=by, top=top)

    def as_records(self) -> list[dict[str, float | int]]:
        """One JSON-ready dict per (layer, expert), in ranking order by ``|Δ|``."""
        return [s._asdict() for s in self.rank("abs")]


def rank_experts(
    rd: RiskDifference, by: RankBy = "abs", top: int | None = None
) -> list[ExpertScore]:
    """Rank all (layer, expert) pairs: by ``|Δ|`` (SteerMoE), or most positive / negative first.

    Ties keep (layer, expert) order.
    """
    if by == "abs":
        key = rd.rd.abs()
    elif by == "positive":
        key = rd.rd
    elif by == "negative":
        key = -rd.rd
    else:
        raise ValueError(f"by must be 'abs', 'positive' or 'negative', got {by!r}")
    order = torch.sort(key.reshape(-1), descending=True, stable=True).indices
    if top is not None:
        order = order[:top]
    E = rd.rd.shape[1]
    nan = float("nan")
    out = []
    for flat in order.tolist():
        r, e = divmod(flat, E)
        out.append(
            ExpertScore(
                layer=rd.layers[r],
                expert=e,
                rd=float(rd.rd[r, e]),
                low=nan if rd.low is None else float(rd.low[r, e]),
                high=nan if rd.high is None else float(rd.high[r, e]),
                p1=float(rd.p1[r, e]),
                p2=float(rd.p2[r, e]),
            )
        )
    return out


def _check_compatible(a: RoutingTrace, b: RoutingTrace) -> None:
    if a.layers != b.layers or a.n_experts != b.n_experts:
        raise ValueError(
            f"traces differ: layers {a.layers} vs {b.layers}, experts {a.n_experts} vs {b.n_experts}"
        )


def _draw(n: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, n, (n,), generator=gen)


def risk_difference(
    trace_1: RoutingTrace,
    trace_2: RoutingTrace,
    *,
    measure: Measure = "selection",
    length_matched: bool = False,
    paired: bool = True,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | torch.Generator = 0,
) -> RiskDifference:
    """SteerMoE's ``Δ = p₁ − p₂`` for every (layer, expert), with a cluster bootstrap.

    Args:
        trace_1, trace_2: routing of condition 1 (e.g. safe / with document)
            and condition 2 (unsafe / without document).
        measure: ``"selection"`` (top-k frequency) or ``"mass"`` (gate weight).
        length_matched: first truncate pair ``i`` to ``min(L₁ᵢ, L₂ᵢ)`` tokens.
        paired: resample example ``i`` of both traces together (needs equal
            example counts); otherwise resample each condition independently.
        n_boot: bootstrap resamples (0: no intervals).
        level: interval coverage.
        seed: int or ``torch.Generator``.
    """
    _check_compatible(trace_1, trace_2)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if length_matched:
        trace_1, trace_2 = length_match(trace_1, trace_2)
    if paired and trace_1.n_examples != trace_2.n_examples:
        raise ValueError(
            f"paired=True needs one example per pair in each trace, got {trace_1.n_examples} "
            f"and {trace_2.n_examples}; pass paired=False for independent samples"
        )
    s1, s2 = _sufficient(trace_1, measure), _sufficient(trace_2, measure)
    n1, n2 = trace_1.lengths.to(torch.float64), trace_2.lengths.to(torch.float64)
    p1, p2 = _rate(s1, n1), _rate(s2, n2)
    low = high = None
    if n_boot > 0:
        gen = (
            seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
        )
        # Resample counts per example, drawn in the same order as interp.stats.
        w1 = torch.empty(n_boot, trace_1.n_examples, dtype=torch.float64)
        w2 = torch.empty(n_boot, trace_2.n_examples, dtype=torch.float64)
        for b in range(n_boot):
            i1 = _draw(trace_1.n_examples, gen)
            i2 = i1 if paired else _draw(trace_2.n_examples, gen)
            w1[b] = torch.bincount(i1, minlength=trace_1.n_examples)
            w2[b] = torch.bincount(i2, minlength=trace_2.n_examples)
        boot = (w1 @ s1.flatten(1)) / (w1 @ n1)[:, None] - (w2 @ s2.flatten(1)) / (w2 @ n2)[:, None]
        alpha = (1 - level) / 2
        q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
        bounds = torch.nanquantile(boot, q, dim=0).view(2, *p1.shape)
        low, high = bounds[0], bounds[1]
    return RiskDifference(
        layers=trace_1.layers,
        measure=measure,
        p1=p1,
        p2=p2,
        rd=p1 - p2,
        low=low,
        high=high,
        level=level,
        n_examples=(trace_1.n_examples, trace_2.n_examples),
        n_tokens=(trace_1.n_tokens, trace_2.n_tokens),
        paired=paired,
    )


def expert_interval(
    trace_1: RoutingTrace,
    trace_2: RoutingTrace,
    layer: int,
    expert: int,
    *,
    measure: Measure = "selection",
    length_matched: bool = False,
    paired: bool = True,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | torch.Generator = 0,
) -> Interval:
    """The bootstrap interval of one (layer, expert)'s ``Δ`` via ``interp.stats``.

    The reference for ``risk_difference``'s vectorised bootstrap (same draws
    for the same seed).
    """
    _check_compatible(trace_1, trace_2)
    if length_matched:
        trace_1, trace_2 = length_match(trace_1, trace_2)
    r = trace_1.layer_index(layer)
    # Per example: (A_i, N_i) of this expert, as a [n, 2] sample.
    x1 = torch.stack([_sufficient(trace_1, measure)[:, r, expert], trace_1.lengths.double()], 1)
    x2 = torch.stack([_sufficient(trace_2, measure)[:, r, expert], trace_2.lengths.double()], 1)

    def statistic(a: Tensor, b: Tensor) -> float:
        return float(a[:, 0].sum() / a[:, 1].sum() - b[:, 0].sum() / b[:, 1].sum())

    boot = paired_bootstrap_ci if paired else bootstrap_ci
    return boot(statistic, x1, x2, n_boot=n_boot, level=level, seed=seed)

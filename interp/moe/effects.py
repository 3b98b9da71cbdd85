"""Steering experiments on experts: a risk difference summarised for a report, random control
sets for the experts switched off, and each steering × metric tested against its controls.

* ``rd_summary(rd, null, top)``: a ``RiskDifference`` (and the max-|Δ| null of
  ``max_abs_rd_test``) as report fields: Δ with its bounds, how many intervals exclude 0
  (uncorrected), the top experts of each sign.
* ``control_sets(rd, chosen, freq, n_random, rng, exclude_top)``: ``n_random`` random sets
  for the experts ``chosen`` (``frequency_matched_experts``: same layers, similar selection
  frequency, outside the top ``exclude_top`` by |Δ|), with how well they match.
* ``effects_vs_controls(baseline, steered, controls)``: per-item metrics of each steered
  condition against the baseline and against the mean of its random controls (paired
  bootstrap intervals, paired sign-flip test, rank among the controls), Holm and BH over the
  whole family of steering × metric tests.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.moe.controls import frequency_matched_experts
from interp.moe.stats import RiskDifference
from interp.stats import PermutationTest, adjust_pvalues, paired_bootstrap_ci, sign_flip_test

__all__ = ["ControlSets", "control_sets", "effects_vs_controls", "rd_summary"]

Expert = tuple[int, int]


def rd_summary(
    rd: RiskDifference, null: PermutationTest | None = None, top: int = 10
) -> dict[str, Any]:
    """``rd`` as report fields: measure, tokens per condition, layers, Δ and its bounds,
    ``n_intervals_excluding_0_uncorrected`` (``None`` without intervals), the ``top`` most
    positive and most negative experts, and with ``null`` the max-|Δ| test with the 95th
    percentile of its null distribution (``null_q95``)."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    excluding = None
    if rd.low is not None and rd.high is not None:
        excluding = int(((rd.low > 0) | (rd.high < 0)).sum())
    out: dict[str, Any] = {
        "measure": rd.measure,
        "n_tokens": rd.n_tokens,
        "layers": rd.layers,
        "rd": rd.rd,
        "low": rd.low,
        "high": rd.high,
        "n_intervals_excluding_0_uncorrected": excluding,
        "top_positive": rd.rank("positive", top=top),
        "top_negative": rd.rank("negative", top=top),
    }
    if null is not None:
        out["max_abs_rd_sign_flip"] = {**null.as_dict(), "null_q95": null.null.quantile(0.95)}
    return out


@dataclass(frozen=True)
class ControlSets:
    """Experts switched off and their random control sets (``control_sets``).

    Attributes:
        experts: the (layer, expert) pairs switched off.
        controls: one sorted list of (layer, expert) pairs per random set.
        freq_experts, freq_controls: mean selection frequency of the experts and of all
            control experts (pooled over the sets): how well the sets are matched.
    """

    experts: list[Expert]
    controls: list[list[Expert]]
    freq_experts: float
    freq_controls: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the number of distinct sets and of sets sharing an expert with
        ``experts``."""
        chosen = set(self.experts)
        return {
            "experts": self.experts,
            "random_controls": self.controls,
            "distinct_random_sets": len({tuple(c) for c in self.controls}),
            "controls_overlapping_targets": sum(bool(set(c) & chosen) for c in self.controls),
            "selection_freq_targets": self.freq_experts,
            "selection_freq_controls": self.freq_controls,
        }


def control_sets(
    rd: RiskDifference,
    chosen: Sequence[Expert],
    freq: Float[Tensor, "n_layers n_experts"],
    n_random: int,
    rng: random.Random,
    exclude_top: int,
) -> ControlSets:
    """``n_random`` calls of ``frequency_matched_experts`` for ``chosen`` (in this order, from
    ``rng``), excluding ``chosen`` and the ``exclude_top`` experts of largest |Δ| in ``rd``;
    ``freq`` holds the selection frequency of ``rd.layers``' experts."""
    if not chosen:
        raise ValueError("control_sets needs at least one chosen expert")
    if n_random < 1 or exclude_top < 0:
        raise ValueError(f"need n_random >= 1 and exclude_top >= 0, got {n_random}, {exclude_top}")
    layers = list(rd.layers)
    if tuple(freq.shape) != tuple(rd.rd.shape):
        raise ValueError(f"freq has shape {tuple(freq.shape)}, Δ {tuple(rd.rd.shape)}")
    chosen = list(chosen)
    excluded = {(x.layer, x.expert) for x in rd.rank("abs", top=exclude_top)} | set(chosen)
    sets = [frequency_matched_experts(chosen, freq, layers, excluded, rng) for _ in range(n_random)]

    def mean_freq(experts: list[Expert]) -> float:
        return float(sum(freq[layers.index(layer), e] for layer, e in experts) / len(experts))

    return ControlSets(chosen, sets, mean_freq(chosen), mean_freq([x for c in sets for x in c]))


def _mean_difference(x: Tensor, y: Tensor) -> float:
    return float((x - y).mean())


def effects_vs_controls(
    baseline: Mapping[str, Float[Tensor, " n"]],
    steered: Mapping[str, Mapping[str, Float[Tensor, " n"]]],
    controls: Mapping[str, Sequence[Mapping[str, Float[Tensor, " n"]]]],
    *,
    n_boot: int = 1000,
    n_perm: int = 9999,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Each steered condition × metric against the baseline and against its random controls.

    ``baseline[metric]`` and ``steered[name][metric]`` hold one value per item (the same
    items in every condition); ``controls[name]`` is one such dict per random control set.
    For condition ``i`` (in the order of ``steered``) and each metric of ``baseline``:

    * ``steered_minus_baseline``, ``steered_minus_controls``: mean paired difference with a
      percentile paired bootstrap interval (``seed``), the controls averaged per item;
    * ``control_effects``: each control set's mean difference from the baseline;
    * ``p_sign_flip``: two-sided paired sign-flip test of steered vs the controls' mean
      (``seed + i``);
    * ``p_rank_among_random``: ``(1 + #{controls with |effect| >= |steered effect|}) /
      (1 + n_controls)``;
    * ``p_holm`` / ``reject_holm`` and ``p_bh`` / ``reject_bh`` (α = 0.05): the sign-flip
      p-values adjusted over the whole family of conditions × metrics.

    Returns ``{name: {metric: fields}}``.
    """
    if set(controls) != set(steered):
        raise ValueError(f"controls for {sorted(controls)}, steered {sorted(steered)}")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    family, pvalues = [], []
    for i, name in enumerate(steered):
        if not controls[name]:
            raise ValueError(f"{name}: no control sets")
        for metric, base in baseline.items():
            st = steered[name][metric]
            ctrl = torch.stack([c[metric] for c in controls[name]])
            if st.shape != base.shape or ctrl.shape[1:] != base.shape:
                raise ValueError(f"{name} {metric}: items differ from the baseline's")
            mean_ctrl = ctrl.mean(0)
            ctrl_effects = (ctrl - base).mean(1)
            test = sign_flip_test(st, mean_ctrl, n_perm=n_perm, seed=seed + i)
            vs_base, vs_ctrl = (
                paired_bootstrap_ci(_mean_difference, st, ref, n_boot=n_boot, seed=seed)
                for ref in (base, mean_ctrl)
            )
            beyond = (ctrl_effects.abs() >= abs(vs_base.estimate) - 1e-12).sum()
            out.setdefault(name, {})[metric] = {
                "steered_minus_baseline": vs_base.as_dict(),
                "steered_minus_controls": vs_ctrl.as_dict(),
                "control_effects": ctrl_effects,
                "p_sign_flip": test.p_value,
                "p_rank_among_random": float((1 + beyond) / (len(ctrl) + 1)),
            }
            family.append((name, metric))
            pvalues.append(test.p_value)
    for method in ("holm", "bh"):
        adj = adjust_pvalues(pvalues, method)
        for (name, metric), p, rej in zip(family, adj.p_adjusted, adj.reject, strict=True):
            out[name][metric][f"p_{method}"] = float(p)
            out[name][metric][f"reject_{method}"] = bool(rej)
    return out

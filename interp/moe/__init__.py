"""Mixture-of-experts routing: trace, statistics, steering (SteerMoE) and ablation.

* ``trace(model, batch, mask)`` -> ``RoutingTrace``: top-k experts, weights
  and router logits of every MoE layer on the masked tokens, stored compactly
  with per-example token counts; ``concat(traces)`` joins traces of several batches.
* ``risk_difference(trace_1, trace_2)`` -> ``RiskDifference``: SteerMoE's
  ``Δ = p₁ − p₂`` of top-k selection frequency (or gate mass) for every
  (layer, expert), length matching, bootstrap intervals over examples,
  ranking across all (layer, expert) pairs.
* ``steer(model, deactivate=[(layer, expert)], activate=[...], soft=None)``:
  edit router logits so the family's own rule re-selects the experts.
* ``ablate_experts(model, [(layer, expert)], scale=0.0)``: scale one expert's
  contribution inside the fused expert tensors, routing untouched.
* Controls (``interp.moe.controls``): ``trace_batches``, ``max_abs_rd_test`` (sign-flip
  null of max |Δ|), ``top_experts``, ``frequency_matched_experts`` (random sets).
* Steering experiments (``interp.moe.effects``): ``rd_summary`` (report fields of a Δ),
  ``control_sets`` (random control sets with their match), ``effects_vs_controls`` (each
  steering × metric vs baseline and controls, Holm / BH over the family).

The selection rules themselves live in ``interp.routing``.
"""

from __future__ import annotations

from interp.moe.controls import (
    frequency_matched_experts,
    max_abs_rd_test,
    top_experts,
    trace_batches,
)
from interp.moe.effects import ControlSets, control_sets, effects_vs_controls, rd_summary
from interp.moe.stats import (
    ExpertScore,
    RiskDifference,
    expert_interval,
    gate_mass,
    length_match,
    rank_experts,
    risk_difference,
    selection_frequency,
)
from interp.moe.steer import ablate_experts, steer
from interp.moe.trace import RoutingTrace, concat, trace

__all__ = [
    "ControlSets",
    "ExpertScore",
    "RiskDifference",
    "RoutingTrace",
    "ablate_experts",
    "concat",
    "control_sets",
    "effects_vs_controls",
    "expert_interval",
    "frequency_matched_experts",
    "gate_mass",
    "length_match",
    "max_abs_rd_test",
    "rank_experts",
    "rd_summary",
    "risk_difference",
    "selection_frequency",
    "steer",
    "top_experts",
    "trace",
    "trace_batches",
]

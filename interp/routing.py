"""Top-k expert selection of every supported MoE family, re-implemented from router logits.

Design
------
In ``transformers`` 5.x every MoE router (``model.model.layers[l].mlp.gate``)
returns ``(router_logits, topk_weights, topk_indices)`` and the MoE block uses
only the last two. ``router_logits`` is the raw pre-selection ``W_r h`` for
every family (DeepSeek computes it in float32). To let a hook on
``blocks.{l}.mlp.hook_router_logits`` *really* change which experts run (unlike
TransformerBridge, where editing the logits leaves top-k untouched), the HF
adapter recomputes ``(weights, indices)`` from the edited logits with
:func:`select_experts`. For unedited logits it is bit-identical to the
router's own output (tested per family with ``torch.equal``), because it runs
the same torch ops in the same order as the installed modeling files:

========================  ===================================================
family                    rule (``transformers/models/<family>/modeling_*.py``)
========================  ===================================================
mixtral                   softmax(logits.float()) → top-k → renormalise;
                          weights stay float32 (``MixtralTopKRouter``)
qwen2_moe, qwen3_moe,     softmax(logits, dtype=float32) → top-k →
olmoe                     renormalise iff ``norm_topk_prob`` → cast to the
                          logits' dtype (``*TopKRouter``)
deepseek_v2               softmax → ``greedy`` top-k, or ``group_limited_greedy``
                          (groups ranked by their max score, non-selected
                          groups' scores set to 0) → × ``routed_scaling_factor``;
                          ``norm_topk_prob`` is ignored by the HF port
                          (``DeepseekV2TopkRouter``)
deepseek_v3               sigmoid; choice scores + ``e_score_correction_bias``;
                          groups ranked by the sum of their top-2 scores,
                          others set to −inf; weights are the *unbiased*
                          sigmoid scores, renormalised iff ``norm_topk_prob``
                          (+1e-20), × ``routed_scaling_factor``
                          (``DeepseekV3TopkRouter``, "noaux_tc")
moefied                   ``interp.moefy`` (a dense MLP split into routed
                          groups of units): top-k on the raw logits
                          (``scoring="identity"``), weight 1 for every
                          selected group, so k = E reproduces the dense MLP
========================  ===================================================

Editing the logits (:func:`edit_logits`)
----------------------------------------
Hard edits write *sentinels* that :func:`select_experts` understands:

- ``-inf`` = deactivated: the expert is never selected (provided at least
  ``top_k`` experts remain) and gets zero probability mass. For softmax
  families the remaining experts' probabilities renormalise over the experts
  that are left (the model as if the expert had been removed).
- ``+inf`` = activated: the expert is always selected. A literal ``+inf``
  would make softmax weights NaN (and for top-k-then-renormalise families
  give the forced expert all the mass), so the *selection* treats it as
  forced while its *weight* is computed as if its logit equalled the largest
  unedited logit of that token. This is SteerMoE's activation rule
  ``s_e ← s_max + ε`` (Fayyaz et al. 2025, "Steering MoE LLMs via Expert
  (De)Activation", arXiv:2509.09660, §3) with ε → 0, so weights stay finite
  and on the scale the router itself produces.

Rows that contain a sentinel go through a lexicographic selection (forced ≻
allowed-group ≻ other-group ≻ deactivated, then by score); rows without one
go through the exact HF code path, so an edit of some tokens never perturbs
the others. In DeepSeek's group-limited greedy, when a deactivation leaves the
selected groups with fewer than ``top_k`` experts the remaining slots are
filled from other groups with weight 0 — exactly what HF does with its
zero-masked scores — so the deactivated expert is still never chosen.

Soft edits (``soft_scale=λ``) add ``λ·std(logits)`` (per token, over experts)
to activated experts and subtract it from deactivated ones; the result is an
ordinary finite logit tensor that goes through the family's normal rule.

This module is layer 1: pure functions over tensors plus a config reader. It
never touches modules; for DeepSeek-V3 the caller passes the router buffer
``e_score_correction_bias`` as ``score_bias``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["ROUTING_FAMILIES", "RoutingRule", "edit_logits", "select_experts"]

Scoring = Literal["softmax", "sigmoid", "identity"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]

ROUTING_FAMILIES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "moefied",
)

# Weight tiers of the edited-row selection (higher is chosen first).
_FORCED, _IN_GROUP, _OUT_GROUP, _DEACTIVATED = 3, 2, 1, 0


@dataclass(frozen=True)
class RoutingRule:
    """How one MoE family turns router logits into ``top_k`` expert weights and indices.

    Attributes:
        family: HF ``model_type`` (one of ``ROUTING_FAMILIES``).
        n_experts: routed experts per MoE layer (``E``).
        top_k: experts selected per token (``num_experts_per_tok``).
        scoring: ``"softmax"`` or ``"sigmoid"`` applied to the logits, or
            ``"identity"`` (``moefied``: select on the raw logits, weight 1).
        norm_topk_prob: renormalise the selected weights to sum to 1.
        topk_method: ``"greedy"``, ``"group_limited_greedy"`` (DeepSeek-V2)
            or ``"noaux_tc"`` (DeepSeek-V3's biased group top-2 sum).
        n_group: expert groups (1 = no grouping).
        topk_group: groups a token may pick experts from.
        routed_scaling_factor: multiplier on the final routed weights.
        weights_dtype: ``"float32"`` (Mixtral keeps fp32 weights) or
            ``"logits"`` (cast back to the logits' dtype, Qwen/OLMoE).
        moe_layers: indices of decoder layers whose MLP is a routed MoE block.
        shared_experts: number of always-on shared experts (not routed).
    """

    family: str
    n_experts: int
    top_k: int
    scoring: Scoring = "softmax"
    norm_topk_prob: bool = False
    topk_method: TopkMethod = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    weights_dtype: Literal["float32", "logits"] = "logits"
    moe_layers: tuple[int, ...] = field(default=())
    shared_experts: int = 0

    def __post_init__(self) -> None:
        if self.family not in ROUTING_FAMILIES:
            raise ValueError(
                f"unknown MoE family {self.family!r}; supported: {', '.join(ROUTING_FAMILIES)}"
            )
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be ≥ 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.scoring not in ("softmax", "sigmoid", "identity"):
            raise ValueError(
                f"scoring must be 'softmax', 'sigmoid' or 'identity', got {self.scoring!r}"
            )
        if (self.scoring == "identity") != (self.family == "moefied"):
            raise ValueError("scoring='identity' is the rule of family 'moefied' (and only its)")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(
                "topk_method must be 'greedy', 'group_limited_greedy' or 'noaux_tc', "
                f"got {self.topk_method!r}"
            )
        if self.weights_dtype not in ("float32", "logits"):
            raise ValueError(
                f"weights_dtype must be 'float32' or 'logits', got {self.weights_dtype!r}"
            )
        if self.topk_method != "greedy":
            if self.n_group < 1 or self.n_experts % self.n_group:
                raise ValueError(
                    f"n_group={self.n_group} must divide n_experts={self.n_experts} "
                    f"for topk_method={self.topk_method!r}"
                )
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(
                    f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}"
                )
            if self.topk_group * (self.n_experts // self.n_group) < self.top_k:
                raise ValueError(
                    f"topk_group={self.topk_group} groups of {self.n_experts // self.n_group} "
                    f"experts cannot hold top_k={self.top_k} experts"
                )
            if self.topk_method == "noaux_tc" and self.n_experts // self.n_group < 2:
                raise ValueError(
                    "noaux_tc ranks groups by their top-2 scores: groups need ≥ 2 experts"
                )
        if any(layer < 0 for layer in self.moe_layers):
            raise ValueError(f"moe_layers must be non-negative, got {self.moe_layers}")

    @property
    def grouped(self) -> bool:
        return self.topk_method in ("group_limited_greedy", "noaux_tc")

    @classmethod
    def from_config(cls, config: Any) -> RoutingRule:
        """Read the routing rule of an HF MoE config (``model.config``)."""
        moefy = getattr(config, "moefy", None)
        if moefy:  # a dense model converted by interp.moefy (its model_type stays dense)
            return cls(
                family="moefied",
                n_experts=int(config.num_experts),
                top_k=int(config.num_experts_per_tok),
                scoring="identity",
                moe_layers=tuple(int(layer) for layer in moefy["layers"]),
                shared_experts=int(bool(moefy.get("n_shared", 0))),
            )
        family = getattr(config, "model_type", None)
        if family not in ROUTING_FAMILIES or family == "moefied":
            raise ValueError(
                f"config model_type {family!r} is not a supported MoE family; "
                f"supported: {', '.join(ROUTING_FAMILIES)}"
            )
        n_layers = int(config.num_hidden_layers)
        k = int(config.num_experts_per_tok)
        if family == "mixtral":
            # MixtralTopKRouter always renormalises and keeps fp32 weights.
            return cls(
                family=family,
                n_experts=int(config.num_local_experts),
                top_k=k,
                norm_topk_prob=True,
                weights_dtype="float32",
                moe_layers=tuple(range(n_layers)),
            )
        if family in ("qwen2_moe", "qwen3_moe"):
            n_experts = int(config.num_experts)
            step = int(getattr(config, "decoder_sparse_step", 1) or 1)
            mlp_only = set(getattr(config, "mlp_only_layers", None) or [])
            # Same condition as Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer.__init__.
            layers = tuple(
                layer
                for layer in range(n_layers)
                if layer not in mlp_only and n_experts > 0 and (layer + 1) % step == 0
            )
            shared = (
                1
                if family == "qwen2_moe" and getattr(config, "shared_expert_intermediate_size", 0)
                else 0
            )
            return cls(
                family=family,
                n_experts=n_experts,
                top_k=k,
                norm_topk_prob=bool(config.norm_topk_prob),
                moe_layers=layers,
                shared_experts=shared,
            )
        if family == "olmoe":
            return cls(
                family=family,
                n_experts=int(config.num_experts),
                top_k=k,
                norm_topk_prob=bool(config.norm_topk_prob),
                moe_layers=tuple(range(n_layers)),
            )
        first_dense = int(getattr(config, "first_k_dense_replace", 0) or 0)
        layers = tuple(range(first_dense, n_layers))
        shared = int(getattr(config, "n_shared_experts", 0) or 0)
        if family == "deepseek_v2":
            method = config.topk_method
            return cls(
                family=family,
                n_experts=int(config.n_routed_experts),
                top_k=k,
                # DeepseekV2TopkRouter never renormalises (norm_topk_prob is unused).
                norm_topk_prob=False,
                topk_method=method,
                n_group=int(config.n_group or 1),
                topk_group=int(config.topk_group or 1),
                routed_scaling_factor=float(config.routed_scaling_factor),
                weights_dtype="float32",
                moe_layers=layers,
                shared_experts=shared,
            )
        # deepseek_v3
        return cls(
            family=family,
            n_experts=int(config.n_routed_experts),
            top_k=k,
            scoring="sigmoid",
            norm_topk_prob=bool(config.norm_topk_prob),
            topk_method="noaux_tc",
            n_group=int(config.n_group),
            topk_group=int(config.topk_group),
            routed_scaling_factor=float(config.routed_scaling_factor),
            weights_dtype="float32",
            moe_layers=layers,
            shared_experts=shared,
        )


# ---------------------------------------------------------------------------
# Selection


def select_experts(
    logits: Float[Tensor, "*batch n_experts"],
    rule: RoutingRule,
    score_bias: Float[Tensor, " n_experts"] | None = None,
) -> tuple[Float[Tensor, "*batch top_k"], Int[Tensor, "*batch top_k"]]:
    """Top-k ``(weights, indices)`` of ``rule``'s family from router ``logits``.

    Bit-identical to the HF router for finite logits. ``-inf`` / ``+inf``
    entries are the deactivate / activate sentinels written by
    :func:`edit_logits` (see the module docstring). ``score_bias`` is
    DeepSeek-V3's ``e_score_correction_bias`` (zeros if omitted).
    """
    if logits.shape[-1] != rule.n_experts:
        raise ValueError(
            f"logits have {logits.shape[-1]} experts on the last dim, rule {rule.family!r} expects {rule.n_experts}"
        )
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, rule.n_experts)
    if rule.scoring == "sigmoid":
        bias = (
            torch.zeros(rule.n_experts, dtype=torch.float32, device=flat.device)
            if score_bias is None
            else score_bias.to(device=flat.device)
        )
    else:
        if score_bias is not None:
            raise ValueError(f"score_bias is only used by sigmoid routers, not {rule.family!r}")
        bias = None
    edited_rows = torch.isinf(flat).any(dim=-1)
    if not bool(edited_rows.any()):
        weights, indices = _select_hf(flat, rule, bias)
    else:
        # Exact HF path for untouched rows (inputs of edited rows neutralised so
        # no NaN is produced), sentinel-aware path for edited rows.
        weights, indices = _select_hf(flat.masked_fill(edited_rows[:, None], 0.0), rule, bias)
        rows = edited_rows.nonzero().squeeze(-1)
        w_edit, i_edit = _select_edited(flat[rows], rule, bias)
        weights = weights.index_copy(0, rows, w_edit.to(weights.dtype))
        indices = indices.index_copy(0, rows, i_edit)
    return weights.reshape(*lead, rule.top_k), indices.reshape(*lead, rule.top_k)


def _select_hf(logits: Tensor, rule: RoutingRule, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """The installed HF routers' selection, op for op (see the module table)."""
    k = rule.top_k
    if rule.family == "moefied":
        # interp.moefy.MoefiedRouter: every selected group enters with weight 1.
        idx = torch.topk(logits, k, dim=-1).indices
        return torch.ones(idx.shape, dtype=logits.dtype, device=logits.device), idx
    if rule.family == "mixtral":
        # MixtralTopKRouter.forward
        probs = torch.nn.functional.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, k, dim=-1)
        top /= top.sum(dim=-1, keepdim=True)
        return top, idx
    if rule.family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        # Qwen2MoeTopKRouter / Qwen3MoeTopKRouter / OlmoeTopKRouter.forward
        probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
        top, idx = torch.topk(probs, k, dim=-1)
        if rule.norm_topk_prob:
            top /= top.sum(dim=-1, keepdim=True)
        return top.to(logits.dtype), idx
    E, G = rule.n_experts, rule.n_group
    if rule.family == "deepseek_v2":
        # DeepseekV2TopkRouter.forward
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if rule.topk_method == "greedy":
            top, idx = torch.topk(scores, k=k, dim=-1, sorted=False)
        else:
            group_scores = scores.view(-1, G, E // G).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=rule.topk_group, dim=-1, sorted=False)[1]
            score_mask = _expand_group_mask(group_scores, group_idx, E, G)
            scores = scores.masked_fill(~score_mask, 0.0)
            top, idx = torch.topk(scores, k=k, dim=-1, sorted=False)
        return top * rule.routed_scaling_factor, idx
    # deepseek_v3: DeepseekV3TopkRouter.forward
    assert bias is not None
    scores = logits.sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=rule.topk_group, dim=-1, sorted=False)[1]
    score_mask = _expand_group_mask(group_scores, group_idx, E, G)
    choice = choice.masked_fill(~score_mask, float("-inf"))
    idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    top = scores.gather(1, idx)
    if rule.norm_topk_prob:
        top /= top.sum(dim=-1, keepdim=True) + 1e-20
    return top * rule.routed_scaling_factor, idx


def _expand_group_mask(group_scores: Tensor, group_idx: Tensor, E: int, G: int) -> Tensor:
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E).bool()


def _lexicographic_topk(tier: Tensor, score: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest ``(tier, score)`` pairs per row (two stable sorts)."""
    by_score = torch.sort(score, dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(-1, by_score), dim=-1, descending=True, stable=True).indices
    return by_score.gather(-1, by_tier)[..., :k]


def _select_edited(logits: Tensor, rule: RoutingRule, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Selection for rows that carry ±inf sentinels (see the module docstring)."""
    k, E = rule.top_k, rule.n_experts
    forced, deact = torch.isposinf(logits), torch.isneginf(logits)
    n_forced, n_left = forced.sum(-1), (~deact).sum(-1)
    if bool((n_forced > k).any()):
        raise ValueError(f"cannot activate {int(n_forced.max())} experts per token with top_k={k}")
    if bool((n_left < k).any()):
        raise ValueError(
            f"deactivating {E - int(n_left.min())} of {E} experts leaves fewer than top_k={k}"
        )
    finite = ~(forced | deact)
    # SteerMoE activation: the forced logit takes the token's largest unedited logit.
    row_max = logits.masked_fill(~finite, float("-inf")).amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    z = torch.where(forced, row_max.expand_as(logits), logits)

    tier = torch.full(logits.shape, _IN_GROUP, dtype=torch.int8, device=logits.device)
    tier = tier.masked_fill(forced, _FORCED).masked_fill(deact, _DEACTIVATED)

    if rule.scoring == "softmax":
        scores = torch.nn.functional.softmax(z.float(), dim=-1)
        choice = scores
    elif rule.scoring == "identity":
        scores = choice = z.float()
    else:
        assert bias is not None
        scores = z.float().sigmoid()
        choice = scores + bias
    if rule.grouped:
        G = rule.n_group
        per = choice.masked_fill(deact, float("-inf")).view(-1, G, E // G)
        if rule.topk_method == "group_limited_greedy":
            group_scores = per.max(dim=-1).values
        else:
            group_scores = per.topk(2, dim=-1)[0].sum(dim=-1)
        group_forced = forced.view(-1, G, E // G).any(dim=-1).to(torch.int8)
        group_idx = _lexicographic_topk(group_forced, group_scores, rule.topk_group)
        in_group = _expand_group_mask(group_scores, group_idx, E, G)
        tier = torch.where(~in_group & (tier == _IN_GROUP), _OUT_GROUP, tier).to(torch.int8)
    idx = _lexicographic_topk(tier, choice, k)

    top = scores.gather(1, idx)
    if rule.topk_method == "group_limited_greedy":
        # HF zeroes the scores of experts outside the selected groups.
        top = top.masked_fill(tier.gather(1, idx) == _OUT_GROUP, 0.0)
    if rule.norm_topk_prob:
        eps = 1e-20 if rule.family == "deepseek_v3" else 0.0
        top = top / (top.sum(dim=-1, keepdim=True) + eps)
    if rule.family.startswith("deepseek"):
        top = top * rule.routed_scaling_factor
    if rule.family == "moefied":
        top = torch.ones_like(top)
    if rule.weights_dtype == "logits":
        top = top.to(logits.dtype)
    return top, idx


# ---------------------------------------------------------------------------
# Editing


def _expert_ids(ids: Iterable[int], n_experts: int, what: str) -> list[int]:
    out = sorted({int(i) for i in ids})
    bad = [i for i in out if not 0 <= i < n_experts]
    if bad:
        raise ValueError(f"{what} expert ids {bad} out of range [0, {n_experts})")
    return out


def edit_logits(
    logits: Float[Tensor, "*batch n_experts"],
    deactivate: Iterable[int] = (),
    activate: Iterable[int] = (),
    soft_scale: float | None = None,
) -> Float[Tensor, "*batch n_experts"]:
    """Router logits with experts forced out (``deactivate``) or in (``activate``).

    Hard mode (``soft_scale=None``) writes the ``-inf`` / ``+inf`` sentinels
    that :func:`select_experts` turns into "never" / "always selected" with
    finite weights (SteerMoE's rule; see the module docstring). Soft mode adds
    ``soft_scale · std`` (per token, over experts) to activated experts and
    subtracts it from deactivated ones, leaving the family's own rule to
    decide. With both sets empty the input is returned unchanged.
    """
    n = logits.shape[-1]
    off = _expert_ids(deactivate, n, "deactivate")
    on = _expert_ids(activate, n, "activate")
    both = sorted(set(off) & set(on))
    if both:
        raise ValueError(f"experts {both} are both activated and deactivated")
    if not off and not on:
        return logits
    out = logits.clone()
    if soft_scale is None:
        out[..., off] = float("-inf")
        out[..., on] = float("inf")
        return out
    if soft_scale < 0:
        raise ValueError(f"soft_scale must be ≥ 0, got {soft_scale}")
    std = logits.float().std(dim=-1, keepdim=True, correction=0)
    shift = (soft_scale * std).to(logits.dtype)
    out[..., on] = out[..., on] + shift
    out[..., off] = out[..., off] - shift
    return out

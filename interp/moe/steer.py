"""Steering MoE routing: expert (de)activation through the router, and per-expert ablation.

Design
------
``steer`` follows SteerMoE (Fayyaz et al. 2025, "Steering MoE LLMs via
Expert (De)Activation", arXiv:2509.09660): it rewrites the *router logits* of
chosen (layer, expert) pairs and lets the model's own selection rule pick the
top-k from the edited logits. It is a thin wrapper: one
``blocks.{l}.mlp.hook_router_logits`` replacement per steered layer, built
with ``interp.routing.edit_logits``; the HF adapter re-runs
``interp.routing.select_experts`` on a replaced logit tensor, so top-k really
changes (for every family, including shared-expert Qwen2-MoE / DeepSeek and
DeepSeek's group-limited greedy). Hard mode makes a deactivated expert never
selected and an activated one always selected, with finite weights (see
``interp.routing``); ``soft=λ`` shifts their logits by ``±λ·std`` instead.
Shared experts are not routed and are never affected. With nothing to steer
no hook is registered, so the model is untouched bit for bit.

``ablate_experts`` is the complementary intervention *inside* the fused expert
tensors: routing is left exactly as it is and only the gate weight of the
chosen experts is scaled (``scale=0`` zeroes their contribution, other
experts and their weights are untouched, nothing is renormalised). It reads
``hook_expert_indices`` and replaces ``hook_expert_weights`` of the same
router call (hooks on one router run in registration order).

Order of composition: hooks on one router run in the order they were
registered, so enter ``steer`` *before* (outside) ``ablate_experts`` or
``interp.moe.trace``: a later logits replacement re-selects and overwrites the
weights an earlier ablation hook had edited.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor

from interp.routing import edit_logits

__all__ = ["ablate_experts", "steer"]

Expert = tuple[int, int]


def _by_layer(model: Any, experts: Iterable[Expert], what: str) -> dict[int, list[int]]:
    moe_layers = tuple(model.cfg.moe_layers)
    n_experts = int(model.cfg.n_experts)
    out: dict[int, set[int]] = {}
    for item in experts:
        try:
            layer, expert = (int(v) for v in item)
        except (TypeError, ValueError):
            raise TypeError(f"{what} takes (layer, expert) pairs, got {item!r}") from None
        if layer not in moe_layers:
            raise ValueError(f"{what}: layer {layer} is not a MoE layer; MoE layers: {moe_layers}")
        if not 0 <= expert < n_experts:
            raise ValueError(
                f"{what}: expert {expert} out of range [0, {n_experts}) at layer {layer}"
            )
        out.setdefault(layer, set()).add(expert)
    return {layer: sorted(ids) for layer, ids in out.items()}


def _edit_hook(
    logits: Tensor, hook: Any, *, off: list[int], on: list[int], soft: float | None
) -> Tensor:
    return edit_logits(logits, deactivate=off, activate=on, soft_scale=soft)


@contextlib.contextmanager
def steer(
    model: Any,
    deactivate: Iterable[Expert] = (),
    activate: Iterable[Expert] = (),
    soft: float | None = None,
) -> Iterator[Any]:
    """Deactivate / activate (layer, expert) pairs through the router for the block.

    Args:
        model: a MoE ``HookedModel``.
        deactivate: (layer, expert) pairs that must never be selected.
        activate: (layer, expert) pairs that must always be selected.
        soft: ``None`` for hard (de)activation, or λ ≥ 0 to shift the logits of
            activated / deactivated experts by ``+λ·std`` / ``−λ·std`` (per
            token, over experts) and leave selection to the family's rule.

    Yields the model. Raises ``ValueError`` if a pair is not a routed expert,
    is both activated and deactivated, or (hard mode) a layer would have more
    than ``top_k`` forced experts or fewer than ``top_k`` allowed ones.
    """
    off = _by_layer(model, deactivate, "deactivate")
    on = _by_layer(model, activate, "activate")
    k, n_experts = int(model.cfg.experts_per_token), int(model.cfg.n_experts)
    for layer in sorted(set(off) | set(on)):
        both = sorted(set(off.get(layer, ())) & set(on.get(layer, ())))
        if both:
            raise ValueError(f"layer {layer}: experts {both} are both activated and deactivated")
        if soft is None and len(on.get(layer, ())) > k:
            raise ValueError(
                f"layer {layer}: cannot activate {len(on[layer])} experts with top_k={k}"
            )
        if soft is None and n_experts - len(off.get(layer, ())) < k:
            raise ValueError(
                f"layer {layer}: deactivating {len(off[layer])} of {n_experts} experts "
                f"leaves fewer than top_k={k}"
            )
    if soft is not None and soft < 0:
        raise ValueError(f"soft must be ≥ 0, got {soft}")
    fwd = [
        (
            f"blocks.{layer}.mlp.hook_router_logits",
            partial(_edit_hook, off=off.get(layer, []), on=on.get(layer, []), soft=soft),
        )
        for layer in sorted(set(off) | set(on))
    ]
    if not fwd:
        yield model
        return
    with model.hooks(fwd=fwd):
        yield model


@contextlib.contextmanager
def ablate_experts(model: Any, experts: Iterable[Expert], scale: float = 0.0) -> Iterator[Any]:
    """Scale the contribution of (layer, expert) pairs without changing routing.

    Wherever a listed expert is in a token's top-k its gate weight is
    multiplied by ``scale`` (0 removes its output from the fused expert sum);
    the other selected experts keep their weights bit for bit. Yields the model.
    """
    by_layer = _by_layer(model, experts, "ablate_experts")
    if not by_layer:
        yield model
        return
    stash: dict[int, Tensor] = {}

    def keep_indices(indices: Tensor, hook: Any) -> None:
        stash[hook.layer()] = indices

    def scale_weights(weights: Tensor, hook: Any, *, ids: Tensor) -> Tensor:
        indices = stash.pop(hook.layer())
        hit = torch.isin(indices, ids.to(indices.device))
        return torch.where(hit, weights * scale, weights)

    fwd: list[tuple[str, Any]] = [
        (f"blocks.{layer}.mlp.hook_expert_indices", keep_indices) for layer in by_layer
    ]
    fwd += [
        (
            f"blocks.{layer}.mlp.hook_expert_weights",
            partial(scale_weights, ids=torch.tensor(ids)),
        )
        for layer, ids in by_layer.items()
    ]
    try:
        with model.hooks(fwd=fwd):
            yield model
    finally:
        stash.clear()

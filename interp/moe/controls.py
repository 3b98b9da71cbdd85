"""Controls for expert-level claims: routing traced over many conversations, a sign-flip null
of max |Δ|, the top experts of one sign, and random expert sets matched on selection frequency.

* ``trace_batches(model, conversations, batch_size)``: ``trace`` on the assistant tokens, batch
  by batch, joined with ``concat``.
* ``max_abs_rd_test(trace_1, trace_2, measure)``: is the largest |Δ| over all (layer, expert)
  larger than under exchangeable conditions? A sign −1 swaps pair i's conditions (paired
  traces: the same prompts in two conditions); the statistic is SteerMoE's pooled Δ.
* ``top_experts(rd, sign, n, max_per_layer)``: the experts to switch off for one direction.
* ``frequency_matched_experts(chosen, freq, layers, excluded, rng)``: a random control set,
  one expert per chosen one, in the same layer, of similar selection frequency.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from interp.moe.stats import RiskDifference
from interp.moe.trace import RoutingTrace, concat, trace
from interp.stats import PermutationTest, sign_flip_test

__all__ = ["frequency_matched_experts", "max_abs_rd_test", "top_experts", "trace_batches"]

Expert = tuple[int, int]


def trace_batches(
    model: Any,
    conversations: Sequence[Any],
    batch_size: int,
    mask: str = "assistant",
    **trace_kwargs: Any,
) -> RoutingTrace:
    """Routing on the ``mask`` tokens of chat ``conversations`` (``chat.encode``), in batches of
    ``batch_size``; ``trace_kwargs`` go to ``trace`` (e.g. ``logits=False, logits_to_keep=1``
    when only the routing is needed: the vocabulary projection is skipped)."""
    from interp.chat import encode

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = [
        encode(model.tokenizer, list(conversations[i : i + batch_size]), device=model.device)
        for i in range(0, len(conversations), batch_size)
    ]
    return concat([trace(model, b, mask, **trace_kwargs) for b in batches])


def max_abs_rd_test(
    trace_1: RoutingTrace,
    trace_2: RoutingTrace,
    measure: Literal["selection", "mass"] = "selection",
    n_perm: int = 2000,
    seed: int = 0,
) -> PermutationTest:
    """Sign-flip null of max |Δ| over all (layer, expert) for paired traces (example i of
    ``trace_1`` and of ``trace_2`` are one pair): a sign −1 swaps pair i's conditions, and Δ
    is recomputed pooled over tokens (selection frequency or gate mass per token). One-sided
    (``greater``); ``statistic`` is the observed max |Δ|."""
    if trace_1.n_examples != trace_2.n_examples:
        raise ValueError(
            f"paired traces need as many examples: {trace_1.n_examples} vs {trace_2.n_examples}"
        )
    s1, s2 = (t.counts() if measure == "selection" else t.mass() for t in (trace_1, trace_2))
    n1, n2 = trace_1.lengths.double(), trace_2.lengths.double()

    def max_abs(signs: Tensor) -> float:
        keep = signs > 0
        k3 = keep[:, None, None]
        a = torch.where(k3, s1, s2).sum(0) / torch.where(keep, n1, n2).sum()
        b = torch.where(k3, s2, s1).sum(0) / torch.where(keep, n2, n1).sum()
        return float((a - b).abs().max())

    ones = torch.ones(trace_1.n_examples, dtype=torch.float64)  # the statistic reads the signs
    return sign_flip_test(ones, statistic=max_abs, n_perm=n_perm, alternative="greater", seed=seed)


def top_experts(
    rd: RiskDifference,
    sign: Literal["positive", "negative"],
    n: int,
    max_per_layer: int,
) -> list[Expert]:
    """The ``n`` most positive / negative Δ (strictly of that sign; fewer if there are not
    enough), at most ``max_per_layer`` per layer (e.g. ``n_experts - top_k``, so that a layer
    keeps enough experts to route to)."""
    picked: list[Expert] = []
    for x in rd.rank(sign):
        if len(picked) == n or (x.rd <= 0 if sign == "positive" else x.rd >= 0):
            break
        if sum(layer == x.layer for layer, _ in picked) < max_per_layer:
            picked.append((x.layer, x.expert))
    return picked


def frequency_matched_experts(
    chosen: Sequence[Expert],
    freq: Float[Tensor, "n_layers n_experts"],
    layers: Sequence[int],
    excluded: set[Expert],
    rng: random.Random,
) -> list[Expert]:
    """One random expert per chosen one, in its layer, drawn from the nearer half (in selection
    frequency ``freq[layers.index(layer), expert]``) of the experts outside ``excluded``; falls
    back to the experts not chosen, then to any expert not yet taken, when a layer has none
    left. Sorted (layer, expert) pairs."""
    out: list[Expert] = []
    layers = list(layers)
    for layer, e in chosen:
        r, E = layers.index(layer), freq.shape[1]
        free = [c for c in range(E) if (layer, c) not in out]
        pool = (
            [c for c in free if (layer, c) not in excluded]
            or [c for c in free if (layer, c) not in chosen]
            or free
        )
        pool.sort(key=lambda c: (abs(float(freq[r, c] - freq[r, e])), c))
        out.append((layer, rng.choice(pool[: max(1, (len(pool) + 1) // 2)])))
    return sorted(out)

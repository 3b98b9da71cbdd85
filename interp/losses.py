"""Training losses over logits: KL span alignment and masked SFT cross-entropy.

Design
------
``kl_span_alignment`` implements the objective of study 000 (top-down
alignment of reasoning to the answer): for each example, the next-token
distributions at the positions of a span ``s`` (e.g. a biased reasoning
sentence) and of a span ``o`` (the model's own, safe final answer) are each
averaged into one distribution,

    P_s = mean_{i in s} softmax(logits_i / T),   P_o likewise,

and the loss is ``D_KL(P_s || P_o)`` (``direction="forward"``) or
``D_KL(P_o || P_s)`` (``"reverse"``). ``o`` is the anchor: its side is
detached by default, so gradients only move the ``s`` distributions toward
the answer's and never the answer toward the reasoning.

Aggregation is a *mean of probabilities* (a mixture), not a mean of logits:
the study sums ``P(t_i | ·)`` over the span, and normalizing that sum is the
mean. It is computed in log space as ``logsumexp_i log p_i - log |span|`` so
it is exactly normalized and never underflows; log-probabilities are clamped
at ``log(finfo.tiny)`` so ``-inf`` logits (masked vocabulary entries) give a
large finite KL rather than ``nan``.

Spans are ``[batch, pos]`` boolean masks or ``[batch, 2]`` ``(start, end)``
index pairs (``end`` exclusive). A span selects *logit positions*: position
``p`` holds the distribution over token ``p + 1``. To compare the
distributions that *generated* a span's tokens, pass
``predicting_positions(mask)`` (the mask shifted left by one);
``interp.train.KLSpanLoss`` does this by default.

Everything is batched: no Python loop over examples.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "Span",
    "kl_span_alignment",
    "predicting_positions",
    "sft_loss",
    "sft_loss_per_example",
    "span_log_distribution",
    "span_mask",
]

Span = Bool[Tensor, "batch pos"] | Int[Tensor, "batch 2"]
Direction = Literal["forward", "reverse"]
Reduction = Literal["mean", "sum", "none"]


def span_mask(span: Span, n_pos: int, *, name: str = "span") -> Bool[Tensor, "batch pos"]:
    """A ``[batch, pos]`` boolean mask from a mask or ``(start, end)`` pairs.

    Raises ``ValueError`` naming the offending examples if any span is empty
    or an index pair falls outside ``[0, n_pos]``.
    """
    if span.dtype == torch.bool:
        if span.ndim != 2 or span.shape[1] != n_pos:
            raise ValueError(f"{name} mask must be [batch, {n_pos}], got {tuple(span.shape)}")
        mask = span
    else:
        if span.ndim != 2 or span.shape[1] != 2:
            raise ValueError(f"{name} index pairs must be [batch, 2], got {tuple(span.shape)}")
        start, end = span[:, 0:1], span[:, 1:2]
        bad = ((start < 0) | (end > n_pos)).squeeze(1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"{name} (start, end) out of range [0, {n_pos}] for example(s) {rows}: "
                f"{span[bad].tolist()}"
            )
        pos = torch.arange(n_pos, device=span.device)
        mask = (pos >= start) & (pos < end)
    empty = ~mask.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"{name} is empty for example(s) {rows}; every example needs ≥ 1 position")
    return mask


def predicting_positions(mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """Shift a token mask left by one: the logit positions that predicted those tokens.

    A span's first token at position 0 has no predicting position and is dropped.
    """
    return F.pad(mask[:, 1:], (0, 1), value=False)


def span_log_distribution(
    logits: Float[Tensor, "batch pos vocab"],
    mask: Bool[Tensor, "batch pos"],
    temperature: float = 1.0,
) -> Float[Tensor, "batch vocab"]:
    """Log of the mean next-token distribution over each example's masked positions.

    Computed as ``logsumexp`` over the span of ``log_softmax(logits / T)``
    minus ``log |span|``, in float32 or wider. Positions outside the mask
    receive exactly zero gradient. Assumes every row of ``mask`` is non-empty
    (``span_mask`` checks this).
    """
    work = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(work / temperature, dim=-1)
    floor = math.log(torch.finfo(logp.dtype).tiny)
    logp = logp.clamp(min=floor)
    # -inf outside the span: exp(-inf) = 0 in the sum and a zero gradient.
    masked = logp.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    count = mask.sum(dim=1, keepdim=True).to(logp.dtype)
    return (torch.logsumexp(masked, dim=1) - count.log()).clamp(min=floor)


def _kl(
    log_p: Float[Tensor, "batch vocab"], log_q: Float[Tensor, "batch vocab"]
) -> Float[Tensor, " batch"]:
    # Both inputs are clamped to finite values, so p * (log p - log q) is finite
    # everywhere and its gradient never sees 0 * inf.
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp(min=0.0)


def kl_span_alignment(
    logits: Float[Tensor, "batch pos vocab"],
    span_s: Span,
    span_o: Span,
    *,
    direction: Direction = "forward",
    detach_o: bool = True,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Float[Tensor, "*out"]:
    """KL divergence between the span-averaged next-token distributions of ``s`` and ``o``.

    Args:
        logits: ``[batch, pos, vocab]`` model logits.
        span_s: the span to move (biased reasoning): a ``[batch, pos]`` bool mask
            or ``[batch, 2]`` ``(start, end)`` pairs, ``end`` exclusive.
        span_o: the anchor span (the answer), same forms.
        direction: ``"forward"`` gives ``D(P_s || P_o)``, ``"reverse"`` ``D(P_o || P_s)``.
        detach_o: stop gradients through the ``o`` side (the anchor).
        temperature: softmax temperature applied to both sides (no T² rescaling).
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[batch]``.

    Returns:
        A scalar, or ``[batch]`` per-example KL values (nats) with ``reduction="none"``.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    batch, n_pos, _ = logits.shape
    for name, span in (("span_s", span_s), ("span_o", span_o)):
        if span.shape[0] != batch:
            raise ValueError(f"{name} has batch size {span.shape[0]}, logits have {batch}")
    mask_s = span_mask(span_s.to(logits.device), n_pos, name="span_s")
    mask_o = span_mask(span_o.to(logits.device), n_pos, name="span_o")

    log_s = span_log_distribution(logits, mask_s, temperature)
    log_o = span_log_distribution(logits.detach() if detach_o else logits, mask_o, temperature)
    kl = _kl(log_s, log_o) if direction == "forward" else _kl(log_o, log_s)
    if reduction == "none":
        return kl
    return kl.mean() if reduction == "mean" else kl.sum()


def sft_loss(
    logits: Float[Tensor, "batch pos vocab"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Bool[Tensor, "batch pos"] | Int[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """Next-token cross-entropy averaged over the tokens marked in ``loss_mask``.

    ``loss_mask[b, t]`` marks token ``t`` as a *target* (e.g. an assistant
    token); it is predicted from position ``t - 1``, so the first token can
    never be a target. The mean is over all target tokens in the batch
    (token-level, as in most SFT code), not per example. Half-precision logits are
    upcast to float32 for the log-softmax (a copy of the logits, not of the model).
    """
    targets = loss_mask[:, 1:].bool()
    n = targets.sum()
    if n == 0:
        raise ValueError("loss_mask selects no target tokens (after the one-token shift)")
    work = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    ce = F.cross_entropy(
        work[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none"
    ).view_as(targets)
    # masked_fill, not multiply: a non-finite CE at an ignored position must not leak in.
    return ce.masked_fill(~targets, 0.0).sum() / n


def sft_loss_per_example(
    logits: Float[Tensor, "batch pos vocab"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Bool[Tensor, "batch pos"] | Int[Tensor, "batch pos"],
) -> Float[Tensor, " batch"]:
    """Next-token cross-entropy averaged over each example's own target tokens: ``[batch]``.

    Targets as in :func:`sft_loss` (``loss_mask[b, t]`` marks token ``t``, predicted from
    ``t - 1``). Rows do not interact, so the gradient of the sum with respect to one row's
    activations is the gradient of that row's own mean loss (``interp.capture_grads``
    differentiates the sum of a per-example loss). Every row needs ≥ 1 target token.
    """
    targets = loss_mask[:, 1:].bool()
    n = targets.sum(1)
    if bool((n == 0).any()):
        rows = (n == 0).nonzero().flatten().tolist()
        raise ValueError(f"loss_mask selects no target tokens in rows {rows}")
    work = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    ce = F.cross_entropy(
        work[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none"
    ).view_as(targets)
    return ce.masked_fill(~targets, 0.0).sum(1) / n

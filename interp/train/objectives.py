"""Pluggable losses: ``loss(logits, batch) -> scalar`` with ``batch`` an
``interp.positions.Batch``.

Any callable with that signature trains (``interp.train.train``), differentiates
(``interp.capture_grads``) and evaluates; the ones here wrap ``interp.losses`` and read
their masks from ``batch.masks`` by name, so the same loss runs on ``collate``'s batches
(``loss_mask``, ``span_s``, ``span_o``) and on ``interp.chat.encode``'s
(``SFTLoss(mask_key="assistant")``). A plain dict with the same keys is read too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from interp.losses import kl_span_alignment, predicting_positions, sft_loss
from interp.positions import Batch

__all__ = ["KLSpanLoss", "LossFn", "SFTLoss", "WeightedSum", "batch_mask", "weighted_sum"]

LossFn = Callable[[Tensor, Batch], Tensor]


def batch_mask(batch: Batch | Mapping[str, Tensor], key: str) -> Tensor:
    """The ``[batch, pos]`` mask ``key`` of a ``Batch`` (``batch.masks[key]``) or a dict;
    a missing mask raises ``KeyError`` naming the masks there are."""
    masks: Any = batch.masks if isinstance(batch, Batch) else batch
    if key not in masks:
        raise KeyError(
            f"the batch has no mask {key!r}; it has {sorted(masks)} (collate puts loss_mask, "
            "span_s and span_o of the examples in Batch.masks; chat.encode its named masks)"
        )
    return masks[key]


def _input_ids(batch: Batch | Mapping[str, Tensor]) -> Tensor:
    return batch.input_ids if isinstance(batch, Batch) else batch["input_ids"]


@dataclass(frozen=True)
class SFTLoss:
    """Next-token cross-entropy on the tokens in ``batch.masks[mask_key]`` (the response
    tokens: ``"loss_mask"`` of ``collate``, ``"assistant"`` of ``chat.encode``), leaving out
    those in ``batch.masks[exclude_key]`` when given (e.g. ``"span_s"``: keep the rest of the
    response as written while a span loss moves ``s``)."""

    mask_key: str = "loss_mask"
    exclude_key: str | None = None

    def __call__(self, logits: Tensor, batch: Batch | Mapping[str, Tensor]) -> Tensor:
        mask = batch_mask(batch, self.mask_key)
        if self.exclude_key is not None:
            mask = mask & ~batch_mask(batch, self.exclude_key)
        return sft_loss(logits, _input_ids(batch), mask)


@dataclass(frozen=True)
class KLSpanLoss:
    """``kl_span_alignment`` between the token spans ``batch.masks[s_key]`` and ``[o_key]``.

    With ``shift=True`` (default) the masks are moved to the *predicting*
    positions, so each side aggregates the distributions that generated the
    span's tokens — what one logs while sampling the response.
    """

    direction: Literal["forward", "reverse"] = "forward"
    detach_o: bool = True
    temperature: float = 1.0
    shift: bool = True
    s_key: str = "span_s"
    o_key: str = "span_o"

    def __call__(self, logits: Tensor, batch: Batch | Mapping[str, Tensor]) -> Tensor:
        s, o = batch_mask(batch, self.s_key), batch_mask(batch, self.o_key)
        if self.shift:
            s, o = predicting_positions(s), predicting_positions(o)
        return kl_span_alignment(
            logits,
            s,
            o,
            direction=self.direction,
            detach_o=self.detach_o,
            temperature=self.temperature,
        )


@dataclass(frozen=True)
class WeightedSum:
    """``sum_i w_i * loss_i(logits, batch)``."""

    terms: tuple[tuple[float, LossFn], ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("WeightedSum needs at least one (weight, loss) term")
        for w, fn in self.terms:
            if not callable(fn):
                raise ValueError(f"term {fn!r} is not callable")
            if not isinstance(w, int | float):
                raise ValueError(f"weight {w!r} is not a number")

    def __call__(self, logits: Tensor, batch: Batch | Mapping[str, Tensor]) -> Tensor:
        total = None
        for w, fn in self.terms:
            value = w * fn(logits, batch)
            total = value if total is None else total + value
        assert total is not None
        return total


def weighted_sum(*terms: tuple[float, LossFn]) -> WeightedSum:
    """``weighted_sum((1.0, SFTLoss()), (0.5, KLSpanLoss()))``."""
    return WeightedSum(tuple((float(w), fn) for w, fn in terms))

"""Pluggable training losses: ``loss(logits, batch) -> scalar``.

Any callable with that signature trains; the ones here wrap ``interp.losses``
and read their masks from the collated batch by key, so a custom collator
only needs to provide the keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from interp.losses import kl_span_alignment, predicting_positions, sft_loss

__all__ = ["KLSpanLoss", "LossFn", "SFTLoss", "WeightedSum", "weighted_sum"]

LossFn = Callable[[Tensor, Mapping[str, Tensor]], Tensor]


@dataclass(frozen=True)
class SFTLoss:
    """Next-token cross-entropy on the tokens in ``batch[mask_key]`` (assistant tokens)."""

    mask_key: str = "loss_mask"

    def __call__(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return sft_loss(logits, batch["input_ids"], batch[self.mask_key])


@dataclass(frozen=True)
class KLSpanLoss:
    """``kl_span_alignment`` between the token spans ``batch[s_key]`` and ``batch[o_key]``.

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

    def __call__(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        s, o = batch[self.s_key], batch[self.o_key]
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

    def __call__(self, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        total = None
        for w, fn in self.terms:
            value = w * fn(logits, batch)
            total = value if total is None else total + value
        assert total is not None
        return total


def weighted_sum(*terms: tuple[float, LossFn]) -> WeightedSum:
    """``weighted_sum((1.0, SFTLoss()), (0.5, KLSpanLoss()))``."""
    return WeightedSum(tuple((float(w), fn) for w, fn in terms))

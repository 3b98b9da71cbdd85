"""``lora_trial``: fine-tune a model with LoRA for the length of a ``with`` block, then take
the adapter out again, so that several fine-tunes (one per condition, one per seed) start
from the same base model."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from interp.train.config import TrainConfig
from interp.train.loop import TrainResult, train
from interp.train.lora import resolve_model
from interp.train.objectives import LossFn

__all__ = ["lora_trial"]


@contextmanager
def lora_trial(
    model: Any,
    examples: Sequence[Mapping[str, Any]],
    loss_fn: LossFn,
    config: TrainConfig | None = None,
    *,
    check: Callable[[], Tensor] | None = None,
    rtol: float = 1e-3,
    **train_kwargs: Any,
) -> Iterator[TrainResult]:
    """``train(model, examples, loss_fn, config, **train_kwargs)``; the ``with`` block sees
    the fine-tuned model (the LoRA layers sit in ``model`` in place) and gets the
    ``TrainResult``. On leaving it (also on an error) the LoRA layers are unloaded and every
    parameter's ``requires_grad`` is set back as it was.

    ``check``: a function returning logits (e.g. a forward pass on a fixed batch). It is
    called before training and after the unloading; a change of more than ``rtol`` times
    the largest ``|logit|`` (at least ``rtol``) raises ``RuntimeError``: the base model
    must come back unchanged.
    """
    base = resolve_model(model)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    reference = None
    if check is not None:
        with torch.no_grad():
            reference = check().detach().float()
    result = train(model, examples, loss_fn, config, **train_kwargs)
    try:
        yield result
    finally:
        result.model.unload()  # removes the LoRA layers; the base weights were never trained
        for n, p in base.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
    if check is not None and reference is not None:
        with torch.no_grad():
            moved = float((check().detach().float() - reference).abs().max())
        if moved > rtol * max(1.0, float(reference.abs().max())):
            raise RuntimeError(f"the base model changed after unloading LoRA (|dlogit| {moved})")

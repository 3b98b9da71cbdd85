"""``example_losses``: a training loss evaluated on each example alone, without gradients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.train.data import collate, prepare
from interp.train.lora import resolve_model
from interp.train.objectives import LossFn

__all__ = ["example_losses"]


@torch.no_grad()
def example_losses(
    model: Any,
    examples: Sequence[Mapping[str, Any]],
    loss_fn: LossFn,
    *,
    tokenizer: Any = None,
    progress: bool = False,
) -> Float[Tensor, " n"]:
    """``loss_fn(logits, batch)`` of each example on its own (float64, input order).

    The value ``train`` would see for a batch of one, before and after training (the
    objective on held-out examples, paired per example for a bootstrap). Examples are text
    or token level as in ``train``; the model runs in eval mode (no dropout) and its mode
    is restored. Each example is one forward pass, so no padding enters the loss.
    """
    from tqdm.auto import tqdm

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    module = resolve_model(model)
    items = prepare(examples, tokenizer)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    device = next(module.parameters()).device
    out = torch.empty(len(items), dtype=torch.float64)
    was_training = module.training
    module.eval()
    try:
        for i, item in enumerate(tqdm(items, desc="loss", disable=not progress, leave=False)):
            batch = collate([item], 0 if pad_id is None else int(pad_id)).to(device)
            logits = module(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).logits
            loss = loss_fn(logits, batch)
            if loss.ndim != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            out[i] = float(loss)
    finally:
        module.train(was_training)
    return out

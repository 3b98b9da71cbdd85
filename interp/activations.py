"""``capture``: activations at named hooks and selected positions, nothing more.

Positions are selected inside the hook, before anything is copied, so a
one-position capture stores ``[batch, d_model]`` per hook instead of the
full ``[batch, pos, d_model]`` sequence. A full-sequence capture stores a
reference to the model's own activation (as TransformerLens does), so it
costs no copy either.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from interp.cache import ActivationCache
from interp.hooks import HookPoint
from interp.positions import as_batch, running, selector

__all__ = ["capture"]


def capture(
    model: Any,
    batch: Any,
    names: str | Iterable[str],
    positions: Any = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    return_logits: bool = False,
    **forward_kwargs: Any,
) -> ActivationCache | tuple[Tensor, ActivationCache]:
    """Run ``model`` on ``batch`` and keep the activations at ``names``.

    Args:
        model: a ``HookedModel`` (see ``interp.load``).
        batch: text(s), ``[batch, pos]`` ids, a dict with ``input_ids``, or a ``Batch``
            (``interp.chat.encode`` output, which carries named positions).
        names: hook names or glob patterns, e.g. ``"blocks.*.hook_resid_post"``.
        positions: ``None`` (all), an int, a list of ints, a named position
            (``"pre_assistant"``, ``"user_end"``, ``"assistant"`` …) or a list of one-token
            named positions, a ``[batch]`` / ``[batch, n]`` integer tensor of per-row
            positions, or a ``[batch, pos]`` bool mask (``interp.positions.selector``). On
            ``[batch, head, q, k]`` patterns and scores they select query positions.
        dtype, device: storage dtype/device of the captured tensors.
        return_logits: also return the logits, as ``(logits, cache)``.

    Returns:
        An ``ActivationCache``. Per hook: ``[batch, pos, d]`` for all positions,
        ``[batch, d]`` for an int or a one-per-row position, ``[batch, n, d]`` for a list
        of ints or ``n`` per-row positions, ``[n_selected, d]`` for a mask (patterns and
        scores keep their head axis in front of the query axis).
    """
    if forward_kwargs.get("return_type", "logits") != "logits":
        raise TypeError(
            "capture returns the logits (return_logits=True) and the cache; return_type="
            f"{forward_kwargs['return_type']!r} would replace the logits. Compute a loss from "
            "the returned logits, or use model.run_with_cache(..., return_type=...)"
        )
    batch = as_batch(model, batch)
    resolved = model.resolve(names)
    sel = selector(positions, batch, device=model.device)
    store: dict[str, Tensor] = {}
    convert = dtype is not None or device is not None

    def keep(tensor: Tensor, hook: HookPoint) -> None:
        value = sel.select(tensor.detach(), hook.name)
        if sel.kind == "index" and isinstance(sel.index, int):
            value = value.clone()  # a basic-index view would pin the whole sequence
        store[hook.name] = value.to(device=device, dtype=dtype) if convert else value

    with torch.no_grad(), running(batch), model.hooks(fwd=[(n, keep) for n in resolved]):
        logits = model.forward(batch.input_ids, batch.attention_mask, **forward_kwargs)
    cache = ActivationCache(
        {n: store[n] for n in resolved if n in store},
        {"positions": positions if isinstance(positions, str | int | None) else sel.kind},
    )
    missing = [n for n in resolved if n not in store]
    if missing:
        raise RuntimeError(
            f"hooks {missing[:4]} never fired during the forward pass; the model's forward "
            "does not reach them (e.g. a stop before those layers)"
        )
    return (logits, cache) if return_logits else cache

"""``score``: per-token log-probabilities of each token given its prefix, and per-example NLL
over a mask."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.positions import Batch, running
from interp.runs._rows import (
    _DEFAULT_CHAT,
    Generations,
    _accepts,
    _ChatOptions,
    _check_batch_size,
    _collate,
    _pad_id,
    _progress,
    _rows,
    _rows_from_batch,
)


@dataclass(frozen=True)
class Scores:
    """What ``score`` returns, aligned with the input ``Batch``'s ``[batch, pos]`` layout.

    Attributes:
        logprobs: ``log p(token[t] | tokens[:t])`` at every scored token, 0 elsewhere
            (float32).
        mask: the scored tokens: the mask asked for, restricted to real tokens that have
            a previous token in their row.
        n_tokens: scored tokens per row.
        nll: ``reduction="mean"``: mean NLL per row over its scored tokens (NaN for a row
            with none); ``"sum"``: their sum; ``"none"``: ``[batch, pos]`` per-token NLL
            (0 outside ``mask``).
    """

    logprobs: Float[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    n_tokens: Int[Tensor, " batch"]
    nll: Float[Tensor, "batch ..."]


def _resolve_mask(batch: Batch, mask: Any) -> Tensor:
    """The ``[batch, pos]`` bool mask ``mask`` names in ``batch``."""
    shape = tuple(batch.input_ids.shape)
    if mask is None:
        return batch.attention_mask.bool()
    if isinstance(mask, str):
        if mask in batch.masks:
            return batch.masks[mask].bool()
        if mask in batch.positions:
            out = torch.zeros(shape, dtype=torch.bool, device=batch.input_ids.device)
            idx = batch.positions[mask].to(out.device)
            out[torch.arange(shape[0], device=out.device), idx] = True
            return out
        known = sorted([*batch.masks, *batch.positions])
        raise KeyError(
            f"unknown mask {mask!r}; this batch (input_ids {shape}) has "
            f"{known or 'no named masks or positions'} (named masks come from "
            "interp.chat.encode and interp.runs.generate)"
        )
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match the batch's input_ids {shape} "
                "(a mask is [batch, pos], aligned with input_ids)"
            )
        return mask
    raise TypeError(
        f"mask must be None, a named mask or position, or a [batch, pos] bool tensor; got "
        f"{type(mask).__name__}"
    )


def _as_scoring_batch(model: Any, batch: Any, chat: _ChatOptions = _DEFAULT_CHAT) -> Batch:
    if isinstance(batch, Generations):
        return batch.batch
    if isinstance(batch, Batch):
        return batch
    return _collate(_rows(model, batch, chat=chat), _pad_id(model), "right")


def score(
    model: Any,
    batch: Any,
    mask: Any = None,
    *,
    reduction: str = "mean",
    batch_size: int = 8,
    chat_format: Any = "template",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Scores:
    """Log-probabilities of each token given its prefix, and per-example NLL over a mask.

    Args:
        model: a ``HookedModel``.
        batch: a ``Batch`` (any padding), ``Generations``, texts, or conversations
            (teacher-forced, encoded with ``interp.chat.encode``).
        mask: which tokens to score: ``None`` (every token after the first of its row), a
            named mask (``"assistant"``, ``"generated"`` …) or named position of the batch,
            or a ``[batch, pos]`` bool tensor aligned with ``input_ids``. Token ``t`` is
            scored by the logits at ``t - 1``; padding and each row's first token are never
            scored.
        reduction: ``"mean"`` / ``"sum"`` of the NLL per row, or ``"none"`` (per token).
        batch_size: rows per forward pass (rows are re-padded on the right per pass,
            shortest padding first; results come back in the input's layout).
        chat_format: how conversations are rendered (``interp.chat.encode``).
        chat_template_kwargs: keyword arguments for the chat template (e.g.
            ``{"enable_thinking": False}``).
        progress: show a tqdm bar.

    Hooks active around the call apply. The model runs in its own dtype; the log-softmax
    is computed in float32 on the selected logits.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    _check_batch_size(batch_size)
    full = _as_scoring_batch(model, batch, _ChatOptions.of(chat_format, chat_template_kwargs))
    want = _resolve_mask(full, mask).cpu()
    rows = _rows_from_batch(full)
    att = full.attention_mask.cpu().bool()
    starts = [int(att[b].nonzero()[0]) for b in range(len(rows))]
    for b, r in enumerate(rows):  # named positions stay, for interventions that use them
        r.masks["_score"] = want[b, starts[b] : starts[b] + len(r.ids)].clone()
        r.masks["_score"][0] = False  # the first token has no prediction
    B, T = full.input_ids.shape
    logprobs = torch.zeros((B, T), dtype=torch.float32)
    scored = torch.zeros((B, T), dtype=torch.bool)
    order = sorted(range(B), key=lambda b: -len(rows[b].ids))
    keep_kw = _accepts(model, "logits_to_keep")
    bar = _progress(B, "score", progress)
    try:
        for s in range(0, B, batch_size):
            chunk = order[s : s + batch_size]
            sub = _collate([rows[b] for b in chunk], _pad_id(model), "right")
            target = sub.masks["_score"]
            if not target.any():
                bar.update(len(chunk))
                continue
            first = int(target.any(0).nonzero()[0])  # earliest scored column
            kw: dict[str, Any] = {}
            width = sub.input_ids.shape[1]
            if keep_kw:
                kw["logits_to_keep"] = width - (first - 1)
            sub_dev = sub.to(model.device)
            with torch.no_grad(), running(sub_dev):
                logits = model.forward(sub_dev.input_ids, sub_dev.attention_mask, **kw)
            offset = width - logits.shape[1]  # logits[:, k] are those of position offset + k
            rr, tt = target.nonzero(as_tuple=True)
            lp = torch.empty(len(rr), dtype=torch.float32)
            for c in range(0, len(rr), 1024):  # bounded float32 copies of the logits
                r_, t_ = rr[c : c + 1024], tt[c : c + 1024]
                pred = logits[r_.to(logits.device), (t_ - 1 - offset).to(logits.device)]
                lsm = pred.float().log_softmax(-1)
                tok = sub.input_ids[r_, t_].to(logits.device)
                lp[c : c + 1024] = lsm.gather(-1, tok[:, None])[:, 0].cpu()
            del logits
            for i, b in enumerate(chunk):
                sel = rr == i
                cols = tt[sel] + starts[b]
                logprobs[b, cols] = lp[sel]
                scored[b, cols] = True
            bar.update(len(chunk))
    finally:
        bar.close()
    n_tokens = scored.sum(1)
    token_nll = -logprobs
    if reduction == "none":
        nll = token_nll
    elif reduction == "sum":
        nll = token_nll.sum(1)
    else:
        nll = token_nll.sum(1) / n_tokens.clamp_min(1)
        nll = nll.masked_fill(n_tokens == 0, float("nan"))
    return Scores(logprobs=logprobs, mask=scored, n_tokens=n_tokens, nll=nll)

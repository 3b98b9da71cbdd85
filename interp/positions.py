"""Batches and positions: what a forward pass reads, and which tokens a capture keeps.

A ``Batch`` carries ``input_ids``/``attention_mask`` plus *named* positions
(one index per row, e.g. ``pre_assistant``) and named masks (e.g.
``assistant``), as produced by ``interp.chat.encode``. ``selector`` turns a
``positions=`` argument into a small object that hooks apply to an
activation *before* anything is copied, so a one-position capture never
materializes the full sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = ["Batch", "Selector", "as_batch", "selector", "tokenize"]


@dataclass(frozen=True)
class Batch:
    """Token ids with their mask and named positions.

    Attributes:
        input_ids: ``[batch, pos]`` token ids.
        attention_mask: ``[batch, pos]`` 1 for real tokens, 0 for padding.
        positions: name -> ``[batch]`` index of one token per row.
        masks: name -> ``[batch, pos]`` boolean token masks.
        texts: the serialized strings, when known.
        offsets: ``[batch, pos, 2]`` character offsets of each token in ``texts``.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    positions: Mapping[str, Int[Tensor, " batch"]] = field(default_factory=dict)
    masks: Mapping[str, Bool[Tensor, "batch pos"]] = field(default_factory=dict)
    texts: Sequence[str] | None = None
    offsets: Int[Tensor, "batch pos 2"] | None = None

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must be [batch, pos], got shape {tuple(self.input_ids.shape)}"
            )
        if self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(self.attention_mask.shape)} != input_ids shape "
                f"{tuple(self.input_ids.shape)}"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            positions={k: v.to(device) for k, v in self.positions.items()},
            masks={k: v.to(device) for k, v in self.masks.items()},
        )

    def __getitem__(self, rows: Any) -> Batch:
        """Select rows (an int, slice or index tensor), keeping every field aligned."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return replace(
            self,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            positions={k: v[rows] for k, v in self.positions.items()},
            masks={k: v[rows] for k, v in self.masks.items()},
            texts=None if self.texts is None else _take(self.texts, rows),
            offsets=None if self.offsets is None else self.offsets[rows],
        )


def _take(seq: Sequence[str], rows: Any) -> list[str]:
    if isinstance(rows, slice):
        return list(seq[rows])
    return [seq[int(i)] for i in torch.as_tensor(rows).reshape(-1).tolist()]


def tokenize(model: Any, text: str | Sequence[str], padding_side: str = "right") -> Batch:
    """Tokenize plain text(s) with the model's tokenizer into a padded ``Batch``."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer; pass token ids instead of text")
    texts = [text] if isinstance(text, str) else list(text)
    old = tok.padding_side
    tok.padding_side = padding_side
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old
    return Batch(enc["input_ids"], enc["attention_mask"], texts=texts).to(model.device)


def as_batch(model: Any, input: Any, attention_mask: Tensor | None = None) -> Batch:
    """Coerce text, ids, a dict or a ``Batch`` into a ``Batch`` on the model's device."""
    if isinstance(input, Batch):
        batch = input
    elif isinstance(input, str) or (
        isinstance(input, Sequence) and input and all(isinstance(t, str) for t in input)
    ):
        return tokenize(model, input)
    elif isinstance(input, Mapping):
        if "input_ids" not in input:
            raise ValueError(f"a dict batch needs 'input_ids'; got keys {sorted(input)}")
        ids = input["input_ids"]
        mask = input.get("attention_mask")
        batch = Batch(ids, torch.ones_like(ids) if mask is None else mask)
    elif isinstance(input, Tensor):
        ids = input[None] if input.ndim == 1 else input
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        batch = Batch(ids, torch.ones_like(ids))
    else:
        raise TypeError(
            "expected text, a list of texts, a [batch, pos] id tensor, a dict with input_ids, "
            f"or an interp Batch; got {type(input).__name__}"
        )
    if attention_mask is not None:
        batch = replace(batch, attention_mask=attention_mask)
    dev = model.device
    return batch if batch.input_ids.device == dev else batch.to(dev)


@dataclass(frozen=True)
class Selector:
    """A resolved ``positions=`` argument, applied to ``[batch, pos, ...]`` activations.

    kind is one of ``all`` (keep everything), ``index`` (the same positions in
    every row: ``[batch, n, ...]``, or ``[batch, ...]`` for a single int),
    ``rows`` (one position per row: ``[batch, ...]``, or ``n`` per row: ``[batch, n, ...]``
    for a list of named positions) and ``mask``
    (selected tokens flattened: ``[n_selected, ...]``).
    """

    kind: str
    index: Tensor | int | None = None
    rows: Tensor | None = None

    def __call__(self, act: Tensor) -> Tensor:
        k = self.kind
        if k == "all":
            return act
        if k == "index":
            return act[:, self.index]
        if k == "rows":
            return act[self.rows, self.index]
        return act[self.index]  # mask

    def scatter(self, act: Tensor, values: Tensor) -> Tensor:
        """Return ``act`` with the selected positions set to ``values`` (out of place)."""
        if self.kind == "all":
            return values.expand_as(act).to(act.dtype)
        out = act.clone()
        if self.kind == "index":
            out[:, self.index] = values.to(act.dtype)
        elif self.kind == "rows":
            out[self.rows, self.index] = values.to(act.dtype)
        else:
            out[self.index] = values.to(act.dtype)
        return out


def selector(positions: Any, batch: Batch | None, device: torch.device | None = None) -> Selector:
    """Resolve ``positions`` (None, int, list/1-D tensor, ``[batch, pos]`` bool mask, a name
    in ``batch.positions`` / ``batch.masks``, or a list of names in ``batch.positions``)
    into a ``Selector``. A list of ``n`` named positions selects ``[batch, n, ...]``."""
    if positions is None:
        return Selector("all")
    if isinstance(positions, str):
        if batch is None or (positions not in batch.positions and positions not in batch.masks):
            known = [] if batch is None else sorted([*batch.positions, *batch.masks])
            raise KeyError(
                f"unknown named position {positions!r}; this batch has {known or 'none'}. "
                "Named positions come from interp.chat.encode(...)."
            )
        if positions in batch.positions:
            idx = batch.positions[positions]
            return Selector(
                "rows", index=idx.to(device), rows=torch.arange(len(idx), device=device)
            )
        return Selector("mask", index=batch.masks[positions].to(device))
    if isinstance(positions, int):
        return Selector("index", index=positions)
    if (
        isinstance(positions, list | tuple)
        and positions
        and all(isinstance(p, str) for p in positions)
    ):
        named = [selector(p, batch, device) for p in positions]
        masks = [p for p, sel in zip(positions, named, strict=True) if sel.kind != "rows"]
        if masks:
            raise ValueError(
                f"a list of named positions takes one-token positions only; {masks} are masks "
                "(pass a mask on its own: it selects a different number of tokens per row)"
            )
        idx = torch.stack([sel.index for sel in named], dim=1)  # [batch, n]
        return Selector("rows", index=idx, rows=named[0].rows[:, None])
    t = torch.as_tensor(positions)
    if t.dtype == torch.bool:
        if batch is not None and t.shape != batch.input_ids.shape:
            raise ValueError(
                f"a position mask must be [batch, pos] = {tuple(batch.input_ids.shape)}, "
                f"got {tuple(t.shape)}"
            )
        return Selector("mask", index=t.to(device))
    if t.dtype not in (torch.int64, torch.int32) or t.ndim != 1:
        raise TypeError(
            "positions must be None, an int, a 1-D list/tensor of indices, a [batch, pos] bool "
            f"mask, or a named position; got {t.dtype} tensor of shape {tuple(t.shape)}"
        )
    return Selector("index", index=t.long().to(device))

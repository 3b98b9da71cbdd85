"""Batches and positions: what a forward pass reads, and which tokens a capture keeps.

A ``Batch`` carries ``input_ids``/``attention_mask`` plus *named* positions
(one index per row, e.g. ``pre_assistant``) and named masks (e.g.
``assistant``), as produced by ``interp.chat.encode``. ``selector`` turns a
``positions=`` argument into a small object that hooks apply to an
activation *before* anything is copied, so a one-position capture never
materializes the full sequence.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = [
    "Batch",
    "PositionError",
    "Selector",
    "as_batch",
    "decoding_step",
    "position_axis",
    "running",
    "running_batch",
    "selector",
    "tokenize",
]


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
        batch = tokenize(model, input)
        _check_not_empty(batch)
        return batch
    elif isinstance(input, Sequence) and not input:
        raise ValueError("empty input: an empty list has no texts to run")
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
    _check_not_empty(batch)
    dev = model.device
    return batch if batch.input_ids.device == dev else batch.to(dev)


def _check_not_empty(batch: Batch) -> None:
    """Refuse input the model cannot run on, before it runs (transformers fails deep inside)."""
    n, T = batch.input_ids.shape
    if n == 0 or T == 0:
        raise ValueError(
            f"empty input: input_ids has shape {(n, T)}; pass at least one row with at least "
            "one token (an empty string tokenizes to no tokens)"
        )
    empty = (batch.attention_mask.sum(dim=1) == 0).nonzero().flatten()
    if len(empty):
        raise ValueError(
            f"rows {empty.tolist()[:8]} of the batch have no tokens (attention_mask all 0, "
            f"input_ids shape {(n, T)}); drop them or give them text"
        )


@dataclass
class _Running:
    batch: Batch
    generating: bool = False
    cached: bool = True
    forward_calls: int = 0

    def count(self, tensor: Tensor, hook: Any) -> None:
        """A hook for ``hook_embed``: counts the forward passes of a ``generate`` call."""
        self.forward_calls += 1


_RUNNING: contextvars.ContextVar[_Running | None] = contextvars.ContextVar(
    "interp_running_batch", default=None
)


@contextlib.contextmanager
def running(batch: Batch, generating: bool = False, cached: bool = True) -> Iterator[_Running]:
    """Make ``batch`` the one hooks see while it runs (see ``running_batch``).

    ``generating``: inside ``generate``; register the yielded state's ``count`` at
    ``hook_embed`` so that interventions with positions edit the prompt's pass only
    (``decoding_step``). ``cached=False``: each step recomputes the whole prefix (no KV
    cache), where editing the prompt's pass only would be undone at the next step.
    """
    state = _Running(batch, generating=generating, cached=cached)
    token = _RUNNING.set(state)
    try:
        yield state
    finally:
        _RUNNING.reset(token)


def running_batch() -> Batch | None:
    """The ``Batch`` the model is running now, if it was given one through ``interp``
    (``model(batch)``, ``run_with_hooks``, ``capture``, ``capture_grads``, ``generate``):
    how interventions resolve named positions such as ``"user_end"``."""
    state = _RUNNING.get()
    return None if state is None else state.batch


def decoding_step() -> bool:
    """True during a ``generate`` step after the prompt's forward pass (with a KV cache).

    Without a KV cache every step recomputes the prompt, and an edit of the prompt's
    positions on its first pass only would silently vanish at the next step: that case
    raises ``PositionError``.
    """
    state = _RUNNING.get()
    if state is None or not state.generating or state.forward_calls <= 1:
        return False
    if not state.cached:
        raise PositionError(
            "an intervention with positions= inside generate without a KV cache: every step "
            "recomputes the prompt, so positions would mean different tokens at each step. Use "
            "positions=None, generate with a KV cache (the Hugging Face backend, or "
            "use_past_kv_cache=True on a HookedTransformer), or edit inside a hook yourself"
        )
    return True


# Hook points whose position axis is not axis 1: attention scores and patterns are
# [batch, head, query_pos, key_pos], and positions select query positions there.
_QUERY_AXIS_2 = ("hook_pattern", "hook_attn_scores")


def position_axis(name: str) -> int:
    """The axis of a hook's activation that ``positions=`` indexes (1, or 2 for
    ``attn.hook_pattern`` / ``attn.hook_attn_scores``, whose axis 1 is the head)."""
    return 2 if name.endswith(_QUERY_AXIS_2) else 1


class PositionError(ValueError):
    """A ``positions=`` argument that does not fit the activation of a hook."""


@dataclass(frozen=True)
class Selector:
    """A resolved ``positions=`` argument, applied to one hook's activation.

    The position axis is axis 1 (``[batch, pos, ...]``), or the query axis 2 of
    ``[batch, head, q, k]`` attention scores and patterns (``position_axis``), so positions
    never select heads. kind is one of

    * ``all``: everything;
    * ``index``: the same column(s) in every row: an int drops the position axis, a list
      of ``n`` ints keeps it with length ``n``;
    * ``rows``: one position per row (``index`` is ``[batch]``; the axis is dropped), or
      ``n`` per row (``index`` is ``[batch, n]``; the axis has length ``n``);
    * ``mask``: a ``[batch, pos]`` boolean mask; batch and position axes are replaced by
      one ``[n_selected]`` axis in front.

    What does not fit the activation (an index out of range, a per-row index or a mask for
    another batch or length) raises ``PositionError`` naming the hook and the shapes.
    """

    kind: str
    index: Tensor | int | None = None
    rows: Tensor | None = None
    what: str = ""  # how the user wrote it, for error messages
    bounds: tuple[int, int] | None = None  # (min, max) of the indices, read once

    def __call__(self, act: Tensor, name: str = "activation") -> Tensor:
        return self.select(act, name)

    def _check(self, act: Tensor, name: str) -> int:
        axis = position_axis(name)
        if act.ndim <= axis:
            raise PositionError(
                f"hook {name!r}: positions={self.what} need a position axis at dim {axis}, but "
                f"the activation has shape {tuple(act.shape)}"
            )
        T = act.shape[axis]
        if self.kind == "mask":
            expected = (act.shape[0], T)
            if tuple(self.index.shape) != expected:
                raise PositionError(
                    f"hook {name!r}: a position mask of shape {tuple(self.index.shape)} does not "
                    f"fit the activation {tuple(act.shape)} (needs [batch, pos] = {expected})"
                )
            return axis
        if self.kind == "rows" and self.index.shape[0] != act.shape[0]:
            raise PositionError(
                f"hook {name!r}: positions={self.what} has one index per row for a batch of "
                f"{self.index.shape[0]}, but the activation {tuple(act.shape)} has "
                f"{act.shape[0]} rows"
            )
        lo, hi = self.bounds
        if lo < -T or hi >= T:
            raise PositionError(
                f"hook {name!r}: positions={self.what} index {hi if hi >= T else lo} is out of "
                f"range for {T} positions (activation shape {tuple(act.shape)}, position axis "
                f"{axis})"
            )
        return axis

    def select(self, act: Tensor, name: str = "activation") -> Tensor:
        """The selected part of ``act`` (see the class docstring for shapes)."""
        if self.kind == "all":
            return act
        axis = self._check(act, name)
        x = act if axis == 1 else act.movedim(axis, 1)
        out = self._take(x)
        if axis != 1 and out.ndim == x.ndim:  # an n-long position axis stays where it was
            out = out.movedim(1, axis)
        return out

    def _take(self, x: Tensor) -> Tensor:
        if self.kind == "index":
            return x[:, self.index]
        if self.kind == "rows":
            return x[self.rows, self.index]
        return x[self.index]  # mask

    def scatter(self, act: Tensor, values: Tensor, name: str = "activation") -> Tensor:
        """``act`` with the selected part set to ``values`` (shaped as ``select``'s output);
        out of place."""
        if self.kind == "all":
            return values.expand_as(act).to(act.dtype)
        axis = self._check(act, name)
        out = act.clone()
        view = out if axis == 1 else out.movedim(axis, 1)  # writes go through to ``out``
        values = values.to(act.dtype)
        if axis != 1 and values.ndim == act.ndim:
            values = values.movedim(axis, 1)
        if self.kind == "index":
            view[:, self.index] = values
        elif self.kind == "rows":
            view[self.rows, self.index] = values
        else:
            view[self.index] = values
        return out


def _bounds(index: Tensor) -> tuple[int, int]:
    if index.numel() == 0:
        return (0, -1)
    return int(index.min()), int(index.max())


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def selector(positions: Any, batch: Batch | None, device: torch.device | None = None) -> Selector:
    """Resolve a ``positions=`` argument into a ``Selector``; one meaning everywhere.

    * ``None``: every position.
    * an int, or a list/tuple of ints: the same column(s) in every row.
    * a named position (``batch.positions``: one token per row) or named mask
      (``batch.masks``), or a list of one-token named positions (``[batch, n]``).
    * a ``[batch]`` integer tensor: one position per row (e.g. ``batch.positions["user_end"]``);
      a ``[batch, n]`` integer tensor: ``n`` positions per row.
    * a ``[batch, pos]`` boolean tensor: a mask.

    ``batch`` is needed for named positions and is used to check shapes early; the hooks
    check every activation again.
    """
    what = _describe(positions)
    if positions is None:
        return Selector("all", what=what)
    if isinstance(positions, str):
        if batch is None:
            raise PositionError(
                f"positions={what} is a named position, but no interp Batch is being run; "
                "named positions come from interp.chat.encode(...) and need that Batch passed "
                "to the model (model(batch), run_with_hooks(batch, ...), capture, generate)"
            )
        if positions not in batch.positions and positions not in batch.masks:
            known = sorted([*batch.positions, *batch.masks])
            raise KeyError(
                f"unknown named position {positions!r}; this batch (input_ids "
                f"{tuple(batch.input_ids.shape)}) has {known or 'none'}. "
                "Named positions come from interp.chat.encode(...)."
            )
        if positions in batch.positions:
            idx = batch.positions[positions].to(device)
            return Selector(
                "rows",
                index=idx,
                rows=torch.arange(len(idx), device=device),
                what=what,
                bounds=_bounds(idx),
            )
        return Selector("mask", index=batch.masks[positions].to(device), what=what)
    if _is_int(positions):
        return Selector("index", index=int(positions), what=what, bounds=(positions, positions))
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
        return Selector(
            "rows", index=idx, rows=named[0].rows[:, None], what=what, bounds=_bounds(idx)
        )
    if isinstance(positions, list | tuple):
        if not positions:
            raise PositionError("positions=[] selects nothing; pass None for every position")
        if all(_is_int(p) for p in positions):
            idx = torch.tensor([int(p) for p in positions], dtype=torch.long, device=device)
            return Selector("index", index=idx, what=what, bounds=_bounds(idx))
    t = positions if isinstance(positions, Tensor) else _as_tensor(positions, what)
    if t.ndim == 0 and not (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        return selector(int(t), batch, device)
    if t.dtype == torch.bool:
        if t.ndim != 2:
            raise PositionError(
                f"a position mask must be [batch, pos] booleans, got shape {tuple(t.shape)}"
            )
        if batch is not None and t.shape != batch.input_ids.shape:
            raise PositionError(
                f"a position mask must be [batch, pos] = {tuple(batch.input_ids.shape)}, "
                f"got {tuple(t.shape)}"
            )
        return Selector("mask", index=t.to(device), what=what)
    if t.is_floating_point() or t.is_complex() or t.ndim not in (1, 2):
        raise TypeError(
            "positions must be None, an int, a list of ints, a named position or a list of "
            "them, a [batch] or [batch, n] integer tensor (per-row positions) or a [batch, pos] "
            f"bool mask; got a {t.dtype} tensor of shape {tuple(t.shape)}"
        )
    if batch is not None and t.shape[0] != len(batch):
        raise PositionError(
            f"an integer positions tensor holds per-row positions ([batch] or [batch, n]); "
            f"got shape {tuple(t.shape)} for a batch of {len(batch)}. For the same columns in "
            "every row pass a list of ints"
        )
    idx = t.long().to(device)
    rows = torch.arange(t.shape[0], device=device)
    return Selector(
        "rows",
        index=idx,
        rows=rows if t.ndim == 1 else rows[:, None],
        what=what,
        bounds=_bounds(idx),
    )


def _as_tensor(positions: Any, what: str) -> Tensor:
    try:
        return torch.as_tensor(positions)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            "positions must be None, an int, a list of ints, a named position or a list of "
            "them, a [batch] or [batch, n] integer tensor or a [batch, pos] bool mask; "
            f"got {what}"
        ) from None


def _describe(positions: Any) -> str:
    if isinstance(positions, Tensor):
        return f"<{positions.dtype} tensor of shape {tuple(positions.shape)}>"
    text = repr(positions)
    return text if len(text) <= 60 else text[:57] + "..."

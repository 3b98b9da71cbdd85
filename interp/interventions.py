"""Interventions as hook factories: each returns ``fn(tensor, hook)`` for ``model.hooks``.

They compose (``compose(a, b)``), work on any backend, and work inside
``generate``. ``positions=`` means what it means for ``capture``
(``interp.positions.selector``): ``None`` (every position, what steering during
generation wants), an int or list of ints (the same columns in every row), a named
position such as ``"user_end"`` (resolved against the ``Batch`` being run), a
``[batch]`` / ``[batch, n]`` tensor of per-row positions, or a ``[batch, pos]`` mask.
On ``[batch, head, q, k]`` patterns and scores they select query positions. A position
that does not fit the activation raises ``PositionError`` naming the hook and the shapes.

During ``generate``, positions index the prompt: they are edited on the forward pass
over the prompt (whose keys and values the later steps attend to), and the one-token
decoding steps after it are left alone. Outside ``generate`` every forward pass must fit.

    v = direction.vector(layer)
    with model.hooks(fwd=[(f"blocks.{layer}.hook_resid_post", add_direction(v, 4.0))]):
        out = model.generate(batch, max_new_tokens=20)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.hooks import HookPoint
from interp.positions import (
    PositionError,
    Selector,
    decoding_step,
    running_batch,
    selector,
)

__all__ = [
    "add_direction",
    "compose",
    "mean_ablate",
    "patch_from",
    "project_out",
    "zero_ablate",
]

Hook = Callable[[Tensor, HookPoint], Tensor | None]
Positions = int | Sequence[int] | Sequence[str] | str | Tensor | None


def _positions(positions: Any) -> Callable[[], Selector]:
    """Resolve ``positions`` once, or on every forward pass when it names positions of the
    batch being run (``interp.positions.running_batch``)."""
    named = isinstance(positions, str) or (
        isinstance(positions, list | tuple) and any(isinstance(p, str) for p in positions)
    )
    if named:
        return lambda: selector(positions, running_batch())
    fixed = selector(positions, None)
    return lambda: fixed


def _resolved(resolve: Callable[[], Selector], hook: HookPoint, tensor: Tensor) -> Selector:
    try:
        return resolve()
    except (KeyError, PositionError) as exc:
        raise PositionError(
            f"hook {hook.name!r} (activation {tuple(tensor.shape)}): {exc.args[0]}"
        ) from None


def _edit(positions: Positions, edit: Callable[[Tensor], Tensor]) -> Hook:
    resolve = _positions(positions)

    def hook(tensor: Tensor, hook: HookPoint) -> Tensor | None:
        sel = _resolved(resolve, hook, tensor)
        if sel.kind == "all":
            return edit(tensor)
        if decoding_step():
            return None  # positions index the prompt; its forward pass was edited
        return sel.scatter(tensor, edit(sel.select(tensor, hook.name)), hook.name)

    return hook


def add_direction(
    direction: Float[Tensor, " d_model"], scale: float = 1.0, positions: Positions = None
) -> Hook:
    """Add ``scale * direction`` to the activation (steering)."""
    if direction.ndim != 1:
        raise ValueError(f"direction must be 1-D [d_model], got shape {tuple(direction.shape)}")

    def edit(x: Tensor) -> Tensor:
        return x + (scale * direction).to(device=x.device, dtype=x.dtype)

    return _edit(positions, edit)


def project_out(direction: Float[Tensor, " d_model"], positions: Positions = None) -> Hook:
    """Remove the component along ``direction`` (directional ablation)."""
    if direction.ndim != 1:
        raise ValueError(f"direction must be 1-D [d_model], got shape {tuple(direction.shape)}")
    unit = direction / direction.norm().clamp_min(1e-12)

    def edit(x: Tensor) -> Tensor:
        u = unit.to(device=x.device, dtype=x.dtype)
        return x - (x @ u)[..., None] * u

    return _edit(positions, edit)


def zero_ablate(positions: Positions = None) -> Hook:
    """Set the activation to zero."""
    return _edit(positions, torch.zeros_like)


def mean_ablate(mean: Float[Tensor, "..."], positions: Positions = None) -> Hook:
    """Replace the activation by a mean (e.g. ``capture(...)[name].mean(0)``), broadcast."""

    def edit(x: Tensor) -> Tensor:
        return mean.to(device=x.device, dtype=x.dtype).expand_as(x).clone()

    return _edit(positions, edit)


def patch_from(
    cache: Mapping[str, Tensor], positions: Positions = None, name: str | None = None
) -> Hook:
    """Replace the activation by the same hook's activation in ``cache`` (activation patching).

    ``cache`` holds full-sequence activations of another run (``capture(..., positions=None)``)
    with the same shape; ``name`` overrides which cache entry to read.
    """
    resolve = _positions(positions)

    def hook(tensor: Tensor, hook: HookPoint) -> Tensor | None:
        source = cache[name or hook.name].to(device=tensor.device, dtype=tensor.dtype)
        if source.shape != tensor.shape:
            raise ValueError(
                f"hook {hook.name!r}: cached activation {tuple(source.shape)} does not match "
                f"{tuple(tensor.shape)}; capture the source run with positions=None on "
                "inputs of the same shape"
            )
        sel = _resolved(resolve, hook, tensor)
        if sel.kind == "all":
            return source
        return sel.scatter(tensor, sel.select(source, hook.name), hook.name)

    return hook


def compose(*hooks: Hook) -> Hook:
    """Apply hooks in order, each seeing the previous one's output (in-place edits included)."""

    def hook(tensor: Tensor, point: HookPoint) -> Tensor | None:
        current = tensor
        for h in hooks:
            new = h(current, point)
            if new is not None:
                current = new
        return current

    return hook

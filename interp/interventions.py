"""Interventions as hook factories: each returns ``fn(tensor, hook)`` for ``model.hooks``.

They compose (``compose(a, b)``), work on any backend, and work inside
``generate``: ``positions`` index the tokens of the current forward call
(``None`` = every position, which is what steering during generation wants).

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

__all__ = [
    "add_direction",
    "compose",
    "mean_ablate",
    "patch_from",
    "project_out",
    "zero_ablate",
]

Hook = Callable[[Tensor, HookPoint], Tensor | None]
Positions = int | Sequence[int] | Tensor | None


def _index(positions: Positions, tensor: Tensor) -> Any:
    """Index for ``tensor[index]`` over ``[batch, pos, ...]``; ``None`` when out of range."""
    if positions is None:
        return slice(None)
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.shape != tensor.shape[:2]:
            return None  # a mask for another sequence length (e.g. a cached generation step)
        return positions.to(tensor.device)
    idx = torch.as_tensor(positions, device=tensor.device).reshape(-1)
    T = tensor.shape[1]
    if bool(((idx >= T) | (idx < -T)).any()):
        return None  # e.g. a single-token generation step after the prompt
    return (slice(None), idx)


def _edit(positions: Positions, edit: Callable[[Tensor], Tensor]) -> Hook:
    def hook(tensor: Tensor, hook: HookPoint) -> Tensor | None:
        if tensor.ndim < 3:
            raise ValueError(
                f"hook {hook.name!r}: interventions expect [batch, pos, ...] activations, "
                f"got shape {tuple(tensor.shape)}"
            )
        index = _index(positions, tensor)
        if index is None:
            return None
        if positions is None:
            return edit(tensor)
        out = tensor.clone()
        out[index] = edit(tensor[index])
        return out

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

    def hook(tensor: Tensor, hook: HookPoint) -> Tensor | None:
        source = cache[name or hook.name].to(device=tensor.device, dtype=tensor.dtype)
        if source.shape != tensor.shape:
            raise ValueError(
                f"hook {hook.name!r}: cached activation {tuple(source.shape)} does not match "
                f"{tuple(tensor.shape)}; capture the source run with positions=None on "
                "inputs of the same shape"
            )
        index = _index(positions, tensor)
        if index is None:
            return None
        out = tensor.clone()
        out[index] = source[index]
        return out

    return hook


def compose(*hooks: Hook) -> Hook:
    """Apply hooks in order, each seeing the previous one's output."""

    def hook(tensor: Tensor, point: HookPoint) -> Tensor | None:
        current = tensor
        for h in hooks:
            new = h(current, point)
            if new is not None:
                current = new
        return None if current is tensor else current

    return hook

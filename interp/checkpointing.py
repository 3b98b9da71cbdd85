"""Gradient (activation) checkpointing for the duration of one call, on any model.

``with checkpointing(model): ...`` wraps the ``forward`` of each decoder block in
``torch.utils.checkpoint`` (non-reentrant: it works with ``torch.autograd.grad`` and
with inputs that do not require grad), and restores every block's own ``forward`` when
the block exits, also after an exception. ``capture_grads(..., gradient_checkpointing=True)``
and ``TrainConfig(gradient_checkpointing=True)`` use it. A block's inner activations are
then dropped after the forward pass and recomputed, block by block, during the backward
pass: memory for activations falls from every block's internals to one block's, for
about one extra forward pass of compute.

Why not ``transformers``' ``gradient_checkpointing_enable``: it only checkpoints modules
in training mode (``self.training``), so it would do nothing for ``capture_grads`` on a
model in eval mode, and switching to training mode would turn dropout on; and it is
persistent model state, where this is scoped to a call.

What it does to hooks (the Chen et al. 2016 trade-off, seen from a hook):

* Hooks on a block's own input and output (``hook_resid_pre``, ``hook_resid_post``) stay
  outside the checkpoint (only ``forward`` is wrapped, not the module call), so they run
  once.
* Forward hooks *inside* a block (``attn.hook_pattern``, ``hook_resid_mid``,
  ``mlp.hook_post``, module-path hooks …) run again when the backward pass recomputes the
  block. An intervention must, and does, apply again: the recomputed activations are then
  the ones the forward pass used, so losses and gradients equal those without
  checkpointing. A hook with side effects (appending to a list, counting calls) can skip
  the second run with ``is_recomputing()``; ``capture_grads`` does so for the activations
  it returns.
* Backward hooks are attached during the forward pass and fire once, in the backward
  pass, on the tensors of the original graph.

Dropout draws the same numbers in the recomputation (``preserve_rng_state``). A block
called with a KV cache raises: the recomputation would write the cache a second time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["blocks_of", "checkpointing", "is_recomputing"]

_depth = [0]  # > 0 while a checkpointed block is being recomputed (no threads in interp)
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


def is_recomputing() -> bool:
    """True while the backward pass recomputes a checkpointed block (hooks inside it run again)."""
    return _depth[0] > 0


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    # try/finally: torch stops a recomputation early by raising through the block.
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1


def blocks_of(model: Any) -> list[nn.Module]:
    """The decoder blocks that ``checkpointing`` wraps.

    A ``HookedModel`` names its own blocks (``blocks.{l}``); for a bare ``nn.Module``
    (a ``transformers`` causal LM, a ``PeftModel``) they are its outermost
    ``GradientCheckpointingLayer`` modules.
    """
    own = getattr(model, "_checkpoint_blocks", None)
    if callable(own):
        return list(own())
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"gradient checkpointing needs a HookedModel or an nn.Module, got {type(model).__name__}"
        )
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks: list[nn.Module] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(
            name.startswith(p + ".") for p in inside
        ):
            blocks.append(module)
            inside.append(name)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no decoder blocks interp can checkpoint (no "
            "transformers GradientCheckpointingLayer); wrap it with interp.load first"
        )
    return blocks


def _checkpointed(inner: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        for key in _CACHE_KWARGS:
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"gradient checkpointing recomputes each block in the backward pass, which "
                    f"would update the KV cache ({key}) twice; run with use_cache=False"
                )
        calls = 0

        def run(*a: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                return inner(*a, **kwargs)
            with _recomputing():
                return inner(*a, **kwargs)

        return checkpoint(run, *args, use_reentrant=False)

    return forward


_MISSING = object()


@contextlib.contextmanager
def checkpointing(model: Any, enabled: bool = True) -> Iterator[None]:
    """Checkpoint every decoder block of ``model`` inside the ``with`` block (see the module
    docstring); with ``enabled=False`` it does nothing. Each block's ``forward`` is restored
    on exit, also after an exception; nested use is fine."""
    if not enabled:
        yield
        return
    patched: list[tuple[nn.Module, Any]] = []
    try:
        # Through __dict__, not setattr: some blocks (TransformerBridge's) route attribute
        # writes to the module they wrap.
        for block in blocks_of(model):
            patched.append((block, block.__dict__.get("forward", _MISSING)))
            block.__dict__["forward"] = _checkpointed(block.forward)
        yield
    finally:
        for block, previous in reversed(patched):
            if previous is _MISSING:
                block.__dict__.pop("forward", None)
            else:
                block.__dict__["forward"] = previous

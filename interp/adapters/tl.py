"""TransformerLens backend: ``HookedTransformer`` and ``TransformerBridge`` under native names.

TransformerLens already speaks the canonical vocabulary, so this adapter adds
what it lacks: glob patterns, an error for unknown names (the bridge skips
them silently), replacement checks, and removal of exactly the handles a
context added.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from interp.hooks import HookedModelBase, HookFn, HookPoint, ModelConfig, checked

__all__ = ["TLHookedModel", "is_transformer_lens"]


def is_transformer_lens(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod.startswith("transformer_lens") and hasattr(obj, "hook_dict")


class _Handle:
    def __init__(self, point: Any, handle: Any, direction: str):
        self.point, self.handle, self.direction = point, handle, direction

    def remove(self) -> None:
        hooks = self.point.fwd_hooks if self.direction == "fwd" else self.point.bwd_hooks
        if self.handle in hooks:
            hooks.remove(self.handle)
        self.handle.hook.remove()


class TLHookedModel(HookedModelBase):
    """A ``HookedModel`` over a ``HookedTransformer`` or a ``TransformerBridge``."""

    def __init__(self, model: nn.Module, tokenizer: Any = None):
        if not is_transformer_lens(model):
            raise TypeError(f"expected a TransformerLens model, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self._points: dict[str, Any] = dict(model.hook_dict)
        self._hook_names = tuple(self._points)
        c = model.cfg
        n_experts = int(getattr(c, "num_experts", None) or 0)
        self.cfg = ModelConfig(
            n_layers=int(c.n_layers),
            d_model=int(c.d_model),
            d_vocab=int(c.d_vocab),
            n_heads=int(c.n_heads),
            family=str(getattr(c, "original_architecture", None) or type(model).__name__),
            n_experts=n_experts,
            experts_per_token=int(getattr(c, "experts_per_token", None) or 0),
            moe_layers=tuple(range(int(c.n_layers))) if n_experts else (),
        )

    def _register(self, name: str, fn: HookFn, point: HookPoint, backward: bool) -> list[Any]:
        hp = self._points[name]
        direction = "bwd" if backward else "fwd"
        call = checked(fn, point)
        hp.add_hook(lambda tensor, hook: call(tensor), dir=direction)
        handles = hp.fwd_hooks if direction == "fwd" else hp.bwd_hooks
        return [_Handle(hp, handles[-1], direction)]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw: Any) -> Tensor:
        if attention_mask is not None and bool((attention_mask == 0).any()):
            kw["attention_mask"] = attention_mask
        out = self.model(input_ids, **kw)
        return out.logits if hasattr(out, "logits") else out

    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.model.generate(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

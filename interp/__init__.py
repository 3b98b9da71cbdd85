"""interp: typed, composable interpretability primitives over TransformerLens-style hook points.

One hook vocabulary (``blocks.{l}.hook_resid_post`` …) over Hugging Face
``transformers`` models (dense, MoE, PEFT-wrapped), ``HookedTransformer`` and
``TransformerBridge``. Submodules are imported lazily: ``import interp`` does
no work beyond importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "activations",
    "adapters",
    "alignment",
    "cache",
    "chat",
    "checkpointing",
    "data",
    "datasets",
    "directions",
    "families",
    "gradients",
    "hooks",
    "interventions",
    "judges",
    "lens",
    "losses",
    "models",
    "moe",
    "patching",
    "positions",
    "probes",
    "routing",
    "runs",
    "sae",
    "spans",
    "stats",
    "train",
    "viz",
}
# Public callables re-exported at the top level: name -> defining module.
_EXPORTS = {
    "ActivationCache": "interp.cache",
    "HookedModel": "interp.hooks",
    "HookPoint": "interp.hooks",
    "capture": "interp.activations",
    "capture_dataset": "interp.runs",
    "capture_grads": "interp.gradients",
    "load": "interp.models",
    "tiny": "interp.families",
}

__all__ = sorted(_SUBMODULES | set(_EXPORTS))


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"interp.{name}")
    else:
        raise AttributeError(f"module 'interp' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

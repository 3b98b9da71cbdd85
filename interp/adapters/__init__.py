"""Model backends implementing the ``HookedModel`` protocol (the only code that knows module paths)."""

from interp.adapters.hf import HFHookedModel

__all__ = ["HFHookedModel", "TLHookedModel"]


def __getattr__(name: str):
    if name == "TLHookedModel":  # imports transformer_lens lazily
        from interp.adapters.tl import TLHookedModel

        return TLHookedModel
    raise AttributeError(name)

"""The hook core: one TransformerLens-style vocabulary over every backend.

A ``HookedModel`` exposes canonical hook names (``blocks.{l}.hook_resid_post``
…), a ``hooks(fwd=..., bwd=...)`` context manager, ``run_with_hooks`` and
``run_with_cache``. Hook functions have TransformerLens's signature
``fn(tensor, hook) -> tensor | None``: returning a tensor replaces the
activation, so hooks written for TransformerLens work unchanged.

Design rules enforced here, for every adapter:

* Names are resolved before anything is registered. Glob patterns
  (``blocks.*.hook_resid_post``) expand against ``hook_names``; a name or
  pattern that matches nothing raises ``HookNameError`` listing the closest
  valid names — never a silent no-op.
* Every handle is registered inside a context whose ``finally`` removes it,
  so after any exception the model has exactly the hooks it had before.
* A replacement of the wrong shape or dtype raises ``HookReplacementError``
  naming the hook.

Adapters subclass ``HookedModelBase`` and implement ``_register``.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "HookFn",
    "HookNameError",
    "HookPoint",
    "HookReplacementError",
    "HookedModel",
    "HookedModelBase",
    "ModelConfig",
    "resolve_names",
]

HookFn = Callable[..., Tensor | None]
HookSpec = tuple[str, HookFn]

_LAYER_RE = re.compile(r"blocks\.(\d+)\.")


class HookNameError(KeyError):
    """A hook name or pattern that the model does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class HookReplacementError(ValueError):
    """A hook function returned a tensor that cannot replace the activation."""


@dataclass
class HookPoint:
    """The ``hook`` argument passed to hook functions (TransformerLens-compatible subset)."""

    name: str
    ctx: dict[str, Any] = field(default_factory=dict)

    def layer(self) -> int:
        m = _LAYER_RE.match(self.name)
        if m is None:
            raise ValueError(f"hook {self.name!r} is not inside a block")
        return int(m.group(1))

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


@dataclass(frozen=True)
class ModelConfig:
    """What studies need to know about a model, on every backend."""

    n_layers: int
    d_model: int
    d_vocab: int
    n_heads: int
    family: str
    n_experts: int = 0
    experts_per_token: int = 0
    moe_layers: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0


PATH_SUFFIXES = (".hook_in", ".hook_out")
_INDEX_RE = re.compile(r"(?<=\.)\d+(?=\.)")


def resolve_names(
    patterns: str | Iterable[str],
    available: Sequence[str],
    modules: Sequence[str] | Callable[[], Sequence[str]] = (),
) -> list[str]:
    """Expand names and glob patterns against ``available``, keeping model order.

    ``modules`` is a second namespace that is not listed in ``hook_names`` (on Hugging Face
    models ``<module path>.hook_in`` / ``.hook_out`` for every submodule; a callable is
    called only when needed): a name or pattern ending in ``.hook_in`` / ``.hook_out``
    matches in it too, any other pattern (``"*"``, ``"blocks.*.hook_*"``) does not, so
    ``run_with_cache()`` and ``"*"`` never pick up thousands of module boundaries.
    Matches come in model order, ``available``'s first, then ``modules``' in their order.

    Raises ``HookNameError`` with the closest valid names (of both namespaces) when a name
    or a pattern matches nothing.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    avail = set(available)
    mods: Sequence[str] | None = None
    wanted: set[str] = set()
    extra: dict[str, None] = {}  # module names, in order of first match
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"hook names must be strings, got {type(pat).__name__}: {pat!r}")
        if pat in avail:
            wanted.add(pat)
            continue
        glob = any(ch in pat for ch in "*?[")
        hits = fnmatch.filter(available, pat) if glob else []
        mod_hits: list[str] = []
        if pat.endswith(PATH_SUFFIXES):
            if mods is None:
                mods = list(modules() if callable(modules) else modules)
            if glob:
                mod_hits = fnmatch.filter(mods, pat)
            elif pat in set(mods):
                mod_hits = [pat]
        if hits or mod_hits:
            wanted.update(hits)
            extra.update(dict.fromkeys(mod_hits))
            continue
        if mods is None:
            mods = list(modules() if callable(modules) else modules)
        raise HookNameError(_unknown_name_message(pat, available, mods))
    return [n for n in available if n in wanted] + [n for n in extra if n not in wanted]


def _unknown_name_message(name: str, available: Sequence[str], modules: Sequence[str] = ()) -> str:
    # Module paths are candidates only for names that look like one, so a typo in a
    # canonical name is answered with canonical names.
    path_like = name.endswith(PATH_SUFFIXES) or not name.startswith(("blocks.", "hook_", "ln_"))
    pool = [*available, *modules] if path_like else list(available)
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.5)
    if not close:
        # Compare against index-generic forms too, so "blocks.99.hook_resid_post" or
        # "model.layers.99.mlp.hook_in" suggest real layers rather than nothing.
        generic = sorted({_INDEX_RE.sub("*", n) for n in pool})
        close = difflib.get_close_matches(_INDEX_RE.sub("*", name), generic, n=5, cutoff=0.4)
    hint = ", ".join(close) if close else ", ".join(available[:8]) + ", …"
    more = (
        f", and <path>.hook_in / <path>.hook_out for any of the model's {len(modules) // 2} "
        "module paths (named_modules())"
        if modules
        else ""
    )
    if modules and not name.endswith(PATH_SUFFIXES) and fnmatch.filter(modules, name + ".hook_*"):
        more += f"; a module path needs a suffix: {name + '.hook_out'!r}"
    return (
        f"unknown hook name {name!r}. Closest valid names: {hint}. "
        f"See model.hook_names for all {len(available)} names{more}."
    )


def checked(fn: HookFn, point: HookPoint) -> Callable[[Tensor], Tensor | None]:
    """Call ``fn(tensor, point)``; return what the model must use instead, or ``None``.

    The contract every adapter relies on:

    * ``None`` means the activation is unchanged: ``fn`` returned ``None`` (or the same
      tensor) *and* did not edit it in place.
    * Otherwise the returned tensor replaces the activation. A hook that edits its input
      in place (``act[:] = 0; return act``, or the same without ``return``) gets the
      mutated tensor back, detected through the tensor's version counter, so an adapter
      that derives an activation (``resid_mid`` on Hugging Face models) or re-runs a
      rule on it (router logits) writes the edit back instead of dropping it.
    * A replacement of another shape or dtype raises ``HookReplacementError``.
    """

    def call(tensor: Tensor) -> Tensor | None:
        version = tensor._version
        out = fn(tensor, point)
        if out is None or out is tensor:
            return tensor if tensor._version != version else None
        if not isinstance(out, Tensor):
            raise HookReplacementError(
                f"hook {point.name!r} returned {type(out).__name__}; return a Tensor or None"
            )
        if out.shape != tensor.shape or out.dtype != tensor.dtype:
            raise HookReplacementError(
                f"hook {point.name!r} returned shape {tuple(out.shape)} {out.dtype}, but the "
                f"activation is {tuple(tensor.shape)} {tensor.dtype}; return a tensor of the "
                "same shape and dtype (or None to leave it unchanged)"
            )
        return out

    return call


def _require_grad(tensor: Tensor, hook: HookPoint) -> Tensor | None:
    if torch.is_grad_enabled() and not tensor.requires_grad and tensor.is_floating_point():
        return tensor.requires_grad_()  # a leaf here: weights are frozen
    return None


@runtime_checkable
class HookedModel(Protocol):
    """What every backend provides (see ``HookedModelBase``)."""

    cfg: ModelConfig
    tokenizer: Any
    model: torch.nn.Module

    @property
    def hook_names(self) -> tuple[str, ...]: ...

    def resolve(self, names: str | Iterable[str]) -> list[str]: ...

    def hooks(
        self, fwd: Iterable[HookSpec] = (), bwd: Iterable[HookSpec] = ()
    ) -> contextlib.AbstractContextManager[HookedModel]: ...

    def run_with_hooks(self, *args: Any, fwd_hooks=(), bwd_hooks=(), **kwargs: Any) -> Tensor: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor: ...


class HookedModelBase:
    """Shared machinery: name resolution, the hooks context, run helpers.

    Subclasses set ``model``, ``tokenizer``, ``cfg`` and ``_hook_names`` and
    implement ``_register(name, fn, point, backward) -> list[handle]`` and
    ``forward(input_ids, attention_mask=None, **kw) -> logits``.
    """

    model: torch.nn.Module
    tokenizer: Any
    cfg: ModelConfig
    _hook_names: tuple[str, ...]

    @property
    def hook_names(self) -> tuple[str, ...]:
        return self._hook_names

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    # -- hooks -----------------------------------------------------------------
    def _register(self, name: str, fn: HookFn, point: HookPoint, backward: bool) -> list[Any]:
        raise NotImplementedError

    def _expand(self, specs: Iterable[Any], kind: str) -> list[tuple[str, HookFn]]:
        out = []
        for spec in specs:
            if not (isinstance(spec, tuple | list) and len(spec) == 2 and callable(spec[1])):
                raise TypeError(
                    f"{kind} hooks must be (name, fn) pairs with fn(tensor, hook); got {spec!r}"
                )
            name, fn = spec
            out.extend((n, fn) for n in self._resolve(name))
        return out

    def _module_names(self) -> Sequence[str]:
        """Names that resolve but are not listed in ``hook_names`` (see ``resolve_names``):
        ``<module path>.hook_in`` / ``.hook_out`` on backends that hook modules by path."""
        return ()

    def _resolve(self, pattern: str) -> list[str]:
        # Patterns repeat call after call (capture in a loop); resolve each once per model.
        cache = self.__dict__.setdefault("_resolved", {})
        names = cache.get(pattern) if isinstance(pattern, str) else None
        if names is None:
            names = resolve_names(pattern, self._hook_names, self._module_names)
            if isinstance(pattern, str):
                cache[pattern] = names
        return names

    def resolve(self, names: str | Iterable[str]) -> list[str]:
        """Expand names/glob patterns to concrete hook names: ``hook_names`` in model order,
        then module-path names (``<path>.hook_in`` / ``.hook_out``) in the order asked."""
        if isinstance(names, str):
            return self._resolve(names)
        found = dict.fromkeys(n for pattern in names for n in self._resolve(pattern))
        listed = [n for n in self._hook_names if n in found]
        known = set(listed)
        return listed + [n for n in found if n not in known]

    @contextlib.contextmanager
    def hooks(self, fwd: Iterable[Any] = (), bwd: Iterable[Any] = ()) -> Iterator[HookedModelBase]:
        """Register forward/backward hooks for the duration of the block.

        Nested use is fine: each context removes exactly the handles it added.
        """
        # Resolve every name first, so a bad name registers nothing.
        fwd_list = self._expand(fwd, "forward")
        bwd_list = self._expand(bwd, "backward")
        if bwd_list and "hook_embed" in self._hook_names:
            # With frozen weights nothing downstream of the embedding requires
            # grad and backward hooks would never fire; make the root require it.
            fwd_list.insert(0, ("hook_embed", _require_grad))
        handles: list[Any] = []
        try:
            for name, fn in fwd_list:
                handles.extend(self._register(name, fn, HookPoint(name), backward=False))
            for name, fn in bwd_list:
                handles.extend(self._register(name, fn, HookPoint(name), backward=True))
            yield self
        finally:
            for h in reversed(handles):
                h.remove()

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Iterable[Any] = (),
        bwd_hooks: Iterable[Any] = (),
        **kwargs: Any,
    ) -> Tensor:
        """Run one forward pass with temporary hooks (TransformerLens's name and signature)."""
        with self.hooks(fwd=fwd_hooks, bwd=bwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(
        self, *args: Any, names_filter: str | Iterable[str] | None = None, **kwargs: Any
    ):
        """Forward pass returning ``(logits, ActivationCache)`` of full-sequence activations."""
        from interp.activations import capture

        names = names_filter if names_filter is not None else list(self._hook_names)
        batch = args[0] if args else kwargs.pop("input", None)
        return capture(self, batch, names, return_logits=True, **kwargs)

    # -- running ---------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw: Any) -> Tensor:
        raise NotImplementedError

    def __call__(self, input: Any, attention_mask: Tensor | None = None, **kw: Any) -> Tensor:
        from interp.positions import as_batch, running

        batch = as_batch(self, input, attention_mask)
        with running(batch):  # interventions resolve named positions against it
            return self.forward(batch.input_ids, batch.attention_mask, **kw)

    def to_tokens(self, text: str | Sequence[str], padding_side: str = "right"):
        """Tokenize text(s) into a padded ``Batch`` on the model's device."""
        from interp.positions import tokenize

        return tokenize(self, text, padding_side=padding_side)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"{type(self).__name__}(family={c.family!r}, n_layers={c.n_layers}, "
            f"d_model={c.d_model}, n_experts={c.n_experts})"
        )

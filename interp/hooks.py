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

from interp import conventions

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
_PATH_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


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
        """The block index: ``blocks.{l}.…``, or the layer list index of a module path
        (``model.layers.{l}.…``, ``transformer.h.{l}.…``, ``gpt_neox.layers.{l}.…``)."""
        m = _LAYER_RE.match(self.name) or _PATH_LAYER_RE.search(self.name)
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
    implement ``_register(name, fn, point, backward) -> list[handle]``,
    ``_forward(input_ids, attention_mask, **kw) -> logits`` and, when their forward
    takes keyword arguments of its own, ``_backend_kwargs()``. ``forward`` / ``__call__``
    add TransformerLens's conventions on top (``interp.conventions``).
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
        """Where inputs go: the input embedding's execution device on a model dispatched by
        accelerate (``device_map``, whose offloaded weights sit on ``meta`` until used),
        else the first parameter's device."""
        if getattr(self.model, "hf_device_map", None):
            get = getattr(self.model, "get_input_embeddings", None)
            embed = get() if callable(get) else None
            hook = getattr(embed, "_hf_hook", None)
            execution = getattr(hook, "execution_device", None)
            if execution is not None:
                return torch.device(execution)
            for p in embed.parameters() if embed is not None else ():
                if p.device.type != "meta":
                    return p.device
        for p in self.model.parameters():
            if p.device.type != "meta":
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

    @contextlib.contextmanager
    def generating(self, batch: Any, cached: bool = True) -> Iterator[None]:
        """The context ``generate`` runs in: ``batch`` is the running batch and the forward
        passes are counted at ``hook_embed``, so interventions with positions edit the
        prompt's pass only (``interp.positions.decoding_step``). ``cached=False``: each step
        recomputes the prefix, and positions are refused at the second step."""
        from interp.positions import running

        with (
            running(batch, generating=True, cached=cached) as state,
            self.hooks(fwd=[("hook_embed", state.count)]),
        ):
            yield

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Iterable[Any] = (),
        bwd_hooks: Iterable[Any] = (),
        **kwargs: Any,
    ) -> Any:
        """One forward pass with temporary hooks (TransformerLens's name and signature).

        A hook's name may be a name, a glob or, as in TransformerLens, a predicate
        ``lambda name: ...``. Keyword arguments are ``model(...)``'s (``return_type``,
        ``stop_at_layer`` …); ``reset_hooks_end=True`` is what always happens.
        """
        if kwargs.pop("reset_hooks_end", True) is not True:
            raise TypeError(conventions.accepted_message("reset_hooks_end", self._accepted()))
        fwd = self._hook_specs(fwd_hooks)
        bwd = self._hook_specs(bwd_hooks)
        with self.hooks(fwd=fwd, bwd=bwd):
            return self(*args, **kwargs)

    def _hook_specs(self, specs: Iterable[Any]) -> list[Any]:
        """Expand TransformerLens's ``(predicate, fn)`` hook pairs into ``(name, fn)`` pairs."""
        out: list[Any] = []
        for spec in specs:
            if isinstance(spec, tuple | list) and len(spec) == 2 and callable(spec[0]):
                names, _ = conventions.filter_names(self, spec[0])
                out.extend((n, spec[1]) for n in names)
            else:
                out.append(spec)
        return out

    def run_with_cache(
        self,
        *args: Any,
        names_filter: Any = None,
        remove_batch_dim: bool = False,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """One forward pass returning ``(output, ActivationCache)`` of full-sequence activations.

        As in TransformerLens: ``names_filter`` is a name, a glob, a list of them, a
        predicate ``lambda name: ...`` or ``None`` (every hook point); the cache holds what
        fired (``None`` and predicates keep whatever fired; each name or glob given
        explicitly must fire at least once, unless ``stop_at_layer`` ends the pass before
        it). ``remove_batch_dim=True`` drops the batch axis of a one-row batch; ``device``
        is where the cached tensors are stored. The output follows ``return_type``. The
        pass runs in the caller's grad mode (the cached tensors are detached).
        """
        from interp.cache import ActivationCache

        accepted = ("names_filter", "remove_batch_dim", "device", *self._accepted())
        conventions.check_kwargs(kwargs, accepted)
        input, mask = self._input_args(args, kwargs)
        names, patterns = conventions.filter_names(self, names_filter)
        batch = self._as_batch(
            input, mask, kwargs.pop("prepend_bos", None), kwargs.pop("padding_side", None)
        )
        if remove_batch_dim and batch.input_ids.shape[0] != 1:
            raise ValueError(
                f"remove_batch_dim=True needs a batch of one row; this batch has "
                f"{batch.input_ids.shape[0]} (drop the flag, or index the cache)"
            )
        store: dict[str, Tensor] = {}

        def keep(tensor: Tensor, hook: HookPoint) -> None:
            value = tensor.detach()
            if remove_batch_dim:
                value = value[0]
            store[hook.name] = value if device is None else value.to(device)

        with self.hooks(fwd=[(n, keep) for n in names]):
            out = self.forward(batch.input_ids, batch.attention_mask, **kwargs)
        if kwargs.get("stop_at_layer") is None:
            for pattern in patterns:
                if not any(n in store for n in self.resolve(pattern)):
                    raise RuntimeError(
                        f"no hook matching {pattern!r} fired during the forward pass; this "
                        "model lists it but its forward never reaches it"
                    )
        cache = ActivationCache(
            {n: store[n] for n in names if n in store},
            {
                "positions": None,
                "has_batch_dim": not remove_batch_dim,
                "n_layers": self.cfg.n_layers,
            },
        )
        return out, cache

    # -- running ---------------------------------------------------------------
    def _forward(self, input_ids: Tensor, attention_mask: Tensor | None, **kw: Any) -> Tensor:
        """The backend's own forward pass: logits of ``[batch, pos]`` ids (adapters implement)."""
        raise NotImplementedError

    def _backend_kwargs(self) -> tuple[str, ...]:
        """Keyword arguments the backend's own forward takes, passed through unchanged."""
        return ()

    def _accepted(self, text: bool = True) -> tuple[str, ...]:
        base = conventions.CALL_ARGS if text else ("attention_mask", *conventions.FORWARD_ARGS)
        return (*base, *self._backend_kwargs())

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        stop_at_layer: int | None = None,
        **kw: Any,
    ) -> Any:
        """Run ``[batch, pos]`` token ids; returns what ``return_type`` asks for.

        ``return_type``: ``"logits"`` (default), ``"loss"`` (TransformerLens's mean
        next-token cross-entropy, padding excluded; ``[batch, pos-1]`` with
        ``loss_per_token=True``), ``"both"`` (``Output(logits, loss)``) or ``None``.
        ``stop_at_layer=L`` returns the residual stream entering block ``L`` without
        running it or anything after it. Other keyword arguments go to the backend's own
        forward when it takes them (e.g. ``logits_to_keep`` on Hugging Face models);
        anything else raises ``TypeError``. See ``interp.conventions``.
        """
        if kw:
            conventions.check_kwargs(kw, self._accepted(text=False))
        if return_type == "logits" and stop_at_layer is None and not loss_per_token:
            return self._forward(input_ids, attention_mask, **kw)
        conventions.check_return_type(return_type)
        if loss_per_token and return_type not in ("loss", "both"):
            raise ValueError(
                f"loss_per_token=True needs return_type='loss' or 'both', got {return_type!r}"
            )
        if stop_at_layer is not None:
            layer = conventions.stop_layer(stop_at_layer, self.cfg.n_layers)
            name = conventions.stop_hook_name(layer, self.cfg.n_layers)
            try:
                with self.hooks(fwd=[(name, conventions.raise_stop)]):
                    self._forward(input_ids, attention_mask, **kw)
            except conventions.StopForward as stop:
                return stop.resid
            raise RuntimeError(f"the forward pass never reached {name!r}")
        logits = self._forward(input_ids, attention_mask, **kw)
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if logits.shape[:2] != input_ids.shape:
            raise ValueError(
                f"return_type={return_type!r} needs logits at every position; these are "
                f"{tuple(logits.shape[:2])} for ids {tuple(input_ids.shape)} (logits_to_keep?)"
            )
        loss = conventions.lm_cross_entropy_loss(
            logits, input_ids, attention_mask, per_token=loss_per_token
        )
        return loss if return_type == "loss" else conventions.Output(logits, loss)

    def __call__(
        self,
        input: Any,
        attention_mask: Tensor | None = None,
        *,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        **kw: Any,
    ) -> Any:
        """Run text(s), ids, a dict or a ``Batch``; keyword arguments as in ``forward``.

        ``prepend_bos`` / ``padding_side`` say how text is tokenized (see ``tokenize``);
        they are refused for input that is already tokens.
        """
        if kw:
            conventions.check_kwargs(kw, self._accepted())
        from interp.positions import running

        batch = self._as_batch(input, attention_mask, prepend_bos, padding_side)
        with running(batch):  # interventions resolve named positions against it
            return self.forward(batch.input_ids, batch.attention_mask, **kw)

    def _input_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        if len(args) > 2:
            raise TypeError(
                f"expected (input, attention_mask=None) positionally, got {len(args)} "
                "positional arguments; pass the rest by keyword"
            )
        if args:
            input = args[0]
        elif "input" in kwargs:
            input = kwargs.pop("input")
        else:
            raise TypeError("missing the input (text, token ids, a dict or a Batch)")
        mask = args[1] if len(args) > 1 else kwargs.pop("attention_mask", None)
        return input, mask

    def _as_batch(self, input: Any, attention_mask: Any, prepend_bos: Any, padding_side: Any):
        from interp.positions import as_batch

        if attention_mask is not None and not isinstance(attention_mask, Tensor):
            raise TypeError(
                "the second positional argument is attention_mask (a [batch, pos] tensor); "
                f"got {type(attention_mask).__name__}: pass return_type= and the like by keyword"
            )
        if prepend_bos is not None or padding_side is not None:
            is_text = isinstance(input, str) or (
                isinstance(input, list | tuple)
                and bool(input)
                and all(isinstance(t, str) for t in input)
            )
            if not is_text:
                raise ValueError(
                    "prepend_bos= and padding_side= say how text is tokenized; this input is "
                    f"{type(input).__name__}, already tokens (tokenize with model.tokenize(text, "
                    "padding_side=..., prepend_bos=...) instead)"
                )
            input = conventions.tokenize(self, input, padding_side, prepend_bos)
        return as_batch(self, input, attention_mask)

    def tokenize(
        self,
        text: str | Sequence[str],
        padding_side: str = "right",
        prepend_bos: bool | None = None,
    ):
        """Tokenize text(s) into a padded ``Batch`` (ids, attention mask) on the model's device.

        ``prepend_bos=None`` keeps the tokenizer's own choice; ``True`` / ``False`` make
        every row start / not start with the BOS token, as in TransformerLens.
        """
        return conventions.tokenize(self, text, padding_side, prepend_bos)

    def to_tokens(
        self,
        input: str | Sequence[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
    ) -> Tensor:
        """TransformerLens's ``to_tokens``: a ``[batch, pos]`` tensor of token ids.

        Padding is on ``padding_side`` (default right) and the mask is not returned: use
        ``tokenize`` for a ``Batch`` that keeps it. ``prepend_bos=None`` keeps the
        tokenizer's own choice, where TransformerLens's default prepends a BOS token.
        """
        ids = conventions.tokenize(self, input, padding_side, prepend_bos).input_ids
        return ids if move_to_device else ids.cpu()

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"{type(self).__name__}(family={c.family!r}, n_layers={c.n_layers}, "
            f"d_model={c.d_model}, n_experts={c.n_experts})"
        )

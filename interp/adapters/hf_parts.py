"""Norms, MLP internals, the unembedding, and any module by path, on the Hugging Face backend.

Names, shapes and meaning are TransformerBridge's (compatibility mode; the tests compare
captures and edits with the Bridge on identical weights):

* ``blocks.{l}.ln1`` / ``ln2`` (and Gemma-2's ``ln1_post`` / ``ln2_post``), ``ln_final``:
  ``.hook_scale`` ``[batch, pos, 1]`` is ``sqrt(mean(x_c²) + eps)`` and
  ``.hook_normalized`` ``[batch, pos, d_model]`` is ``x_c / scale``, *before* the norm's
  weight (and bias), as in TransformerLens; ``x_c`` is the input, centred for LayerNorm.
  Both are float32 for half-precision models, as on the Bridge and in TransformerLens
  (that is the precision ``transformers`` normalizes in).
* ``blocks.{l}.mlp.hook_pre`` the gate projection's output (the input projection's for
  ungated MLPs: GPT-2, GPT-NeoX), ``mlp.hook_pre_linear`` the up projection's output
  (gated MLPs only), ``mlp.hook_post`` the down projection's input ``[batch, pos, d_mlp]``.
  On MoE layers the Bridge aliases ``mlp.hook_pre`` / ``mlp.hook_post`` to the MoE
  block's input / output ``[batch, pos, d_model]``, and so do we; no per-expert internals
  (``transformers`` fuses the experts' weights into one tensor).
* ``hook_unembed``: the unembedding's output, i.e. the logits before any soft-capping
  (Gemma-2), ``[batch, pos, d_vocab]`` (the Bridge's ``unembed.hook_out``).
* ``<path>.hook_in`` / ``<path>.hook_out`` for any ``<path>`` of the ``transformers``
  model's ``named_modules()``: the module's first positional input (or its
  ``hidden_states`` keyword, or its first tensor keyword) and its output (or the output's
  first element). For a PEFT-wrapped model the paths are those of the wrapped
  ``transformers`` model (``model.layers.3.mlp``, as on the unwrapped model and in
  nnsight on it), not of the wrapper (``base_model.model.model.layers.3.mlp``); LoRA
  modules injected into it are paths too (``...q_proj.lora_A.default``). These names are
  not in ``hook_names`` (thousands of them would make ``run_with_cache()`` capture every
  module); a name or glob ending in ``.hook_in`` / ``.hook_out`` resolves against them.

Nothing here costs anything until a hook is registered: every name is a plain torch
module hook that exists only inside ``model.hooks(...)``. Norm names need the norm's
intermediate values, which ``transformers`` never materializes as a module boundary, so
one forward hook per norm module (registered while any of its names is hooked, first in
line so ``hook_out``-style hooks see its edits) recomputes them from the norm's input
exactly as the module does; when nothing was edited it returns ``None`` and the model's
own output is used bit for bit. After an edit (or with a backward hook, which needs the
tensor in the graph) the output is recomputed from the hooked values with the module's
weight, so the edit takes effect and gradients flow through it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from interp.adapters.hf import _first, _get, _input_hook, _output_hook, _with_first
from interp.hooks import PATH_SUFFIXES

__all__ = ["global_names", "layer_names", "path_names", "register"]

# Bridge name of each norm -> attribute of the decoder layer, per family.
_LLAMA_NORMS = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
_GEMMA_NORMS = {
    "ln1": "input_layernorm",
    "ln1_post": "post_attention_layernorm",
    "ln2": "pre_feedforward_layernorm",
    "ln2_post": "post_feedforward_layernorm",
}
_NORMS: dict[str, dict[str, str]] = {
    "gemma2": _GEMMA_NORMS,
    "gemma3_text": _GEMMA_NORMS,
    "gpt2": {"ln1": "ln_1", "ln2": "ln_2"},
    # OLMo-2 normalizes the sublayers' outputs (post-norm): no pre-norm ln1/ln2 to expose.
    "olmo2": {},
}
# (hook_pre, hook_pre_linear, hook_post) submodules of a dense MLP: gated first.
_MLPS: tuple[tuple[str, str | None, str], ...] = (
    ("gate_proj", "up_proj", "down_proj"),
    ("c_fc", None, "c_proj"),  # GPT-2
    ("dense_h_to_4h", None, "dense_4h_to_h"),  # GPT-NeoX
    ("fc1", None, "fc2"),  # Phi
)
_SLOTS = ("hook_scale", "hook_normalized")


# -- the _Part protocol (interp.adapters.hf) -----------------------------------------------
def layer_names(adapter: Any, layer: int) -> list[str]:
    names = []
    block = f"blocks.{layer}."
    norms = _layer_norms(adapter, layer)
    mlp = _mlp_parts(adapter, layer)
    for ln in ("ln1", "ln1_post", "ln2"):
        if ln in norms:
            names += [f"{block}{ln}.hook_scale", f"{block}{ln}.hook_normalized"]
    names += [f"{block}mlp.{kind}" for kind in mlp]
    if "ln2_post" in norms:
        names += [f"{block}ln2_post.hook_scale", f"{block}ln2_post.hook_normalized"]
    return names


def global_names(adapter: Any) -> list[str]:
    names = []
    if _norm_kind(_get(adapter._base, adapter.layout.final_norm)) is not None:
        names += ["ln_final.hook_scale", "ln_final.hook_normalized"]
    if _unembed(adapter) is not None:
        names.append("hook_unembed")
    return names


def register(adapter: Any, name: str, call: Any, backward: bool) -> list[Any] | None:
    if name.endswith(PATH_SUFFIXES):
        path, _, end = name.rpartition(".")
        module = adapter._base.get_submodule(path)
        hook = _path_input_hook if end == "hook_in" else _path_output_hook
        return [hook(module, name, call, backward)]
    if name == "hook_unembed":
        return [_output_hook(_unembed(adapter), call, backward)]
    parts = name.split(".")
    if parts[0] == "ln_final" and parts[1] in _SLOTS:
        module = _get(adapter._base, adapter.layout.final_norm)
        return [_norm_hook(module, parts[1], call, backward)]
    if parts[0] != "blocks" or len(parts) != 4:
        return None
    layer, owner, kind = int(parts[1]), parts[2], parts[3]
    if owner == "mlp":
        target = _mlp_parts(adapter, layer).get(kind)
        if target is None:
            return None
        module, is_input = target
        hook = _input_hook if is_input else _output_hook
        return [hook(module, call, backward)]
    norm = _layer_norms(adapter, layer).get(owner)
    if norm is None or kind not in _SLOTS:
        return None
    return [_norm_hook(norm, kind, call, backward)]


def path_names(adapter: Any) -> list[str]:
    """``<path>.hook_in`` / ``<path>.hook_out`` for every submodule of the HF model."""
    names = []
    for path, module in adapter._base.named_modules():
        # Containers have no forward of their own, so a hook on them would never fire.
        if path and not isinstance(module, nn.ModuleList | nn.ModuleDict):
            names += [path + ".hook_in", path + ".hook_out"]
    return names


# -- what each layer has --------------------------------------------------------------------
def _layer_norms(adapter: Any, layer: int) -> dict[str, nn.Module]:
    table = _NORMS.get(getattr(adapter._base.config, "model_type", ""), _LLAMA_NORMS)
    block = adapter._layers[layer]
    out = {}
    for ln, attr in table.items():
        module = getattr(block, attr, None)
        if module is not None and _norm_kind(module) is not None:
            out[ln] = module
    return out


def _mlp_parts(adapter: Any, layer: int) -> dict[str, tuple[nn.Module, bool]]:
    """Bridge MLP name -> (module, hook its input?) for layer ``layer``."""
    mlp = getattr(adapter._layers[layer], "mlp", None)
    if mlp is None:
        return {}
    if layer in adapter._moe_layers:
        return {"hook_pre": (mlp, True), "hook_post": (mlp, False)}
    for pre, pre_linear, post in _MLPS:
        if (
            hasattr(mlp, pre)
            and hasattr(mlp, post)
            and (pre_linear is None or hasattr(mlp, pre_linear))
        ):
            parts = {"hook_pre": (getattr(mlp, pre), False)}
            if pre_linear is not None:
                parts["hook_pre_linear"] = (getattr(mlp, pre_linear), False)
            parts["hook_post"] = (getattr(mlp, post), True)
            return parts
    return {}


def _unembed(adapter: Any) -> nn.Module | None:
    get = getattr(adapter._base, "get_output_embeddings", None)
    return get() if callable(get) else None


# -- norms ------------------------------------------------------------------------------------
def _norm_kind(module: nn.Module) -> str | None:
    """``"layer"`` (LayerNorm), ``"rms"`` (``weight * x̂``), ``"rms_offset"`` (Gemma's
    ``(1 + weight) * x̂``), or ``None`` for a module this file does not know."""
    if isinstance(module, nn.LayerNorm):
        return "layer"
    cls = type(module).__name__
    if "RMSNorm" in cls and _eps(module) is not None:
        return "rms_offset" if cls.startswith("Gemma") else "rms"
    return None


def _eps(module: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, float | int):
            return float(value)
    return None


class _NormHooks:
    """The one forward hook of a norm module, dispatching to every hook on its names."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.kind = _norm_kind(module)
        self.eps = _eps(module)
        # slot -> (forward calls, backward calls); each entry a 1-list, removed by identity.
        self.calls: dict[str, tuple[list[list[Any]], list[list[Any]]]] = {
            slot: ([], []) for slot in _SLOTS
        }
        self.handle: Any = None

    def add(self, slot: str, call: Any, backward: bool) -> _Handle:
        entry = [call]
        self.calls[slot][1 if backward else 0].append(entry)
        if self.handle is None:
            # First in line: hooks on the norm's output (hook_out, Gemma's attn_out …) see
            # its edits, as a TransformerLens hook_out sees hook_normalized's.
            self.handle = self.module.register_forward_hook(
                self._hook, with_kwargs=True, prepend=True
            )
        return _Handle(self, slot, backward, entry)

    def remove(self, slot: str, backward: bool, entry: list[Any]) -> None:
        entries = self.calls[slot][1 if backward else 0]
        for i, e in enumerate(entries):
            if e is entry:
                del entries[i]
                break
        if not any(f or b for f, b in self.calls.values()) and self.handle is not None:
            self.handle.remove()
            self.handle = None
            _NORM_HOOKS.pop(self.module, None)

    def _hook(self, _mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        track = torch.is_grad_enabled()
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        centered = xf - xf.mean(-1, keepdim=True) if self.kind == "layer" else xf
        var = centered.pow(2).mean(-1, keepdim=True)
        scale = (var + self.eps).sqrt()
        scale, changed = _run(self.calls["hook_scale"], scale, track)
        # transformers multiplies by rsqrt; divide only when the scale was edited or must
        # carry a gradient, so an untouched scale gives the module's own normalized values.
        normalized = centered / scale if changed else centered * torch.rsqrt(var + self.eps)
        normalized, edited = _run(self.calls["hook_normalized"], normalized, track)
        if not (changed or edited):
            return None
        return _with_first(output, self._weighted(normalized, x.dtype))

    def _weighted(self, normalized: Tensor, dtype: torch.dtype) -> Tensor:
        m = self.module
        if self.kind == "rms":  # LlamaRMSNorm: weight * x̂.to(input dtype)
            return m.weight * normalized.to(dtype)
        if self.kind == "rms_offset":  # Gemma: (x̂ * (1 + w)).type_as(x), in float32
            return (normalized * (1.0 + m.weight.float())).to(dtype)
        out = normalized
        if m.weight is not None:
            out = out * m.weight
        if m.bias is not None:
            out = out + m.bias
        return out.to(dtype)


def _run(calls: tuple[list[list[Any]], list[list[Any]]], value: Tensor, track: bool):
    """Apply forward calls in order, then attach backward calls; ``(value, changed)``."""
    fwd, bwd = calls
    changed = False
    for (call,) in list(fwd):
        new = call(value)
        if new is not None:
            value, changed = new, True
    if bwd and track and value.requires_grad:
        for (call,) in list(bwd):
            value.register_hook(call)
        changed = True  # the output must be computed from this tensor for its grad to exist
    return value, changed


class _Handle:
    def __init__(self, hooks: _NormHooks, slot: str, backward: bool, entry: list[Any]):
        self.hooks, self.slot, self.backward, self.entry = hooks, slot, backward, entry

    def remove(self) -> None:
        self.hooks.remove(self.slot, self.backward, self.entry)


_NORM_HOOKS: weakref.WeakKeyDictionary[nn.Module, _NormHooks] = weakref.WeakKeyDictionary()


def _norm_hook(module: nn.Module, slot: str, call: Any, backward: bool) -> _Handle:
    hooks = _NORM_HOOKS.get(module)
    if hooks is None:
        hooks = _NORM_HOOKS[module] = _NormHooks(module)
    return hooks.add(slot, call, backward)


# -- any module by path -----------------------------------------------------------------------
def _path_output_hook(module: nn.Module, name: str, call: Any, backward: bool):
    def hook(_mod, _args, output):
        t, put = _output_slot(output, name)
        if backward:
            if t.requires_grad and torch.is_grad_enabled():
                t.register_hook(call)
            return None
        new = call(t)
        return None if new is None else put(new)

    return module.register_forward_hook(hook)


def _path_input_hook(module: nn.Module, name: str, call: Any, backward: bool):
    def pre(_mod, args, kwargs):
        key = _input_slot(args, kwargs, name)
        t = args[0] if key is None else kwargs[key]
        if backward:
            if t.requires_grad and torch.is_grad_enabled():
                t.register_hook(call)
            return None
        new = call(t)
        if new is None:
            return None
        if key is None:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, key: new}

    return module.register_forward_pre_hook(pre, with_kwargs=True)


def _input_slot(args: tuple, kwargs: dict, name: str) -> str | None:
    """``None`` for the first positional argument, else the keyword holding the input."""
    if args:
        if not isinstance(args[0], Tensor):
            raise TypeError(f"{name}: the module's first input is a {type(args[0]).__name__}")
        return None
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return "hidden_states"
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            return key
    raise TypeError(f"{name}: the module was called without a tensor input")


def _output_slot(output: Any, name: str) -> tuple[Tensor, Callable[[Tensor], Any]]:
    if isinstance(output, Tensor):
        return output, lambda new: new
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return _first(output), lambda new: _with_first(output, new)
    if hasattr(output, "to_tuple") and hasattr(output, "keys"):  # transformers ModelOutput
        key = next(iter(output.keys()), None)
        if key is not None and isinstance(output[key], Tensor):

            def put(new: Tensor) -> Any:
                output[key] = new
                return output

            return output[key], put
    raise TypeError(
        f"{name}: the module's output is a {type(output).__name__} without a tensor first "
        "element; hook one of its submodules instead"
    )

"""Attention internals on the Hugging Face backend, with TransformerBridge's names.

Adds, for every decoder layer ``l`` whose attention module has a known layout
(separate ``q_proj``/``k_proj``/``v_proj``; GPT-2's fused ``c_attn``; GPT-NeoX's
fused ``query_key_value``; DeepSeek's multi-head latent attention):

==========================  ==========================  ==========================================
name                        shape                       what (TransformerBridge, compatibility mode)
==========================  ==========================  ==========================================
``attn.hook_q``             ``[batch, pos, head, d]``   query projection, before any q-norm / RoPE
``attn.hook_k``             ``[batch, pos, kv_head, d]`` key projection (KV-head count under GQA)
``attn.hook_v``             ``[batch, pos, kv_head, d]`` value projection
``attn.hook_rot_q``         ``[batch, pos, head, d]``   query after q-norm and RoPE (what meets k)
``attn.hook_rot_k``         ``[batch, kv_pos, kv_head, d]`` key after k-norm and RoPE
``attn.hook_attn_scores``   ``[batch, head, pos, kv_pos]`` ``q·k × scaling`` (softcapped where the
                                                        model softcaps), masked entries ``-inf``
``attn.hook_pattern``       ``[batch, head, pos, kv_pos]`` softmax of the scores (after dropout):
                                                        the tensor multiplied with ``v``
``attn.hook_z``             ``[batch, pos, head, d_v]`` pattern · v per head: the input of
                                                        ``o_proj`` / ``c_proj`` / ``dense``
==========================  ==========================  ==========================================

GPT-2 has no rotary embedding and so no ``hook_rot_q``/``hook_rot_k``.

How: ``hook_q``/``hook_k``/``hook_v`` are forward hooks on the projection modules
(their output viewed per head; fused outputs are split and, on an edit, re-joined),
so they cost nothing elsewhere. Everything after RoPE lives inside the attention
function, so while at least one such hook is registered the model's
``config._attn_implementation`` is switched to ``"interp_hooked"``, an entry of
``transformers``' public ``AttentionInterface`` (its masks come from the eager mask
function). Layers without a hook run the family's own ``eager_attention_forward``;
hooked layers run the same operations written out with hook calls between them,
so with hooks that change nothing the logits equal eager attention's bit for bit.
The previous implementation (``sdpa``, ``eager``, flash …) is restored when the
last such hook is removed.

Where the meaning differs from the Bridge or from HF's own computation:

* Masked score entries are ``-inf`` (as the Bridge in compatibility mode); before
  the softmax they are clamped to the dtype's minimum, which is exactly what HF's
  additive eager mask gives, so a row whose every key is masked (a left-padding
  query) keeps HF's uniform row where the Bridge reports zeros.
* DeepSeek (MLA): as in the Bridge, ``hook_q``/``hook_k`` are the query/key that
  enter attention (``[nope | rope]``, i.e. *after* RoPE), ``hook_v`` the values
  from ``kv_b_proj``, ``hook_rot_q`` the rotary part of the query
  (``[batch, pos, head, qk_rope_head_dim]``) and ``hook_rot_k`` the single shared
  rotary key (``[batch, pos, 1, qk_rope_head_dim]``). The Bridge emits MLA's
  ``hook_q/k/v`` as ``[batch, head, pos, d]`` and splits ``hook_z`` with the q/k
  head size; here every per-head tensor is ``[batch, pos, head, d]`` and ``hook_z``
  has ``v_head_dim``.
* GPT-NeoX: the Bridge declares ``hook_rot_q/k`` but never fires them; here they
  carry the rotated query/key (partial rotary: the first ``rotary_pct`` of each
  head rotated, the rest passed through), as in TransformerLens.
* During cached generation the hooks inside the attention function see the keys
  and values of every cached position (``kv_pos``), and edits of ``hook_rot_k``
  there are not written into the cache; ``hook_k``/``hook_v`` (module hooks, not
  MLA) see the new positions only and their edits are cached.
"""

from __future__ import annotations

import re
import sys
import weakref
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["IMPLEMENTATION", "attention_module", "hooked_attention_forward"]

IMPLEMENTATION = "interp_hooked"

_PROJ = ("hook_q", "hook_k", "hook_v")
_INNER = ("hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern", "hook_z")
_ALL = _PROJ + _INNER
_NAME_RE = re.compile(r"blocks\.(\d+)\.attn\.(hook_\w+)")

# attention module -> {kind: [(call, backward), ...]}, filled while hooks are registered
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, dict[str, list[tuple[Any, bool]]]] = (
    weakref.WeakKeyDictionary()
)
_EAGER: dict[type, Any] = {}
# model -> its switch of ``_attn_implementation`` (counts the hooks that need it)
_STATES: weakref.WeakKeyDictionary[nn.Module, _SwitchState] = weakref.WeakKeyDictionary()


# -- which layout an attention module has ------------------------------------------------
def attention_module(layer: nn.Module) -> nn.Module | None:
    """The attention module of a decoder layer (the one that calls the attention function)."""
    for attr in ("self_attn", "attn", "attention"):
        mod = getattr(layer, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def _style(attn: nn.Module | None) -> str | None:
    if attn is None:
        return None
    if hasattr(attn, "kv_a_proj_with_mqa") and hasattr(attn, "qk_nope_head_dim"):
        return "mla"
    if hasattr(attn, "c_attn"):
        return "gpt2"
    if hasattr(attn, "query_key_value"):
        return "neox"
    if all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")) and hasattr(attn, "head_dim"):
        return "split"
    return None


def _has_rotary(adapter: Any, style: str) -> bool:
    return style != "gpt2"


# -- the _Part protocol ----------------------------------------------------------------------
def layer_names(adapter: Any, layer: int) -> list[str]:
    style = _style(attention_module(adapter._layers[layer]))
    if style is None:
        return []
    kinds = [k for k in _ALL if _has_rotary(adapter, style) or not k.startswith("hook_rot_")]
    return [f"blocks.{layer}.attn.{k}" for k in kinds]


def global_names(adapter: Any) -> list[str]:
    return []


def register(adapter: Any, name: str, call: Any, backward: bool) -> list[Any] | None:
    m = _NAME_RE.fullmatch(name)
    if m is None or m.group(2) not in _ALL:
        return None
    attn = attention_module(adapter._layers[int(m.group(1))])
    style = _style(attn)
    if style is None:
        return None
    kind = m.group(2)
    if kind in _PROJ and style != "mla":
        return [_projection_hook(attn, style, _PROJ.index(kind), call, backward)]
    return [_InnerHandle(adapter, attn, kind, (call, backward))]


# -- hooks on the q/k/v projections -------------------------------------------------------------
def _projection_hook(attn: nn.Module, style: str, index: int, call, backward: bool):
    if style == "split":
        module = (attn.q_proj, attn.k_proj, attn.v_proj)[index]
        head_dim = attn.head_dim

        def split(out: Tensor) -> tuple[Tensor, Any]:
            return out.unflatten(-1, (-1, head_dim)), None

        def join(part: Tensor, _ctx: Any, out: Tensor) -> Tensor:
            return part.flatten(-2)

    elif style == "gpt2":
        module = attn.c_attn
        head_dim, width = attn.head_dim, attn.split_size

        def split(out: Tensor) -> tuple[Tensor, Any]:
            parts = list(out.split(width, dim=-1))
            return parts[index].unflatten(-1, (-1, head_dim)), parts

        def join(part: Tensor, parts: Any, out: Tensor) -> Tensor:
            parts = list(parts)
            parts[index] = part.flatten(-2)
            return torch.cat(parts, dim=-1)

    else:  # neox: per head [q | k | v]
        module = attn.query_key_value
        head_dim = attn.head_size

        def split(out: Tensor) -> tuple[Tensor, Any]:
            parts = list(out.unflatten(-1, (-1, 3 * head_dim)).chunk(3, dim=-1))
            return parts[index], parts

        def join(part: Tensor, parts: Any, out: Tensor) -> Tensor:
            parts = list(parts)
            parts[index] = part
            return torch.cat(parts, dim=-1).flatten(-2)

    def hook(_mod, _args, out):
        part, ctx = split(out)
        if backward:
            if not part.requires_grad:
                return None
            part.register_hook(call)
            return join(part, ctx, out)
        new = call(part)
        if new is None:
            return None
        return join(new, ctx, out)

    return module.register_forward_hook(hook)


# -- hooks inside the attention function ---------------------------------------------------------
class _InnerHandle:
    """One hook inside the attention function; the first one switches the implementation."""

    def __init__(self, adapter: Any, attn: nn.Module, kind: str, entry: tuple[Any, bool]):
        # One state per model, not per adapter: two adapters over one model share it.
        state = _STATES.get(adapter._base)
        if state is None:
            state = _STATES[adapter._base] = _SwitchState(adapter)
        state.acquire()  # switches first: if it raises, nothing was added
        _REGISTRY.setdefault(attn, {}).setdefault(kind, []).append(entry)
        self._state, self._attn, self._kind, self._entry = state, attn, kind, entry
        self._live = True

    def remove(self) -> None:
        if not self._live:
            return
        self._live = False
        try:
            hooks = _REGISTRY.get(self._attn)
            if hooks is not None:
                entries = hooks.get(self._kind, [])
                for i, e in enumerate(entries):
                    if e is self._entry:
                        del entries[i]
                        break
                if not entries:
                    hooks.pop(self._kind, None)
                if not hooks:
                    _REGISTRY.pop(self._attn, None)
        finally:
            self._state.release()


class _SwitchState:
    """Counts inner hooks of one model; sets and restores ``_attn_implementation``."""

    def __init__(self, adapter: Any):
        self.count = 0
        self.saved: list[tuple[Any, Any]] = []
        roots = [adapter._base.config]
        for layer in adapter._layers:
            cfg = getattr(attention_module(layer), "config", None)
            if cfg is not None:
                roots.append(cfg)
        seen: dict[int, Any] = {}
        while roots:  # every config the attention modules read, with their sub-configs
            cfg = roots.pop()
            if id(cfg) in seen:
                continue
            seen[id(cfg)] = cfg
            for key in getattr(cfg, "sub_configs", None) or {}:
                sub = getattr(cfg, key, None)
                if sub is not None:
                    roots.append(sub)
        self.configs = list(seen.values())

    def acquire(self) -> None:
        if self.count == 0:
            self.saved = [
                (c, c.__dict__.get("_attn_implementation_internal")) for c in self.configs
            ]
            try:
                for c in self.configs:
                    c._attn_implementation = IMPLEMENTATION
            except BaseException:
                self._restore()
                raise
        self.count += 1

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._restore()

    def _restore(self) -> None:
        for cfg, value in self.saved:
            cfg._attn_implementation_internal = value
        self.saved = []


def _eager_of(module: nn.Module):
    fn = _EAGER.get(type(module))
    if fn is None:
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        _EAGER[type(module)] = fn = fn or _generic_unhooked
    return fn


def _generic_unhooked(module, query, key, value, attention_mask, **kwargs):
    return hooked_attention_forward(module, query, key, value, attention_mask, _hooks={}, **kwargs)


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:  # transformers' repeat_kv, op for op
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _run(entries: list[tuple[Any, bool]] | None, t: Tensor) -> tuple[Tensor, bool]:
    """Apply forward hooks, then attach backward hooks to the result; report a change."""
    if not entries:
        return t, False
    changed = False
    for call, backward in entries:
        if not backward:
            new = call(t)
            if new is not None:
                t, changed = new, True
    for call, backward in entries:
        if backward and t.requires_grad:
            t.register_hook(call)
            changed = True  # the hooked tensor must be the one the model uses
    return t, changed


def hooked_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    _hooks: dict[str, list[tuple[Any, bool]]] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """The ``interp_hooked`` attention function: eager attention with hook points.

    ``query`` is ``[batch, head, pos, d]``, ``key``/``value`` ``[batch, kv_head, kv_pos, d]``,
    as ``transformers`` passes them to every attention function.
    """
    hooks = _hooks
    if hooks is None:
        hooks = _REGISTRY.get(module)
        if not hooks:  # this layer has no hook: the family's own eager attention
            return _eager_of(module)(module, query, key, value, attention_mask, **kwargs)
    get = hooks.get
    scaling = kwargs.get("scaling")
    dropout = kwargs.get("dropout", 0.0) or 0.0
    softcap = kwargs.get("softcap")

    if hasattr(module, "qk_nope_head_dim") and hasattr(module, "kv_a_proj_with_mqa"):
        query, key, value = _mla_inputs(module, query, key, value, hooks)
    else:
        if "hook_rot_q" in hooks:
            t, changed = _run(get("hook_rot_q"), query.transpose(1, 2))
            if changed:
                query = t.transpose(1, 2)
        if "hook_rot_k" in hooks:
            t, changed = _run(get("hook_rot_k"), key.transpose(1, 2))
            if changed:
                key = t.transpose(1, 2)

    n_rep = getattr(module, "num_key_value_groups", 1) or 1
    key_states = _repeat_kv(key, n_rep)
    value_states = _repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = scores / softcap
        scores = torch.tanh(scores)
        scores = scores * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    if "hook_attn_scores" in hooks:
        masked = None
        if attention_mask is not None and attention_mask.is_floating_point():
            masked = attention_mask <= torch.finfo(attention_mask.dtype).min
            scores = scores.masked_fill(masked, float("-inf"))
        scores, _ = _run(get("hook_attn_scores"), scores)
        if masked is not None:
            # -inf -> the dtype's minimum: exactly HF's additive eager mask, so fully
            # masked rows stay finite (uniform) as in eager attention.
            scores = scores.clamp_min(torch.finfo(scores.dtype).min)

    if _native_softmax(module):  # GPT-2: softmax in the scores' dtype, then value's dtype
        pattern = nn.functional.softmax(scores, dim=-1).type(value_states.dtype)
    else:
        pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    if "hook_pattern" in hooks:
        pattern, _ = _run(get("hook_pattern"), pattern)

    out = torch.matmul(pattern, value_states).transpose(1, 2)
    if "hook_z" in hooks:
        out, _ = _run(get("hook_z"), out)
    return out.contiguous(), pattern


def _native_softmax(module: nn.Module) -> bool:
    return type(module).__module__.endswith(".modeling_gpt2")


def _mla_inputs(module, query, key, value, hooks):
    """DeepSeek MLA: rot_q / rot_k (rope parts), then q / k / v as they enter attention."""
    nope = module.qk_nope_head_dim
    get = hooks.get
    if "hook_rot_q" in hooks:
        t, changed = _run(get("hook_rot_q"), query[..., nope:].transpose(1, 2))
        if changed:
            query = torch.cat((query[..., :nope], t.transpose(1, 2)), dim=-1)
    if "hook_rot_k" in hooks:
        # HF broadcasts one rotary key to every head; the hook sees that one ([b, pos, 1, r]).
        t, changed = _run(get("hook_rot_k"), key[:, :1, :, nope:].transpose(1, 2))
        if changed:
            rot = t.transpose(1, 2).expand(-1, key.shape[1], -1, -1)
            key = torch.cat((key[..., :nope], rot), dim=-1)
    for kind, which in (("hook_q", 0), ("hook_k", 1), ("hook_v", 2)):
        if kind in hooks:
            tensor = (query, key, value)[which]
            t, changed = _run(get(kind), tensor.transpose(1, 2))
            if changed:
                if which == 0:
                    query = t.transpose(1, 2)
                elif which == 1:
                    key = t.transpose(1, 2)
                else:
                    value = t.transpose(1, 2)
    return query, key, value


def _register_implementation() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, hooked_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


_register_implementation()

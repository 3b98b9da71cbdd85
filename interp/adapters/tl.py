"""TransformerLens backend: ``HookedTransformer`` and ``TransformerBridge`` under native names.

TransformerLens already speaks the canonical vocabulary, so this adapter adds
what it lacks: glob patterns, an error for unknown names (the bridge skips
them silently), replacement checks, and removal of exactly the handles a
context added.

Models are recognised by class, subclasses included (SAELens's
``HookedSAETransformer`` and ``SAETransformerBridge``), on TransformerLens 3 and 4
(which removed ``HookedTransformer``). ``cfg.family`` is the architecture family as the
Hugging Face adapter reports it (``"llama"``, ``"gpt2"`` …), read from the bridged
model's config or from ``cfg.original_architecture``; ``"unknown"`` for a
``HookedTransformer`` built from a bare config.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from interp.hooks import HookedModelBase, HookFn, HookPoint, ModelConfig, checked
from interp.lens import LensMixin, NormSpec

__all__ = ["TLHookedModel", "is_transformer_lens", "transformer_lens_classes"]


def transformer_lens_classes() -> tuple[type, ...]:
    """The TransformerLens model classes this adapter wraps, as far as they are imported.

    An object of one of them can only exist once its module is imported, so nothing is
    imported here: a Hugging Face model is never checked against a fresh TransformerLens
    import.
    """
    classes = []
    bridge_pkg = sys.modules.get("transformer_lens.model_bridge")
    if bridge_pkg is not None and isinstance(getattr(bridge_pkg, "TransformerBridge", None), type):
        classes.append(bridge_pkg.TransformerBridge)
    ht_mod = sys.modules.get("transformer_lens.HookedTransformer")  # gone in TransformerLens 4
    if ht_mod is not None and isinstance(getattr(ht_mod, "HookedTransformer", None), type):
        classes.append(ht_mod.HookedTransformer)
    return tuple(classes)


def is_transformer_lens(obj: Any) -> bool:
    """Whether ``obj`` is a ``HookedTransformer`` or ``TransformerBridge`` (or a subclass)."""
    classes = transformer_lens_classes()
    return bool(classes) and isinstance(obj, classes)


def is_other_transformer_lens(obj: Any) -> bool:
    """A TransformerLens hooked module that is not a causal LM this adapter wraps."""
    module = sys.modules.get("transformer_lens.HookedRootModule")
    base = getattr(module, "HookedRootModule", None) if module is not None else None
    return isinstance(base, type) and isinstance(obj, base) and not is_transformer_lens(obj)


def _is_bridge(model: Any) -> bool:
    pkg = sys.modules.get("transformer_lens.model_bridge")
    cls = getattr(pkg, "TransformerBridge", None) if pkg is not None else None
    return isinstance(cls, type) and isinstance(model, cls)


def _family(model: Any) -> str:
    """The Hugging Face ``model_type`` of a TransformerLens model, as ``HFHookedModel`` has it."""
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    model_type = getattr(hf_config, "model_type", None)
    if isinstance(model_type, str) and model_type:
        return model_type
    c = model.cfg
    arch = getattr(c, "original_architecture", None) or getattr(c, "architecture", None)
    if not arch:
        return "unknown"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # Several model types share a class (LlamaForCausalLM serves llama, exaone …): prefer
    # the one the class is named after.
    families = [f for f, cls_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls_name == arch]
    stem = arch.lower()
    for family in families:
        if stem.startswith(family.replace("_", "").replace("-", "")):
            return family
    return families[0] if families else str(arch)


class _Handle:
    def __init__(self, point: Any, handle: Any, direction: str):
        self.point, self.handle, self.direction = point, handle, direction

    def remove(self) -> None:
        hooks = self.point.fwd_hooks if self.direction == "fwd" else self.point.bwd_hooks
        if self.handle in hooks:
            hooks.remove(self.handle)
        self.handle.hook.remove()


class TLHookedModel(LensMixin, HookedModelBase):
    """A ``HookedModel`` over a ``HookedTransformer`` or a ``TransformerBridge``."""

    def __init__(self, model: nn.Module, tokenizer: Any = None):
        if not is_transformer_lens(model):
            raise TypeError(
                f"expected a TransformerLens HookedTransformer or TransformerBridge, got "
                f"{type(model).__name__}"
            )
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self._bridge = _is_bridge(model)
        self._points: dict[str, Any] = dict(model.hook_dict)
        add_aliases = getattr(model, "_add_aliases_to_hooks", None)
        if self._bridge and callable(add_aliases):
            # SAELens's SAETransformerBridge overrides hook_dict without the bridge's
            # canonical aliases (blocks.{l}.hook_resid_post …); put them back.
            add_aliases(self._points)
        self._hook_names = tuple(self._points)
        c = model.cfg
        n_experts = int(getattr(c, "num_experts", None) or 0)
        self.cfg = ModelConfig(
            n_layers=int(c.n_layers),
            d_model=int(c.d_model),
            d_vocab=int(c.d_vocab),
            n_heads=int(c.n_heads),
            family=_family(model),
            n_experts=n_experts,
            experts_per_token=int(getattr(c, "experts_per_token", None) or 0),
            moe_layers=tuple(range(int(c.n_layers))) if n_experts else (),
        )

    def _register(self, name: str, fn: HookFn, point: HookPoint, backward: bool) -> list[Any]:
        hp = self._points[name]
        direction = "bwd" if backward else "fwd"
        call = checked(fn, point)
        if self._bridge and not backward and name.endswith("hook_resid_mid"):
            # The bridge's resid_mid is an alias of the MLP norm's input hook: a replacement
            # would reach the norm but not the residual stream (in-place edits reach both).
            # Write replacements into the tensor so the residual stream changes too.
            call = _write_through(call)
        hp.add_hook(lambda tensor, hook: call(tensor), dir=direction)
        handles = hp.fwd_hooks if direction == "fwd" else hp.bwd_hooks
        return [_Handle(hp, handles[-1], direction)]

    def _forward(self, input_ids: Tensor, attention_mask: Tensor | None, **kw: Any) -> Tensor:
        if attention_mask is not None and bool((attention_mask == 0).any()):
            kw["attention_mask"] = attention_mask
        if self._bridge and "use_cache" in self._backend_kwargs():
            # As on the HF adapter: one forward pass keeps no KV cache (which would also be
            # written twice under gradient checkpointing).
            kw.setdefault("use_cache", False)
        out = self.model(input_ids, **kw)
        return out.logits if hasattr(out, "logits") else out

    def _checkpoint_blocks(self) -> list[nn.Module]:
        """The transformer blocks, for ``interp.checkpointing``."""
        return list(self.model.blocks)

    def _backend_kwargs(self) -> tuple[str, ...]:
        known = self.__dict__.get("_backend_kw")
        if known is None:
            if self._bridge:  # the bridge hands its extra keyword arguments to the HF model
                from interp.conventions import HF_DROPPED_KWARGS, explicit_params

                hf_forward = getattr(getattr(self.model, "original_model", None), "forward", None)
                known = explicit_params(hf_forward, exclude=HF_DROPPED_KWARGS) if hf_forward else ()
            else:
                known = ("past_kv_cache",)
            self.__dict__["_backend_kw"] = known
        return known

    def generate(self, input: Any = "", *args: Any, **kwargs: Any) -> Any:
        """TransformerLens's ``generate``, also on an interp ``Batch``.

        Text, ids and ``Batch``es are tokenized as ``model(...)`` tokenizes them and the
        result is ``[batch, pos + new]`` token ids, as on the Hugging Face backend; a
        padded batch must be left-padded (``model.tokenize(texts, padding_side="left")``).
        Decoding is greedy unless ``do_sample=True`` (TransformerLens samples by default;
        ``transformers`` does not) and the progress bar is off unless ``verbose=True``. On
        a bridge the KV cache is off unless ``use_past_kv_cache=True`` (see below).
        Hooks registered with ``hooks()`` apply at every step.
        """
        from interp.positions import as_batch

        if isinstance(input, Tensor) and input.is_floating_point():
            return self.model.generate(input, *args, **kwargs)  # embeddings: TL's own path
        batch = as_batch(self, input)
        if getattr(self.tokenizer, "eos_token_id", None) is None and "eos_token_id" not in kwargs:
            kwargs.setdefault("stop_at_eos", False)  # nothing to stop at
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("verbose", False)
        if self._bridge:
            # transformers 5.24 returns the KV cache as `output.cache`; TransformerBridge
            # (3.9, 4.3) reads `output.past_key_values`, gets None, and continues each step
            # from the newest token alone: silently different tokens. Without its cache the
            # bridge recomputes the prefix, as it should.
            kwargs.setdefault("use_past_kv_cache", False)
        kwargs.setdefault("return_type", "tokens")
        cached = bool(kwargs.get("use_past_kv_cache", True))
        mask = batch.attention_mask
        if bool((mask == 0).any()):
            if bool((mask[:, -1] == 0).any()):
                raise ValueError(
                    "generate continues every row from its last position, so a padded batch "
                    "must be left-padded: model.tokenize(texts, padding_side='left')"
                )
            kwargs.setdefault("padding_side", "left")
            if self._bridge:
                kwargs.setdefault("attention_mask", mask)
        # Interventions with positions edit the prompt's pass (HookedModelBase.generating).
        with self.generating(batch, cached=cached):
            return self.model.generate(batch.input_ids, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- unembedding and heads (interp.lens) -------------------------------------------------
    def _norm_spec(self, module: Any) -> NormSpec:
        if self._bridge:  # the bridge wraps the Hugging Face norm module
            from interp.adapters.hf import norm_spec

            return norm_spec(module.original_component)
        c = self.model.cfg
        kind = {"LN": "layer", "LNPre": "layer", "RMS": "rms", "RMSPre": "rms"}
        w, b = getattr(module, "w", None), getattr(module, "b", None)
        return NormSpec(kind.get(c.normalization_type, "none"), float(c.eps), w, b)

    def _unembed_spec(self):
        from interp.lens import UnembedSpec

        m = self.model
        ln = getattr(m, "ln_final", None)
        norm = NormSpec("none") if ln is None else self._norm_spec(ln)
        if self._bridge:
            config = getattr(getattr(m, "original_model", None), "config", None)
            cap = getattr(config, "final_logit_softcapping", None)
        else:
            cap = m.cfg.output_logits_soft_cap if m.cfg.output_logits_soft_cap > 0 else None
        b_U = getattr(m, "b_U", None)
        return UnembedSpec(norm, m.W_U, b_U, float(cap) if cap else None)

    def _head_weights(self, layer: int) -> tuple[Tensor, Tensor | None]:
        attn = self.model.blocks[layer].attn
        return attn.W_O, getattr(attn, "b_O", None)

    def _attn_post_norm(self, layer: int) -> NormSpec | None:
        ln = getattr(self.model.blocks[layer], "ln1_post", None)
        return None if ln is None else self._norm_spec(ln)

    def _has_pos_embed(self) -> bool:
        return getattr(self.model.cfg, "positional_embedding_type", None) == "standard"


def _write_through(call):
    def write(tensor: Tensor) -> Tensor | None:
        new = call(tensor)
        if new is not None and new is not tensor:
            tensor.copy_(new)
            return tensor
        return new

    return write

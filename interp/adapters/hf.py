"""Hugging Face ``transformers`` backend: canonical hook names on plain torch module hooks.

The only place that knows module paths. A small per-family table says which
submodule of a decoder layer produces the attention and MLP contributions
to the residual stream; everything else is shared:

* ``blocks.{l}.hook_resid_pre``   input of decoder layer ``l`` (forward pre-hook)
* ``blocks.{l}.hook_attn_out``    what attention adds to the residual
* ``blocks.{l}.hook_resid_mid``   resid_pre + attn_out (sequential-residual families)
* ``blocks.{l}.hook_mlp_out``     what the MLP / MoE block adds to the residual
* ``blocks.{l}.hook_resid_post``  output of decoder layer ``l``
* ``hook_embed``; norms (``ln1``/``ln2``/``ln_final`` ``.hook_scale``/``.hook_normalized``,
  normalized meaning *before* the norm's weight, as in TransformerLens), MLP internals,
  ``hook_unembed`` and any module by path (``<named_modules path>.hook_in``/``.hook_out``)
  are defined in ``interp.adapters.hf_parts``; attention internals in ``hf_attention``.
* MoE layers: ``blocks.{l}.mlp.hook_router_logits`` / ``hook_expert_weights`` /
  ``hook_expert_indices``, shaped ``[batch, pos, n_experts]`` / ``[batch, pos, k]``.

``resid_mid`` is not a module boundary in HF code, so it is read as
``resid_pre + attn_out`` (the very sum the model computes, bit for bit) and a
replacement is written back through the attention contribution
(``attn_out' = new_mid − resid_pre``), so it really changes the residual.
Replacing router logits re-runs the family's own selection rule
(``interp.routing``), so top-k really changes — unlike editing logits in a
read-only hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from interp.hooks import HookedModelBase, HookFn, HookPoint, ModelConfig, checked
from interp.lens import LensMixin

__all__ = ["FAMILY_LAYOUTS", "HFHookedModel", "Layout"]


@dataclass(frozen=True)
class Layout:
    """Module paths of one family, relative to the base model / a decoder layer."""

    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    attn_out: str = "self_attn"  # module whose output (or output[0]) is added to the residual
    mlp_out: str = "mlp"
    mid_norm: str = "post_attention_layernorm"  # its input is resid_mid
    router: str = "mlp.gate"  # MoE routers return (logits, weights, indices)


_LLAMA = Layout()
FAMILY_LAYOUTS: dict[str, Layout] = {
    **{
        f: _LLAMA
        for f in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
            "olmoe",
            "deepseek_v2",
            "deepseek_v3",
            "olmo2",
            "granite",
        )
    },
    "gemma2": Layout(
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        mid_norm="pre_feedforward_layernorm",
    ),
    "gemma3_text": Layout(
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        mid_norm="pre_feedforward_layernorm",
    ),
    "gpt2": Layout(
        embed="transformer.wte",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        attn_out="attn",
        mid_norm="ln_2",
    ),
    "gpt_neox": Layout(
        embed="gpt_neox.embed_in",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        attn_out="post_attention_dropout",
        mlp_out="post_mlp_dropout",
    ),
}


class _Part(Protocol):
    """Hook points inside a block (attention, norms, MLP …), each kind in its own module.

    ``layer_names(adapter, layer)`` / ``global_names(adapter)`` list the names it adds;
    ``register(adapter, name, call, backward)`` returns the handles for a name it owns,
    or ``None`` for a name it does not own. ``call`` is ``interp.hooks.checked``'s
    wrapper: it returns ``None`` when the activation is unchanged, else the tensor to use.
    """

    def layer_names(self, adapter: HFHookedModel, layer: int) -> list[str]: ...

    def global_names(self, adapter: HFHookedModel) -> list[str]: ...

    def register(
        self, adapter: HFHookedModel, name: str, call: Any, backward: bool
    ) -> list[Any] | None: ...


_PARTS: list[_Part] = []  # filled below by the modules that define each part


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, new: Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def unwrap(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class HFHookedModel(LensMixin, HookedModelBase):
    """A ``HookedModel`` over any ``transformers`` causal LM (dense, MoE, PEFT-wrapped)."""

    def __init__(self, model: nn.Module, tokenizer: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        base = unwrap(model)
        config = base.config
        family = getattr(config, "model_type", "unknown")
        layout = FAMILY_LAYOUTS.get(family)
        if layout is None:
            if _has_path(base, _LLAMA.layers) and _has_path(base, _LLAMA.embed):
                layout = _LLAMA  # most decoder-only families share llama's layout
            else:
                raise ValueError(
                    f"model family {family!r} is not supported by the HF adapter; supported: "
                    f"{', '.join(sorted(FAMILY_LAYOUTS))}. Add a Layout to "
                    "interp.adapters.hf.FAMILY_LAYOUTS for it."
                )
        self.layout = layout
        self._base = base
        self._layers: list[nn.Module] = list(_get(base, layout.layers))
        parallel = bool(getattr(config, "use_parallel_residual", False)) and family == "gpt_neox"
        self._moe_layers = tuple(
            i for i, layer in enumerate(self._layers) if _router_of(layer, layout) is not None
        )
        names: list[str] = ["hook_embed"]
        for i in range(len(self._layers)):
            names += [f"blocks.{i}.hook_resid_pre", f"blocks.{i}.hook_attn_out"]
            if not parallel:
                names.append(f"blocks.{i}.hook_resid_mid")
            names += [f"blocks.{i}.hook_mlp_out", f"blocks.{i}.hook_resid_post"]
            if i in self._moe_layers:
                names += [
                    f"blocks.{i}.mlp.hook_router_logits",
                    f"blocks.{i}.mlp.hook_expert_weights",
                    f"blocks.{i}.mlp.hook_expert_indices",
                ]
            for part in _PARTS:
                names += part.layer_names(self, i)
        for part in _PARTS:
            names += part.global_names(self)
        self._hook_names = tuple(names)
        self.cfg = _config(config, family, len(self._layers), self._moe_layers)
        self._routing_rule = None

    # -- running ---------------------------------------------------------------
    def _forward(self, input_ids: Tensor, attention_mask: Tensor | None, **kw: Any) -> Tensor:
        kw.setdefault("use_cache", False)
        if (
            attention_mask is not None
            and "position_ids" not in kw
            and "position_ids" in self._backend_kwargs()
            and bool((attention_mask[:, 0] == 0).any())
        ):
            # Left padding: count positions from each row's first real token, as
            # `generate` does. transformers' forward counts from column 0, which shifts
            # absolute position embeddings (GPT-2: logits off by up to 0.7 on a tiny model).
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits

    def _backend_kwargs(self) -> tuple[str, ...]:
        """The named arguments of the model's own forward (``logits_to_keep``,
        ``position_ids`` …), except those whose result ``forward`` would drop."""
        known = self.__dict__.get("_backend_kw")
        if known is None:
            from interp.conventions import HF_DROPPED_KWARGS, explicit_params

            known = self.__dict__["_backend_kw"] = explicit_params(
                self._base.forward, exclude=HF_DROPPED_KWARGS
            )
        return known

    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        """``transformers`` ``generate``; hooks registered with ``hooks()`` apply at every step."""
        from interp.positions import Batch, as_batch

        if args and isinstance(args[0], (Batch, str, list, dict, Tensor)):
            batch = as_batch(self, args[0])
            args = args[1:]
            kwargs.setdefault("input_ids", batch.input_ids)
            kwargs.setdefault("attention_mask", batch.attention_mask)
        else:
            ids = kwargs.get("input_ids")
            batch = as_batch(self, ids, kwargs.get("attention_mask")) if ids is not None else None
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if batch is None:
            return self.model.generate(*args, **kwargs)
        # Interventions with positions edit the prompt's forward pass, not the decoding steps.
        with self.generating(batch):
            return self.model.generate(*args, **kwargs)

    def _checkpoint_blocks(self) -> list[nn.Module]:
        """The decoder layers, for ``interp.checkpointing``."""
        return list(self._layers)

    # -- hooks -----------------------------------------------------------------
    def _module_names(self) -> list[str]:
        """``<path>.hook_in`` / ``<path>.hook_out`` of every submodule: names that resolve
        (exactly or by a glob ending in ``.hook_in`` / ``.hook_out``) but are not in
        ``hook_names``; paths are those of the ``transformers`` model, also under PEFT."""
        return hf_parts.path_names(self)

    def _register(self, name: str, fn: HookFn, point: HookPoint, backward: bool) -> list[Any]:
        call = checked(fn, point)
        for part in _PARTS:
            handles = part.register(self, name, call, backward)
            if handles is not None:
                return handles
        if name == "hook_embed":
            return [_output_hook(_get(self._base, self.layout.embed), call, backward)]
        parts = name.split(".")
        layer = self._layers[int(parts[1])]
        kind = parts[-1]
        if kind == "hook_resid_pre":
            return [_input_hook(layer, call, backward)]
        if kind == "hook_resid_post":
            return [_output_hook(layer, call, backward)]
        if kind == "hook_attn_out":
            return [_output_hook(_get(layer, self.layout.attn_out), call, backward)]
        if kind == "hook_mlp_out":
            return [_output_hook(_get(layer, self.layout.mlp_out), call, backward)]
        if kind == "hook_resid_mid":
            if backward:  # the mid norm's input *is* the resid_mid tensor of the graph
                return [_input_hook(_get(layer, self.layout.mid_norm), call, backward=True)]
            return self._resid_mid_hook(layer, call)
        if backward:
            raise ValueError(
                f"backward hooks are not available on {name!r}: router outputs are not "
                "differentiable activations of the residual stream"
            )
        return self._router_hook(int(parts[1]), layer, kind, call)

    def _resid_mid_hook(self, layer: nn.Module, call) -> list[Any]:
        stash: dict[str, Tensor] = {}

        def pre(_mod, args, kwargs):
            stash["resid"] = args[0] if args else kwargs["hidden_states"]

        def post(_mod, _args, output):
            # Read, not popped: under gradient checkpointing (interp.checkpointing) the
            # backward pass re-runs the attention inside the block, and this hook with it,
            # while the block's own pre-hook (outside the checkpoint) ran once; the block
            # is recomputed from the very input tensor stashed here.
            resid = stash["resid"]
            attn = _first(output)
            mid = resid + attn  # the sum the model itself computes next
            new = call(mid)  # an in-place edit of mid comes back as mid itself
            if new is None:
                return None
            return _with_first(output, new - resid)

        return [
            layer.register_forward_pre_hook(pre, with_kwargs=True),
            _get(layer, self.layout.attn_out).register_forward_hook(post),
        ]

    def _router_hook(self, index: int, layer: nn.Module, kind: str, call) -> list[Any]:
        slot = {"hook_router_logits": 0, "hook_expert_weights": 1, "hook_expert_indices": 2}[kind]
        block = _get(layer, self.layout.mlp_out)
        router = _router_of(layer, self.layout)
        shape: dict[str, tuple[int, int]] = {}

        def pre(_mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            shape["bt"] = tuple(x.shape[:-1]) if x.ndim == 3 else (1, x.shape[0])

        def post(_mod, _args, output):
            b, t = shape.get("bt", (1, output[0].shape[0]))
            value = output[slot]
            new = call(value.view(b, t, value.shape[-1]))
            if new is None:
                return None
            new = new.reshape(value.shape)
            out = list(output)
            out[slot] = new
            if slot == 0:  # edited logits: re-run the family's own selection rule
                from interp.routing import select_experts

                rule = self.routing_rule
                # DeepSeek-V3 selects on sigmoid scores plus a learned correction bias.
                bias = getattr(router, "e_score_correction_bias", None)
                out[1], out[2] = select_experts(
                    new, rule, score_bias=bias if rule.scoring == "sigmoid" else None
                )
                out[1] = out[1].to(output[1].dtype)
            return tuple(out)

        return [
            block.register_forward_pre_hook(pre, with_kwargs=True),
            router.register_forward_hook(post),
        ]

    # -- unembedding and heads (interp.lens) -------------------------------------------------
    def _unembed_spec(self):
        from interp.lens import UnembedSpec, affine_weights

        W_U, b_U = affine_weights(self._base.get_output_embeddings(), self.cfg.d_model)
        config = self._base.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        cap = getattr(config, "final_logit_softcapping", None)
        norm = norm_spec(_get(self._base, self.layout.final_norm))
        return UnembedSpec(norm, W_U, b_U, float(cap) if cap else None)

    def _head_weights(self, layer: int) -> tuple[Tensor, Tensor | None]:
        from interp.adapters.hf_attention import attention_module
        from interp.lens import affine_weights

        attn = attention_module(self._layers[layer])
        for attr in ("o_proj", "c_proj", "dense", "out_proj"):  # llama …, GPT-2, GPT-NeoX
            proj = getattr(attn, attr, None)
            if isinstance(proj, nn.Module):
                W, b = affine_weights(proj)
                return W.unflatten(0, (self.cfg.n_heads, -1)), b
        raise ValueError(f"block {layer}: no attention output projection found in {type(attn)}")

    def _attn_post_norm(self, layer: int):
        module = hf_parts._layer_norms(self, layer).get("ln1_post")
        return None if module is None else norm_spec(module)

    def _has_pos_embed(self) -> bool:
        return _has_path(self._base, "transformer.wpe")  # GPT-2's learned positions

    @property
    def routing_rule(self):
        """The family's expert-selection rule (``interp.routing.RoutingRule``)."""
        if self._routing_rule is None:
            from interp.routing import RoutingRule

            self._routing_rule = RoutingRule.from_config(self._base.config)
        return self._routing_rule


def norm_spec(module: nn.Module):
    """``interp.lens.NormSpec`` of a norm module (LayerNorm, RMSNorm, Gemma's ``1 + w``)."""
    from interp.adapters.hf_parts import _eps, _norm_kind
    from interp.lens import NormSpec

    kind = _norm_kind(module)
    if kind is None:
        raise ValueError(f"{type(module).__name__} is not a norm interp knows (LayerNorm, RMSNorm)")
    weight = getattr(module, "weight", None)
    if kind == "rms_offset":
        return NormSpec("rms", _eps(module), 1.0 + weight.float())
    if kind == "rms":
        return NormSpec("rms", _eps(module), weight)
    return NormSpec("layer", _eps(module), weight, module.bias)


def _output_hook(module: nn.Module, call, backward: bool):
    if backward:

        def fwd_bwd(_mod, _args, output):
            t = _first(output)
            if t.requires_grad:
                t.register_hook(call)

        return module.register_forward_hook(fwd_bwd)

    def fwd(_mod, _args, output):
        t = _first(output)
        new = call(t)
        if new is None:
            return None
        return _with_first(output, new)

    return module.register_forward_hook(fwd)


def _input_hook(module: nn.Module, call, backward: bool):
    def pre(_mod, args, kwargs):
        in_args = bool(args)
        t = args[0] if in_args else kwargs["hidden_states"]
        if backward:
            if t.requires_grad:
                t.register_hook(call)
            return None
        new = call(t)
        if new is None:
            return None
        if in_args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return module.register_forward_pre_hook(pre, with_kwargs=True)


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has_path(root: nn.Module, path: str) -> bool:
    try:
        _get(root, path)
    except AttributeError:
        return False
    return True


def _router_of(layer: nn.Module, layout: Layout) -> nn.Module | None:
    mlp = getattr(layer, layout.mlp_out.split(".")[0], None)
    if mlp is None or not hasattr(mlp, "experts"):
        return None
    return getattr(mlp, layout.router.split(".")[-1], None)


def _config(config: Any, family: str, n_layers: int, moe_layers: tuple[int, ...]) -> ModelConfig:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d_model = getattr(text, "hidden_size", None) or text.n_embd
    n_heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 0)
    n_experts = 0
    if moe_layers:
        for attr in ("num_local_experts", "num_experts", "n_routed_experts"):
            n_experts = getattr(text, attr, None) or 0
            if n_experts:
                break
    return ModelConfig(
        n_layers=n_layers,
        d_model=int(d_model),
        d_vocab=int(text.vocab_size),
        n_heads=int(n_heads),
        family=family,
        n_experts=int(n_experts),
        experts_per_token=int(getattr(text, "num_experts_per_tok", 0) or 0) if moe_layers else 0,
        moe_layers=moe_layers,
    )


from interp.adapters import hf_attention  # noqa: E402

_PARTS.append(hf_attention)

from interp.adapters import hf_parts  # noqa: E402

_PARTS.append(hf_parts)

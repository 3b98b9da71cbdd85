"""Reading the residual stream through the unembedding: logit lens, decomposition, direct
logit attribution and patchscopes, on every backend.

The final norm is the only nonlinearity between the residual stream and the logits, and
it is affine once its scale is fixed. Everything here rests on that:

* ``model.unembed(resid)`` runs the model's own final norm (its kind, epsilon, weight and
  bias, Gemma's ``1 + weight``), its unembedding (``W_U``, ``b_U``) and Gemma-2's final
  logit soft-capping where the family has it, in float32.
* ``apply_ln_to_stack(model, stack, resid)`` (TransformerLens's semantics): each component
  of a stack is centred (LayerNorm) and divided by the scale of the *residual* it is a part
  of, never by its own, so the components add up to the normalised residual
  (``ln_final.hook_normalized``) and their unembeddings add up to the logits, less the
  constant bias term (the norm's bias through ``W_U`` plus ``b_U``) and before any
  soft-capping.
* ``decompose_resid`` splits the final residual into the embedding (+ the positional
  embedding where the family has one), each block's ``attn_out`` and ``mlp_out`` (a MoE
  block is one ``mlp_out``); ``head_results`` splits each ``attn_out`` further into heads
  through ``hook_z @ W_O`` (``head_output_weights``: the output projection reshaped per
  head, on every family, GQA and GPT-2's ``Conv1D`` included). Gemma-2 normalises the
  attention output after the projection (``ln1_post``); its heads are read through that
  norm with the scale of their sum, as the final norm is.
* ``dla`` is direct logit attribution to a logit (difference), and ``logit_lens`` /
  ``accumulated_resid`` read every layer's residual. ``patchscope`` (Ghandeharioun et al.
  2024) writes a hidden state from a source prompt into a target prompt and reads the
  target's next-token distribution or generation; the logit lens is its special case.

The analyses (``accumulated_resid``, ``decompose_resid``, ``head_results``, ``dla``,
``logit_lens``) run without autograd; ``model.unembed`` and ``apply_ln_to_stack`` are
differentiable.

Layers are indexed as in TransformerLens's ``accumulated_resid``: stream ``l`` for
``l < n_layers`` is the residual entering block ``l`` (``blocks.{l}.hook_resid_pre``), and
stream ``n_layers`` is the final residual (``blocks.{n_layers-1}.hook_resid_post``).

Backends provide four small pieces (``LensMixin``): the final norm and unembedding
(``_unembed_spec``), each layer's per-head output weights (``_head_weights``), a norm
applied to the attention output (``_attn_post_norm``) and whether a learned positional embedding
is added to the token embedding (``_has_pos_embed``). Everything else here is plain tensor math.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = [
    "DirectLogitAttribution",
    "HeadResults",
    "LensMixin",
    "LogitLens",
    "NormSpec",
    "Patchscope",
    "ResidStack",
    "UnembedSpec",
    "accumulated_resid",
    "affine_weights",
    "apply_ln_to_stack",
    "decompose_resid",
    "dla",
    "head_output_bias",
    "head_output_weights",
    "head_results",
    "logit_lens",
    "norm_scale",
    "patchscope",
    "softcap",
    "stack_to_logits",
    "unembed",
]


# -- the pieces a backend provides ----------------------------------------------------------
@dataclass(frozen=True)
class NormSpec:
    """A normalisation ``y = weight * (x - mean?) / scale + bias`` with ``scale`` the RMS
    (``"rms"``) or the standard deviation (``"layer"``) of ``x`` plus ``eps`` inside the
    root; ``"none"`` is the identity. ``weight`` is the effective multiplier (Gemma's
    ``1 + w``); ``None`` means 1 (and no bias)."""

    kind: Literal["layer", "rms", "none"]
    eps: float = 0.0
    weight: Float[Tensor, " d_model"] | None = None
    bias: Float[Tensor, " d_model"] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("layer", "rms", "none"):
            raise ValueError(f"NormSpec.kind must be 'layer', 'rms' or 'none', got {self.kind!r}")


@dataclass(frozen=True)
class UnembedSpec:
    """The final norm, the unembedding ``logits = norm(resid) @ W_U + b_U`` and the final
    logit soft-cap (``cap * tanh(logits / cap)``; ``None`` where the family has none)."""

    norm: NormSpec
    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, " d_vocab"] | None = None
    softcap: float | None = None


def affine_weights(module: nn.Module, d_in: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``(W, b)`` with ``module(x) == x @ W + b`` for an affine module (``W``: ``[d_in, d_out]``).

    ``nn.Linear`` and GPT-2's ``Conv1D`` (whose weight is stored ``[d_in, d_out]``) are read
    directly; anything else that is affine (a PEFT LoRA wrapper, a quantised linear layer) is
    probed with the identity, so adapters are merged in.
    """
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if type(module) is nn.Linear:
        return weight.T, bias
    if type(module).__name__ == "Conv1D" and weight is not None:
        return weight, bias
    d_in = d_in or getattr(module, "in_features", None)
    if not isinstance(d_in, int):
        raise TypeError(f"cannot tell the input width of {type(module).__name__}; pass d_in")
    ref = next(module.parameters())
    with torch.no_grad():
        eye = torch.eye(d_in, device=ref.device, dtype=ref.dtype)
        zero = module(torch.zeros(1, d_in, device=ref.device, dtype=ref.dtype))[0]
        W = module(eye) - zero
    return W, (zero if bool(zero.abs().max() > 0) else None)


class LensMixin:
    """``W_U``, ``b_U``, ``unembed``, ``final_norm_scale`` and ``apply_ln_to_stack`` on a
    ``HookedModel``; the backend implements ``_unembed_spec`` and ``_head_weights``."""

    def _unembed_spec(self) -> UnembedSpec:
        raise NotImplementedError

    def _head_weights(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """``(W_O [n_heads, d_head, d_model], b_O [d_model] or None)`` of block ``layer``."""
        raise NotImplementedError

    def _attn_post_norm(self, layer: int) -> NormSpec | None:
        """A norm applied to the attention output before it joins the residual (Gemma-2)."""
        return None

    def _has_pos_embed(self) -> bool:
        """Whether a learned positional embedding is added to ``hook_embed`` (GPT-2)."""
        return False

    @property
    def W_U(self) -> Tensor:
        """The unembedding matrix, ``[d_model, d_vocab]``."""
        return self._unembed_spec().W_U

    @property
    def b_U(self) -> Tensor:
        """The unembedding bias, ``[d_vocab]`` (zeros where the model has none)."""
        spec = self._unembed_spec()
        if spec.b_U is not None:
            return spec.b_U
        return torch.zeros(spec.W_U.shape[1], device=spec.W_U.device, dtype=spec.W_U.dtype)

    def unembed(self, resid: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_vocab"]:
        """Logits of residual-stream vectors: the final norm (with each vector's own scale),
        ``W_U``, ``b_U`` and the family's final soft-cap, in float32."""
        return unembed(self._unembed_spec(), resid)

    def final_norm_scale(self, resid: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows 1"]:
        """The final norm's divisor of each vector (``ln_final.hook_scale``), float32."""
        return norm_scale(self._unembed_spec().norm, resid)

    def apply_ln_to_stack(
        self, stack: Float[Tensor, "component *rows d_model"], resid: Float[Tensor, "*rows d_model"]
    ) -> Float[Tensor, "component *rows d_model"]:
        """TransformerLens's ``apply_ln_to_stack``: components normalised by ``resid``'s scale."""
        return apply_ln_to_stack(self._unembed_spec().norm, stack, resid)


# -- pure functions -------------------------------------------------------------------------
def _check_width(x: Tensor, d_model: int, what: str) -> None:
    if x.ndim == 0 or x.shape[-1] != d_model:
        raise ValueError(
            f"{what} must end in d_model = {d_model}, got shape {tuple(x.shape)} (a residual-"
            "stream vector of this model)"
        )


def norm_scale(norm: NormSpec, resid: Float[Tensor, "*rows d"]) -> Float[Tensor, "*rows 1"]:
    """The norm's divisor of each vector, float32: RMS, or standard deviation for LayerNorm."""
    if norm.weight is not None:
        _check_width(resid, norm.weight.shape[-1], "resid")
    x = resid.float()
    if norm.kind == "none":
        return torch.ones_like(x[..., :1])
    if norm.kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()


def apply_ln_to_stack(
    norm: NormSpec,
    stack: Float[Tensor, "component *rows d"],
    resid: Float[Tensor, "*rows d"],
) -> Float[Tensor, "component *rows d"]:
    """Normalise each component of ``stack`` by the scale of ``resid`` (TransformerLens's
    ``apply_ln_to_stack``), before the norm's weight: centred for LayerNorm, divided by the
    residual's scale, float32. Components that add up to ``resid`` come out adding up to its
    normalised value; normalising each by its *own* scale would not."""
    if stack.shape[1:] != resid.shape:
        raise ValueError(
            f"a stack [component, *rows, d_model] must match the residual [*rows, d_model]: "
            f"stack {tuple(stack.shape)} vs resid {tuple(resid.shape)}"
        )
    x = stack.float()
    if norm.kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    return x / norm_scale(norm, resid)


def _weighted(norm: NormSpec, normalized: Tensor, bias: bool) -> Tensor:
    out = normalized if norm.weight is None else normalized * norm.weight.float()
    if bias and norm.bias is not None:
        out = out + norm.bias.float()
    return out


def softcap(logits: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(logits / cap)`` (Gemma-2's final logit soft-capping); identity for None."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def unembed(
    spec: UnembedSpec, resid: Float[Tensor, "*rows d_model"]
) -> Float[Tensor, "*rows d_vocab"]:
    """Final norm (each vector's own scale), ``W_U``, ``b_U`` and soft-cap, in float32."""
    _check_width(resid, spec.W_U.shape[0], "resid")
    x = resid.float()
    if spec.norm.kind != "none":
        if spec.norm.kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        x = x / norm_scale(spec.norm, resid)
    logits = _weighted(spec.norm, x, bias=True) @ spec.W_U.float()
    if spec.b_U is not None:
        logits = logits + spec.b_U.float()
    return softcap(logits, spec.softcap)


def stack_to_logits(
    spec: UnembedSpec, normalized: Float[Tensor, "component *rows d_model"]
) -> Float[Tensor, "component *rows d_vocab"]:
    """Logit contributions of an ``apply_ln_to_stack`` result: the norm's weight, then
    ``W_U``; no bias and no soft-cap, so they add up to the logits less ``logit_bias``."""
    return _weighted(spec.norm, normalized.float(), bias=False) @ spec.W_U.float()


def logit_bias(spec: UnembedSpec) -> Float[Tensor, " d_vocab"]:
    """The constant part of the logits: the norm's bias through ``W_U`` plus ``b_U``."""
    W_U = spec.W_U.float()
    out = torch.zeros(W_U.shape[1], device=W_U.device)
    if spec.norm.bias is not None:
        out = out + spec.norm.bias.float() @ W_U
    if spec.b_U is not None:
        out = out + spec.b_U.float()
    return out


def _spec(model: Any) -> UnembedSpec:
    get = getattr(model, "_unembed_spec", None)
    if get is None:
        raise TypeError(
            f"{type(model).__name__} has no unembedding this module knows; pass a HookedModel "
            "(interp.load(...) / interp.tiny(...))"
        )
    return get()


# -- per-head output weights ------------------------------------------------------------------
def head_output_weights(model: Any, layer: int) -> Float[Tensor, "n_heads d_head d_model"]:
    """``W_O`` of block ``layer`` per head: ``hook_z[..., h, :] @ W_O[h]`` summed over heads
    (plus ``head_output_bias``) is the attention output projection's output."""
    return model._head_weights(_layer_index(model, layer))[0]


def head_output_bias(model: Any, layer: int) -> Float[Tensor, " d_model"] | None:
    """``b_O`` of block ``layer`` (``None`` where the output projection has no bias)."""
    return model._head_weights(_layer_index(model, layer))[1]


def _layer_index(model: Any, layer: int) -> int:
    n = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(
            f"layer must be an int in [-{n}, {n}) for this {n}-layer model, got {layer!r}"
        )
    return layer % n


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResidStack:
    """A stack of residual-stream tensors with a label per entry.

    Attributes:
        resid: ``[component, *rows, d_model]``; ``*rows`` is what ``positions=`` selected
            (``[batch]`` for one position per row, ``[batch, pos]`` for all).
        labels: TransformerLens's labels (``"embed"``, ``"pos_embed"``, ``"0_attn_out"``,
            ``"0_mlp_out"`` …; ``"0_pre"`` … ``"final_post"`` for accumulated streams).
        layers: the block of each entry (``-1`` for the embeddings, ``n_layers`` for the
            final residual).
    """

    resid: Float[Tensor, "component *rows d_model"]
    labels: tuple[str, ...]
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.labels) == len(self.layers) == self.resid.shape[0]):
            raise ValueError(
                f"{len(self.labels)} labels and {len(self.layers)} layers for "
                f"{self.resid.shape[0]} stacked tensors"
            )

    def __getitem__(self, label: str) -> Tensor:
        return self.resid[self.labels.index(label)]


@dataclass(frozen=True)
class HeadResults:
    """Each head's contribution to the residual stream, ``hook_z @ W_O`` per head.

    ``results[l].sum(0) + bias[l]`` is block ``l``'s ``attn_out`` (on Gemma-2 through its
    post-attention norm, with the scale of the heads' sum).

    Attributes:
        results: ``[layer, head, *rows, d_model]``.
        bias: ``[layer, *rows, d_model]``: what the output projection's bias adds (zeros
            where it has none).
        layers: the block of each entry; ``heads``: head indices.
    """

    results: Float[Tensor, "layer head *rows d_model"]
    bias: Float[Tensor, "layer *rows d_model"]
    layers: tuple[int, ...]
    heads: tuple[int, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        """``"L{layer}H{head}"`` in ``results.flatten(0, 1)`` order."""
        return tuple(f"L{layer}H{h}" for layer in self.layers for h in self.heads)


@dataclass(frozen=True)
class DirectLogitAttribution:
    """Direct logit attribution to ``logit[answer] - logit[wrong]`` at one position per row.

    ``components.sum(0)`` equals ``logit_diff`` (up to float rounding): the model's own final
    logit difference, *before* soft-capping where the family soft-caps (Gemma-2), since the
    cap is the one nonlinearity after the norm. The ``"bias"`` component (the final norm's
    bias through ``W_U`` plus ``b_U``) is present only where the model has such biases
    (nonzero ones: a backend that reports a zero ``b_U`` gets none).
    ``heads[l].sum(0) + head_bias[l]`` equals the ``"{l}_attn_out"`` component.

    Attributes:
        components: ``[component, batch]``, labelled by ``labels``.
        labels: ``"embed"``, [``"pos_embed"``], ``"0_attn_out"``, ``"0_mlp_out"``, …, [``"bias"``].
        heads: ``[layer, head, batch]``; ``head_bias``: ``[layer, batch]``.
        logit_diff: ``[batch]``, from the final residual through ``model.unembed`` before
            the soft-cap.
        softcap: the family's final logit soft-cap (``None`` where it has none).
    """

    components: Float[Tensor, "component batch"]
    labels: tuple[str, ...]
    heads: Float[Tensor, "layer head batch"]
    head_bias: Float[Tensor, "layer batch"]
    logit_diff: Float[Tensor, " batch"]
    softcap: float | None = None

    @property
    def head_labels(self) -> tuple[str, ...]:
        n_layers, n_heads = self.heads.shape[:2]
        return tuple(f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads))

    def __getitem__(self, label: str) -> Tensor:
        """A component's ``[batch]`` attributions (``"embed"``, ``"3_mlp_out"``) or a head's
        (``"L3H1"``)."""
        if label in self.labels:
            return self.components[self.labels.index(label)]
        if label in self.head_labels:
            return self.heads.flatten(0, 1)[self.head_labels.index(label)]
        raise KeyError(f"no component or head {label!r}; components: {', '.join(self.labels)}")

    def top(self, k: int = 5, row: int = 0, heads: bool = False) -> list[tuple[str, float]]:
        """The ``k`` largest attributions by magnitude in batch row ``row``, as
        ``(label, value)``: components, or heads with ``heads=True``."""
        values = self.heads.flatten(0, 1)[:, row] if heads else self.components[:, row]
        labels = self.head_labels if heads else self.labels
        order = values.abs().topk(min(k, len(labels))).indices.tolist()
        return [(labels[i], float(values[i])) for i in order]


@dataclass(frozen=True)
class LogitLens:
    """Logits of every layer's residual stream through the model's final norm and unembedding.

    Attributes:
        logits: ``[layer, *rows, d_vocab]`` (float32, soft-capped as the model's own).
        labels: ``"0_pre"`` … ``"final_post"``; ``layers``: ``0 … n_layers``.
    """

    logits: Float[Tensor, "layer *rows d_vocab"]
    labels: tuple[str, ...]
    layers: tuple[int, ...]

    def top(self, k: int = 1) -> Int[Tensor, "layer *rows k"]:
        """Token ids of the ``k`` largest logits of every layer."""
        return self.logits.topk(k, dim=-1).indices


@dataclass(frozen=True)
class Patchscope:
    """What a patchscope read: ``logits`` ``[batch, d_vocab]`` at the target position
    (float32, from the model's forward pass), and the generated ``tokens``
    (``[batch, pos + new]``) when ``read="generate"``."""

    logits: Float[Tensor, "batch d_vocab"] | None
    tokens: Int[Tensor, "batch total"] | None
    source: tuple[int, Any]
    target: tuple[int, Any]


# -- running the model --------------------------------------------------------------------------
def _stream_name(layer: int, n_layers: int) -> str:
    if layer == n_layers:
        return f"blocks.{n_layers - 1}.hook_resid_post"
    return f"blocks.{layer}.hook_resid_pre"


def _stream_index(layer: Any, n_layers: int, what: str) -> int:
    if (
        isinstance(layer, bool)
        or not isinstance(layer, int)
        or not -(n_layers + 1) <= layer <= n_layers
    ):
        raise ValueError(
            f"{what} must be a residual-stream index in [0, {n_layers}] (l < {n_layers}: the "
            f"residual entering block l; {n_layers}: the final residual) or negative from the "
            f"end, got {layer!r}"
        )
    return layer % (n_layers + 1)


def _is_cache(source: Any) -> bool:
    return isinstance(source, Mapping)


def _gather(
    source: Any, batch: Any, names: list[str], positions: Any, model: Any = None
) -> dict[str, Tensor]:
    """The tensors at ``names`` with ``positions`` selected, from a model run or a cache."""
    from interp.positions import Batch, as_batch, selector

    if _is_cache(source):
        missing = [n for n in names if n not in source]
        if missing:
            raise KeyError(
                f"the cache lacks {missing[:4]}; capture them (e.g. interp.capture(model, batch, "
                f"{missing[0]!r})) or pass the model and the batch instead"
            )
        if positions is None:
            return {n: source[n] for n in names}
        if batch is not None and not isinstance(batch, Batch):
            batch = as_batch(model, batch) if model is not None else None
        sel = selector(positions, batch)
        return {n: sel.select(source[n], n) for n in names}
    from interp.activations import capture

    if batch is None:
        raise TypeError("pass the batch to run (text, ids, a dict or a Batch) after the model")
    return dict(capture(source, batch, names, positions=positions))


def _n_layers(source: Any, model: Any) -> int:
    if model is not None:
        return int(model.cfg.n_layers)
    n = getattr(source, "meta", {}).get("n_layers")
    if n is not None:
        return int(n)
    layers = [
        int(k.split(".")[1])
        for k in source
        if k.startswith("blocks.") and k.endswith("hook_resid_pre")
    ]
    if not layers:
        raise KeyError(
            "the cache holds no blocks.*.hook_resid_pre; cannot tell the number of layers"
        )
    return max(layers) + 1


def _split(source: Any, model: Any) -> tuple[Any, Any]:
    """``(model or None, source)``: the model is the source unless the source is a cache."""
    if _is_cache(source):
        return model, source
    if model is not None and model is not source:
        raise TypeError("model= is for a cache source; the source here is the model itself")
    return source, source


@torch.no_grad()
def accumulated_resid(
    source: Any,
    batch: Any = None,
    *,
    layer: int | None = None,
    incl_mid: bool = False,
    mlp_input: bool = False,
    positions: Any = None,
    apply_ln: bool = False,
    model: Any = None,
) -> ResidStack:
    """The residual stream before each block, and the final one (TransformerLens's
    ``ActivationCache.accumulated_resid``).

    Args:
        source: a ``HookedModel`` (then ``batch`` is run) or an ``ActivationCache`` holding
            ``blocks.*.hook_resid_pre`` and the last ``hook_resid_post``.
        batch: what to run (text, ids, a dict, a ``Batch``); with a cache, the ``Batch`` it
            came from when ``positions`` names positions.
        layer: streams entering blocks ``0 … layer - 1``, plus block ``layer``'s input;
            ``None`` (or ``n_layers``) for all, the final residual included.
        incl_mid: also the residual between attention and MLP (``hook_resid_mid``,
            labelled ``"{l}_mid"``) of every block before ``layer``, after that block's
            ``"{l}_pre"``.
        mlp_input: also block ``layer``'s ``hook_resid_mid`` (the MLP's input) as the last
            stream, so ``apply_ln`` divides by the MLP input's scale (TransformerLens's
            ``ln2``); needs ``layer < n_layers`` and a family with a ``resid_mid``
            (not GPT-NeoX's parallel attention and MLP).
        positions: ``interp.positions.selector`` semantics (``None``: every position).
        apply_ln: as TransformerLens: with every layer, the model's final norm applied to
            each stream with its own scale (weight and bias included, i.e. what
            ``model.unembed`` decodes); with ``layer < n_layers``, each stream centred and
            divided by the scale of the last stream (block ``layer``'s attention input, or
            its MLP input with ``mlp_input``), before any weight.
        model: the model, when ``source`` is a cache and ``apply_ln=True``.
    """
    model, source = _split(source, model)
    n = _n_layers(source, model)
    last = n if layer is None or layer == -1 else _stream_index(layer, n, "layer")
    if mlp_input:
        _check_mlp_input(last, n)
    names, labels, layers = [], [], []
    for i in range(last + 1):
        names.append(_stream_name(i, n))
        labels.append(f"{i}_pre" if i < n else "final_post")
        layers.append(i)
        if (incl_mid and i < last) or (mlp_input and i == last):
            names.append(_mid_name(source, model, i))
            labels.append(f"{i}_mid")
            layers.append(i)
    got = _gather(source, batch, names, positions, model)
    stack = torch.stack([got[name] for name in names])
    if apply_ln:
        spec = _needs_model(model)
        if last == n:
            stack = _normalize(spec.norm, stack)
        else:
            stack = apply_ln_to_stack(spec.norm, stack, stack[-1])
    return ResidStack(stack, tuple(labels), tuple(layers))


def _check_mlp_input(last: int, n: int) -> None:
    if last == n:
        raise ValueError(
            f"mlp_input=True reads the input of block `layer`'s MLP; the final residual "
            f"(layer={n} = n_layers, or None / -1) has no MLP after it: pass layer < {n}"
        )


def _mid_name(source: Any, model: Any, layer: int) -> str:
    """``blocks.{layer}.hook_resid_mid``, or a clear error where the family has none."""
    name = f"blocks.{layer}.hook_resid_mid"
    have = model.hook_names if model is not None else source
    if name not in have:
        raise ValueError(
            f"{name} does not exist here"
            + (
                f" ({model.cfg.family}: attention and MLP read the same residual in parallel)"
                if model is not None and getattr(model.cfg, "family", None)
                else " (not in the cache: capture blocks.*.hook_resid_mid)"
            )
            + "; incl_mid / mlp_input need the residual between attention and MLP"
        )
    return name


def _needs_model(model: Any) -> UnembedSpec:
    if model is None:
        raise TypeError("apply_ln=True needs the model's final norm: pass model=")
    return _spec(model)


def _normalize(norm: NormSpec, x: Tensor) -> Tensor:
    """The norm with each vector's own scale, weight and bias included (float32)."""
    y = x.float()
    if norm.kind == "layer":
        y = y - y.mean(-1, keepdim=True)
    return _weighted(norm, y / norm_scale(norm, x), bias=True)


def _has_pos(model: Any, source: Any) -> bool:
    if model is not None:
        return bool(model._has_pos_embed())
    return "hook_embed" in source and "hook_pos_embed" in source


@torch.no_grad()
def decompose_resid(
    source: Any,
    batch: Any = None,
    *,
    layer: int | None = None,
    mlp_input: bool = False,
    positions: Any = None,
    apply_ln: bool = False,
    model: Any = None,
) -> ResidStack:
    """The residual stream entering block ``layer`` (default: the final one) as the sum of
    ``embed`` (+ ``pos_embed``), each ``{l}_attn_out`` and each ``{l}_mlp_out``
    (TransformerLens's ``ActivationCache.decompose_resid``).

    ``embed`` is ``blocks.0.hook_resid_pre`` (so it includes whatever the family does to the
    token embedding, Gemma's ``sqrt(d_model)``), or, where a learned positional embedding is
    added (GPT-2), ``hook_embed`` with ``pos_embed`` the rest of ``blocks.0.hook_resid_pre``;
    a MoE block is one ``mlp_out``. With ``apply_ln=True`` every component is centred (LayerNorm) and
    divided by the scale of the residual it adds up to (``apply_ln_to_stack``), before the
    norm's weight. With ``mlp_input=True`` (``layer < n_layers``) the decomposed residual
    is block ``layer``'s MLP input (``hook_resid_mid``): ``{layer}_attn_out`` is added last,
    and ``apply_ln`` divides by that residual's scale (TransformerLens's ``ln2``). Other
    arguments as in ``accumulated_resid``.
    """
    model, source = _split(source, model)
    n = _n_layers(source, model)
    last = n if layer is None or layer == -1 else _stream_index(layer, n, "layer")
    if mlp_input:
        _check_mlp_input(last, n)
    pos = _has_pos(model, source)
    names = ["blocks.0.hook_resid_pre"] + (["hook_embed"] if pos else [])
    for i in range(last):
        names += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out"]
    resid_name = _stream_name(last, n)
    if mlp_input:
        resid_name = _mid_name(source, model, last)
        names.append(f"blocks.{last}.hook_attn_out")
    if apply_ln and resid_name not in names:
        names.append(resid_name)
    got = _gather(source, batch, names, positions, model)
    first = got["blocks.0.hook_resid_pre"]
    parts, labels, layers = [first], ["embed"], [-1]
    if pos:
        embed = got["hook_embed"].to(first.dtype)
        parts = [embed, first - embed]
        labels.append("pos_embed")
        layers.append(-1)
    for i in range(last):
        parts += [got[f"blocks.{i}.hook_attn_out"], got[f"blocks.{i}.hook_mlp_out"]]
        labels += [f"{i}_attn_out", f"{i}_mlp_out"]
        layers += [i, i]
    if mlp_input:
        parts.append(got[f"blocks.{last}.hook_attn_out"])
        labels.append(f"{last}_attn_out")
        layers.append(last)
    stack = torch.stack(parts)
    if apply_ln:
        stack = apply_ln_to_stack(_needs_model(model).norm, stack, got[resid_name])
    return ResidStack(stack, tuple(labels), tuple(layers))


@torch.no_grad()
def head_results(model: Any, batch: Any, *, positions: Any = None) -> HeadResults:
    """Each head's output in every block, ``hook_z[..., h, :] @ W_O[h]`` (float32).

    Gemma-2 normalises the attention output before adding it (``ln1_post``): there each
    head is read through that norm with the scale of the heads' sum, so heads and bias
    still add up to ``hook_attn_out``.
    """
    n = model.cfg.n_layers
    names = [f"blocks.{i}.attn.hook_z" for i in range(n)]
    got = _gather(model, batch, names, positions)
    return _head_results(model, [got[name] for name in names])


def _head_results(model: Any, zs: Sequence[Tensor]) -> HeadResults:
    results, biases = [], []
    for i, z in enumerate(zs):
        W_O, b_O = model._head_weights(i)
        if z.shape[-2:] != W_O.shape[:2]:
            raise ValueError(
                f"block {i}: hook_z {tuple(z.shape)} does not fit W_O {tuple(W_O.shape)}"
            )
        # [*rows, head, d_head] x [head, d_head, d_model] -> [head, *rows, d_model]
        heads = torch.einsum("...hd,hdm->h...m", z.float(), W_O.float())
        bias = torch.zeros_like(heads[0])
        if b_O is not None:
            bias = bias + b_O.float()
        post = model._attn_post_norm(i)
        if post is not None:
            total = heads.sum(0) + bias
            heads = _weighted(post, apply_ln_to_stack(post, heads, total), bias=False)
            bias = _weighted(post, apply_ln_to_stack(post, bias[None], total)[0], bias=True)
        results.append(heads)
        biases.append(bias)
    n_heads = results[0].shape[0] if results else 0
    return HeadResults(
        torch.stack(results), torch.stack(biases), tuple(range(len(zs))), tuple(range(n_heads))
    )


def _answer_ids(
    tokens: Any, rows: int, device: torch.device, what: str, tokenizer: Any = None
) -> Tensor:
    if isinstance(tokens, str) or (
        isinstance(tokens, list | tuple) and tokens and all(isinstance(t, str) for t in tokens)
    ):
        tokens = [
            _one_token(tokenizer, t, what)
            for t in ([tokens] if isinstance(tokens, str) else tokens)
        ]
        if len(tokens) == 1:
            tokens = tokens[0]
    t = torch.as_tensor(tokens, device=device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{what} must be token ids (ints), got a {t.dtype} tensor")
    if t.ndim == 0:
        t = t.expand(rows)
    if t.ndim != 1 or t.shape[0] != rows:
        raise ValueError(
            f"{what} must be one token id or one per row ({rows}), got shape {tuple(t.shape)}"
        )
    return t.long()


def _one_token(tokenizer: Any, text: str, what: str) -> int:
    if tokenizer is None:
        raise ValueError(f"{what}: text needs the model's tokenizer; pass token ids")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"{what}: {text!r} is {len(ids)} tokens ({ids}); an answer is one token (mind the "
            "leading space, e.g. ' Paris')"
        )
    return int(ids[0])


@torch.no_grad()
def dla(
    model: Any,
    batch: Any,
    answer_tokens: Any,
    wrong_tokens: Any = None,
    *,
    positions: Any = -1,
) -> DirectLogitAttribution:
    """Direct logit attribution of ``logit[answer] - logit[wrong]`` at one position per row.

    Each component of ``decompose_resid`` (and each head of ``head_results``) is normalised
    by the final residual's scale (``apply_ln_to_stack``), multiplied by the norm's weight
    and projected on ``W_U[:, answer] - W_U[:, wrong]``. The attributions add up to the
    model's final logit difference, before soft-capping where the family soft-caps.

    Args:
        model: a ``HookedModel``.
        batch: text(s), ids, a dict or a ``Batch``.
        answer_tokens: one token id, or one per row (``[batch]``); or text (a string, or
            one per row), each exactly one token of the model's tokenizer (``" Paris"``).
        wrong_tokens: the same for the subtracted logit; ``None`` attributes the answer's
            logit itself.
        positions: one position per row: an int (default ``-1``), a named position or a
            ``[batch]`` tensor (``interp.positions.selector``).
    """
    from interp.positions import as_batch, selector

    batch = as_batch(model, batch)
    sel = selector(positions, batch, device=model.device)
    if not (sel.kind == "index" and isinstance(sel.index, int)) and not (
        sel.kind == "rows" and sel.index.ndim == 1
    ):
        raise ValueError(
            f"dla reads one position per row: an int, a named position or a [batch] tensor; "
            f"got positions={sel.what}"
        )
    n = model.cfg.n_layers
    names = ["blocks.0.hook_resid_pre", *(["hook_embed"] if model._has_pos_embed() else [])]
    for i in range(n):
        names += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out"]
    names += [f"blocks.{i}.attn.hook_z" for i in range(n)]
    names.append(_stream_name(n, n))
    got = _gather(model, batch, names, positions)
    decomposed = decompose_resid(got, layer=None, model=model)
    final = got[_stream_name(n, n)]
    spec = _spec(model)
    rows = final.shape[0]
    tok = getattr(model, "tokenizer", None)
    answer = _answer_ids(answer_tokens, rows, final.device, "answer_tokens", tok)
    W_U = spec.W_U.float()
    direction = W_U[:, answer].T  # [batch, d_model]
    const = logit_bias(spec)
    const_diff = const[answer]
    if wrong_tokens is not None:
        wrong = _answer_ids(wrong_tokens, rows, final.device, "wrong_tokens", tok)
        direction = direction - W_U[:, wrong].T
        const_diff = const_diff - const[wrong]
    if spec.norm.weight is not None:
        direction = direction * spec.norm.weight.float()

    def project(stack: Tensor) -> Tensor:  # [k, batch, d_model] -> [k, batch]
        normalized = apply_ln_to_stack(spec.norm, stack, final)
        return (normalized * direction).sum(-1)

    components = project(decomposed.resid)
    labels = decomposed.labels
    if bool(const.ne(0).any()):  # the model has a final-norm or unembedding bias
        components = torch.cat([components, const_diff[None]])
        labels = (*labels, "bias")
    heads = _head_results(model, [got[f"blocks.{i}.attn.hook_z"] for i in range(n)])
    head_attr = project(heads.results.flatten(0, 1)).unflatten(0, heads.results.shape[:2])
    bias_attr = project(heads.bias)
    logits = unembed(UnembedSpec(spec.norm, spec.W_U, spec.b_U, None), final)
    logit_diff = logits.gather(-1, answer[:, None])[:, 0]
    if wrong_tokens is not None:
        logit_diff = logit_diff - logits.gather(-1, wrong[:, None])[:, 0]
    return DirectLogitAttribution(
        components, labels, head_attr, bias_attr, logit_diff, spec.softcap
    )


@torch.no_grad()
def logit_lens(model: Any, batch: Any, *, positions: Any = -1) -> LogitLens:
    """Logits of the residual stream entering every block and of the final residual, each
    through the model's own final norm (with its own scale) and unembedding
    (``model.unembed``; nostalgebraist 2020). The last entry is the model's own output."""
    streams = accumulated_resid(model, batch, positions=positions)
    spec = _spec(model)
    return LogitLens(unembed(spec, streams.resid), streams.labels, streams.layers)


def _one_per_row(positions: Any, batch: Any, device: torch.device, what: str):
    from interp.positions import selector

    sel = selector(positions, batch, device=device)
    if (sel.kind == "index" and isinstance(sel.index, int)) or (
        sel.kind == "rows" and sel.index.ndim == 1
    ):
        return sel
    raise ValueError(
        f"{what} position must be one per row: an int, a named position or a [batch] tensor; "
        f"got {sel.what}"
    )


def patchscope(
    model: Any,
    source_batch: Any,
    source: tuple[int, Any],
    target_batch: Any = None,
    target: tuple[int, Any] | None = None,
    *,
    read: Literal["logits", "generate"] = "logits",
    transform: Any = None,
    **generate_kwargs: Any,
) -> Patchscope:
    """Patchscopes (Ghandeharioun et al. 2024): read a hidden state of one prompt through
    another.

    The residual stream of ``source_batch`` at ``source = (layer, position)`` is written
    into ``target_batch`` (default: the source prompt) at ``target = (layer, position)``
    (default: the source's), optionally through ``transform(h) -> h``, and the target's
    next-token logits at the target position are read (``read="logits"``), or it generates
    (``read="generate"``; keyword arguments go to ``model.generate``, and the write edits
    the prompt's pass). Layers index residual streams as ``accumulated_resid`` does (``l``:
    entering block ``l``; ``n_layers`` or ``-1``: the final residual), so
    ``patchscope(model, b, (l, p), target=(-1, p))`` is the logit lens of stream ``l``.
    Positions are one per row (an int, a named position, a ``[batch]`` tensor); a
    one-row source is broadcast over the target's rows.
    """
    from interp.activations import capture
    from interp.positions import as_batch, decoding_step

    if read not in ("logits", "generate"):
        raise ValueError(f"read must be 'logits' or 'generate', got {read!r}")
    if read == "logits" and generate_kwargs:
        raise TypeError(f"{sorted(generate_kwargs)} are generate's arguments; read='generate'")
    n = model.cfg.n_layers
    src_layer, src_pos = _pair(source, "source")
    tgt_layer, tgt_pos = _pair(target if target is not None else source, "target")
    src_layer = _stream_index(src_layer, n, "source layer")
    tgt_layer = _stream_index(tgt_layer, n, "target layer")
    src = as_batch(model, source_batch)
    tgt = src if target_batch is None else as_batch(model, target_batch)
    _one_per_row(src_pos, src, model.device, "source")
    tgt_sel = _one_per_row(tgt_pos, tgt, model.device, "target")
    name = _stream_name(src_layer, n)
    hidden = capture(model, src, name, positions=src_pos)[name]  # [src rows, d_model]
    if transform is not None:
        hidden = transform(hidden)
    rows = len(tgt)
    if (
        hidden.ndim != 2
        or hidden.shape[0] not in (1, rows)
        or hidden.shape[-1] != model.cfg.d_model
    ):
        raise ValueError(
            f"the source hidden state {tuple(hidden.shape)} must be [1 or {rows} rows, "
            f"d_model = {model.cfg.d_model}] for a target of {rows} rows"
        )
    hidden = hidden.expand(rows, -1)
    target_name = _stream_name(tgt_layer, n)

    def write(act: Tensor, hook: Any) -> Tensor | None:
        if decoding_step():
            return None  # the prompt's pass was patched; its keys and values carry it
        return tgt_sel.scatter(act, hidden, hook.name)

    with model.hooks(fwd=[(target_name, write)]):
        if read == "generate":
            tokens = model.generate(tgt, **generate_kwargs)
            return Patchscope(None, tokens, (src_layer, src_pos), (tgt_layer, tgt_pos))
        from interp.positions import running

        with torch.no_grad(), running(tgt):
            logits = model.forward(tgt.input_ids, tgt.attention_mask)
    logits = tgt_sel.select(logits, "logits").float()
    return Patchscope(logits, None, (src_layer, src_pos), (tgt_layer, tgt_pos))


def _pair(value: Any, what: str) -> tuple[Any, Any]:
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise TypeError(f"{what} must be a (layer, position) pair, got {value!r}")
    return value[0], value[1]

"""Routing traces: which experts each token picked, with what weight, in every MoE layer.

Design
------
``trace(model, batch, mask)`` runs one forward pass with read-only hooks on
``blocks.{l}.mlp.hook_expert_indices`` / ``hook_expert_weights`` (and
optionally ``hook_router_logits``) of every MoE layer and keeps only the
tokens in ``mask`` — e.g. the assistant response in SteerMoE's paired
measurement (Fayyaz et al. 2025, §3.1). Tokens are stored flattened in
row-major order, so example ``i`` owns the contiguous slice
``offsets[i]:offsets[i+1]``; ``lengths`` records the per-example token counts,
which is what the statistics in ``interp.moe.stats`` resample when they
bootstrap over examples and what length matching truncates.

Storage is compact: expert ids as int8 (int16 above 127 experts), weights and
logits as float16 by default. For DeepSeek-V2-Lite (26 MoE layers, top-6 of
64) that is ~330 bytes per token without logits.

``RoutingTrace`` itself is plain data (no model): the statistics are pure
functions of it. Per-example sufficient statistics (``counts``, ``mass``)
are ``[n_examples, n_layers, n_experts]`` tensors.

Hooks compose with ``interp.moe.steer``: call ``trace`` *inside* the steer
context so its read-only hooks run after the steering replacement and see the
re-selected experts (hooks on one router run in registration order).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["RoutingTrace", "concat", "trace"]


@dataclass(frozen=True)
class RoutingTrace:
    """Top-k routing of the selected tokens of a batch, per MoE layer.

    Attributes:
        layers: decoder-layer indices of the MoE layers, in order (the
            ``n_layers`` axis below indexes this tuple, not the model's layers).
        n_experts: routed experts per layer.
        indices: ``[n_layers, n_tokens, top_k]`` selected expert ids (int8/int16).
        weights: ``[n_layers, n_tokens, top_k]`` their gate weights (as the MoE
            block uses them, incl. any ``routed_scaling_factor``).
        lengths: ``[n_examples]`` kept tokens per example; tokens are stored
            example after example.
        positions: ``[n_tokens]`` sequence position of each kept token.
        logits: ``[n_layers, n_tokens, n_experts]`` router logits, or ``None``.
    """

    layers: tuple[int, ...]
    n_experts: int
    indices: Int[Tensor, "n_layers n_tokens top_k"]
    weights: Float[Tensor, "n_layers n_tokens top_k"]
    lengths: Int[Tensor, " n_examples"]
    positions: Int[Tensor, " n_tokens"]
    logits: Float[Tensor, "n_layers n_tokens n_experts"] | None = None

    def __post_init__(self) -> None:
        if len(self.layers) != self.indices.shape[0]:
            raise ValueError(
                f"{len(self.layers)} layers but indices have {self.indices.shape[0]} on dim 0"
            )
        if int(self.lengths.sum()) != self.indices.shape[1]:
            raise ValueError(
                f"lengths sum to {int(self.lengths.sum())} but there are "
                f"{self.indices.shape[1]} tokens"
            )
        if bool((self.lengths < 0).any()):
            raise ValueError("lengths must be non-negative")
        if self.logits is not None and self.logits.shape[-1] != self.n_experts:
            raise ValueError(f"logits have {self.logits.shape[-1]} experts, not {self.n_experts}")

    # -- shape -------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return self.indices.shape[1]

    @property
    def n_examples(self) -> int:
        return self.lengths.shape[0]

    @property
    def top_k(self) -> int:
        return self.indices.shape[2]

    @property
    def offsets(self) -> Int[Tensor, " n_examples_plus_1"]:
        """Start of each example's token slice, plus the total (``[n_examples + 1]``)."""
        zero = torch.zeros(1, dtype=torch.long, device=self.lengths.device)
        return torch.cat([zero, self.lengths.long().cumsum(0)])

    @property
    def example_ids(self) -> Int[Tensor, " n_tokens"]:
        """Example index of every stored token."""
        return torch.repeat_interleave(
            torch.arange(self.n_examples, device=self.lengths.device), self.lengths.long()
        )

    def layer_index(self, layer: int) -> int:
        """Position of decoder layer ``layer`` on the ``n_layers`` axis."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(
                f"layer {layer} is not a traced MoE layer; traced: {self.layers}"
            ) from None

    # -- per-example sufficient statistics ----------------------------------------
    def _per_example(self, values: Tensor) -> Tensor:
        L = self.indices.shape[0]
        n, E = self.n_examples, self.n_experts
        ex = self.example_ids.to(self.indices.device)
        layer = torch.arange(L, device=ex.device)[:, None, None]
        key = (layer * n + ex[None, :, None]) * E + self.indices.long()
        out = torch.zeros(L * n * E, dtype=torch.float64, device=ex.device)
        out.index_add_(0, key.reshape(-1), values.reshape(-1))
        return out.view(L, n, E).permute(1, 0, 2).contiguous()

    def counts(self) -> Float[Tensor, "n_examples n_layers n_experts"]:
        """Tokens of each example on which each (layer, expert) was in the top-k."""
        return self._per_example(torch.ones(self.indices.shape, dtype=torch.float64))

    def mass(self) -> Float[Tensor, "n_examples n_layers n_experts"]:
        """Summed gate weight each (layer, expert) received over each example's tokens."""
        return self._per_example(self.weights.to(torch.float64))

    def selected(self) -> Bool[Tensor, "n_layers n_tokens n_experts"]:
        """Dense one-hot of the top-k selection."""
        out = torch.zeros(
            (*self.indices.shape[:2], self.n_experts), dtype=torch.bool, device=self.indices.device
        )
        return out.scatter_(-1, self.indices.long(), True)

    # -- slicing -------------------------------------------------------------------
    def _take_tokens(self, token_idx: Tensor, lengths: Tensor) -> RoutingTrace:
        return replace(
            self,
            indices=self.indices[:, token_idx],
            weights=self.weights[:, token_idx],
            lengths=lengths,
            positions=self.positions[token_idx],
            logits=None if self.logits is None else self.logits[:, token_idx],
        )

    def select(self, examples: Sequence[int] | Tensor) -> RoutingTrace:
        """The trace of the given examples (in that order; repeats allowed)."""
        ex = torch.as_tensor(examples, dtype=torch.long).reshape(-1)
        if ex.numel() and (int(ex.min()) < 0 or int(ex.max()) >= self.n_examples):
            raise IndexError(f"example ids must be in [0, {self.n_examples})")
        starts, lengths = self.offsets[:-1][ex], self.lengths.long()[ex]
        token_idx = _ranges(starts, lengths)
        return self._take_tokens(token_idx, self.lengths[ex])

    def truncate(self, max_tokens: int | Sequence[int] | Tensor) -> RoutingTrace:
        """Keep at most the first ``max_tokens`` tokens of each example (an int or one per example)."""
        cap = torch.as_tensor(max_tokens, dtype=torch.long).expand(self.n_examples)
        if bool((cap < 0).any()):
            raise ValueError("max_tokens must be non-negative")
        lengths = torch.minimum(self.lengths.long(), cap)
        token_idx = _ranges(self.offsets[:-1], lengths)
        return self._take_tokens(token_idx, lengths.to(self.lengths.dtype))

    def to(self, device: torch.device | str) -> RoutingTrace:
        return replace(
            self,
            indices=self.indices.to(device),
            weights=self.weights.to(device),
            lengths=self.lengths.to(device),
            positions=self.positions.to(device),
            logits=None if self.logits is None else self.logits.to(device),
        )

    # -- I/O -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save as one safetensors file (atomically: temp file + rename)."""
        from safetensors.torch import save_file

        from interp.cache import atomic_write

        tensors = {
            "indices": self.indices,
            "weights": self.weights,
            "lengths": self.lengths,
            "positions": self.positions,
        }
        if self.logits is not None:
            tensors["logits"] = self.logits
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta = {"layers": json.dumps(list(self.layers)), "n_experts": str(self.n_experts)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return cls(
            layers=tuple(json.loads(meta["layers"])),
            n_experts=int(meta["n_experts"]),
            indices=t["indices"],
            weights=t["weights"],
            lengths=t["lengths"],
            positions=t["positions"],
            logits=t.get("logits"),
        )


def _ranges(starts: Tensor, lengths: Tensor) -> Tensor:
    """Concatenated ``arange(s, s + n)`` for each (s, n)."""
    lengths = lengths.long()
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=starts.device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=starts.device), lengths)
    seg_start = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
    within = torch.arange(total, device=starts.device) - seg_start[seg]
    return starts.long()[seg] + within


def _index_dtype(n_experts: int) -> torch.dtype:
    return torch.int8 if n_experts <= 127 else torch.int16


def trace(
    model: Any,
    batch: Any,
    mask: Bool[Tensor, "batch pos"] | str | None = None,
    *,
    logits: bool = True,
    dtype: torch.dtype = torch.float16,
    **forward_kwargs: Any,
) -> RoutingTrace:
    """Record the top-k routing of every MoE layer on the tokens of ``mask``.

    Args:
        model: a MoE ``HookedModel`` (``interp.load`` / ``interp.tiny``).
        batch: anything ``model`` accepts (text(s), ids, dict, ``Batch``).
        mask: ``[batch, pos]`` bool mask or a named mask of a chat ``Batch``
            (e.g. ``"assistant"``); ``None`` keeps every non-padding token.
            Padding is always excluded.
        logits: also keep the router logits.
        dtype: storage dtype of weights and logits.

    Returns:
        A ``RoutingTrace`` (on CPU) with one example per batch row.
    """
    from interp.positions import as_batch

    batch = as_batch(model, batch)
    keep = batch.attention_mask.bool()
    if isinstance(mask, str):
        if mask not in batch.masks:
            raise KeyError(
                f"unknown named mask {mask!r}; this batch has {sorted(batch.masks) or 'none'}"
            )
        mask = batch.masks[mask]
    if mask is not None:
        mask = torch.as_tensor(mask, device=keep.device)
        if mask.dtype != torch.bool or mask.shape != keep.shape:
            raise ValueError(
                f"mask must be a [batch, pos] = {tuple(keep.shape)} bool tensor, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        keep = keep & mask
    layers = tuple(model.cfg.moe_layers)
    if not layers:
        raise ValueError(f"{model!r} has no MoE layers to trace")
    n_experts = int(model.cfg.n_experts)
    idx_dtype = _index_dtype(n_experts)
    store: dict[str, Tensor] = {}

    def hook(tensor: Tensor, hook: Any) -> None:
        value = tensor.detach()[keep]
        kind = hook.name.rsplit(".", 1)[-1]
        value = value.to(idx_dtype) if kind == "hook_expert_indices" else value.to(dtype)
        store[hook.name] = value.cpu()

    kinds = ["hook_expert_indices", "hook_expert_weights"] + (
        ["hook_router_logits"] if logits else []
    )
    names = [f"blocks.{layer}.mlp.{kind}" for kind in kinds for layer in layers]
    with torch.no_grad(), model.hooks(fwd=[(n, hook) for n in names]):
        model.forward(batch.input_ids, batch.attention_mask, **forward_kwargs)
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"routing hooks {missing[:3]} never fired during the forward pass")

    def stacked(kind: str) -> Tensor:
        return torch.stack([store[f"blocks.{layer}.mlp.{kind}"] for layer in layers])

    _, cols = keep.nonzero(as_tuple=True)
    return RoutingTrace(
        layers=layers,
        n_experts=n_experts,
        indices=stacked("hook_expert_indices"),
        weights=stacked("hook_expert_weights"),
        lengths=keep.sum(dim=1).cpu(),
        positions=cols.cpu(),
        logits=stacked("hook_router_logits") if logits else None,
    )


def concat(traces: Sequence[RoutingTrace]) -> RoutingTrace:
    """One trace holding the examples of ``traces`` in order (e.g. a dataset traced in batches).

    The traces must cover the same MoE layers and expert count, with the same top-k, and
    either all or none carry router logits. Tensors are moved to the first trace's device.
    """
    if not traces:
        raise ValueError("concat needs at least one RoutingTrace")
    first = traces[0]
    for i, t in enumerate(traces[1:], start=1):
        if t.layers != first.layers or t.n_experts != first.n_experts or t.top_k != first.top_k:
            raise ValueError(
                f"trace {i} differs from trace 0: layers {t.layers} vs {first.layers}, "
                f"experts {t.n_experts} vs {first.n_experts}, top_k {t.top_k} vs {first.top_k}"
            )
        if (t.logits is None) != (first.logits is None):
            raise ValueError(f"trace {i} and trace 0 differ in whether they carry router logits")
    dev = first.indices.device
    return RoutingTrace(
        layers=first.layers,
        n_experts=first.n_experts,
        indices=torch.cat([t.indices.to(dev) for t in traces], dim=1),
        weights=torch.cat([t.weights.to(dev) for t in traces], dim=1),
        lengths=torch.cat([t.lengths.to(first.lengths.device) for t in traces]),
        positions=torch.cat([t.positions.to(first.positions.device) for t in traces]),
        logits=None
        if first.logits is None
        else torch.cat([t.logits.to(dev) for t in traces], dim=1),  # type: ignore[union-attr]
    )

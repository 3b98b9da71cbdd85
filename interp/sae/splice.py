"""Splice an SAE into a model's forward pass through a TransformerLens-style hook.

Any SAE of the ``interp.sae.SAE`` protocol works: ``TopKSAE`` through its sparse
(index, value) latents (the fast path: only the k kept latents are decoded for edits),
and dense-latent SAEs (``StandardSAE``, ``JumpReLUSAE``, e.g. loaded from SAELens)
through ``encode_dense``/``decode``.

``splice(sae, ...)`` returns ``fn(activation, hook) -> activation`` for any hook point of
``interp``'s ``HookedModel`` (or TransformerLens's ``run_with_hooks``), with the
activation shaped ``[batch, pos, d_in]`` (any leading shape works).

* ``keep_error=False``: the activation is replaced by the reconstruction x̂ (edited).
* ``keep_error=True``: the SAE error x − x̂ is added back, so only the feature edits
  change the activation. We compute this as x + (x̂_edited − x̂) where the difference is
  decoded from the *changed latents only*; with no edits it is exactly zero and the
  output equals the input bit for bit (x̂ + (x − x̂) would not, in floating point).

Feature edits: ``ablate`` zeroes the listed latents, ``scale`` multiplies latents by
factors. Only latents among a token's top k can change, since others are already 0.
The SAE runs in fp32; the result is cast back to the activation's dtype.

``ce_loss_recovered`` is the usual "fraction of CE loss recovered" summary of a splice
(Bricken et al. 2023; SAELens ``evals``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from interp.sae.archs import SAE
from interp.sae.functional import TopKActivations, sparse_decode
from interp.sae.model import TopKSAE

__all__ = ["ce_loss_recovered", "splice"]


def _factors(
    sae: TopKSAE | SAE, ablate: Iterable[int], scale: Mapping[int, float | int] | None
) -> Tensor | None:
    """Per-latent multiplier over d_sae (1 = untouched), or None when nothing is edited."""
    factors = torch.ones(sae.d_sae)
    edited = False
    for name, mapping in (("scale", dict(scale or {})), ("ablate", dict.fromkeys(ablate, 0.0))):
        for latent, factor in mapping.items():
            if isinstance(latent, bool) or not isinstance(latent, int):
                raise TypeError(f"{name}: latent ids must be ints, got {latent!r}")
            if not 0 <= latent < sae.d_sae:
                raise ValueError(f"{name}: latent {latent} out of range [0, {sae.d_sae})")
            factors[latent] = float(factor)
            edited = True
    return factors if edited else None


def splice(
    sae: TopKSAE | SAE,
    keep_error: bool = False,
    ablate: Iterable[int] = (),
    scale: Mapping[int, float | int] | None = None,
) -> Callable[[Tensor, Any], Tensor]:
    """Hook function replacing an activation by the SAE reconstruction, with feature edits.

    ``ablate`` latents are zeroed (applied after ``scale``, so ablation wins).
    """
    if not isinstance(sae, TopKSAE):
        if not isinstance(sae, SAE):
            raise TypeError(
                "splice needs a TopKSAE or an SAE with d_in, d_sae, W_dec, b_dec, "
                f"encode_dense and decode; got {type(sae).__name__}"
            )
        return _dense_splice(sae, keep_error, _factors(sae, ablate, scale))
    factors = _factors(sae, ablate, scale)

    def hook_fn(activation: Tensor, hook: Any = None) -> Tensor:
        del hook  # TransformerLens signature; the hook point is not needed
        if keep_error and factors is None:
            return activation
        latents = sae.encode(activation)
        if factors is None:
            return sae.decode(latents).to(activation.dtype)
        f = factors.to(latents.values.device)[latents.indices]
        if not keep_error:
            edited = TopKActivations(latents.indices, latents.values * f)
            return sae.decode(edited).to(activation.dtype)
        delta = sparse_decode(latents.indices, latents.values * (f - 1.0), sae.W_dec)
        return activation + delta.to(activation.dtype)

    return hook_fn


def _dense_splice(
    sae: SAE, keep_error: bool, factors: Tensor | None
) -> Callable[[Tensor, Any], Tensor]:
    """``splice`` for dense-latent SAEs: z = encode_dense(x), edits z · factors."""

    def hook_fn(activation: Tensor, hook: Any = None) -> Tensor:
        del hook
        if keep_error and factors is None:
            return activation
        z = sae.encode_dense(activation)
        if factors is None:
            return sae.decode(z).to(activation.dtype)
        f = factors.to(device=z.device, dtype=z.dtype)
        if not keep_error:
            return sae.decode(z * f).to(activation.dtype)
        delta = (z * (f - 1.0)) @ sae.W_dec.to(z.dtype)
        return activation + delta.to(activation.dtype)

    return hook_fn


def ce_loss_recovered(
    clean_loss: float | Tensor,
    spliced_loss: float | Tensor,
    zero_ablation_loss: float | Tensor,
) -> float:
    """(L_zero − L_spliced) / (L_zero − L_clean): 1 = splice is lossless, 0 = as bad as zeroing."""
    clean, spliced, zero = (float(v) for v in (clean_loss, spliced_loss, zero_ablation_loss))
    if zero == clean:
        raise ValueError(
            "ce_loss_recovered is undefined when zero ablation does not change the loss "
            f"(clean = zero-ablation = {clean})"
        )
    return (zero - spliced) / (zero - clean)

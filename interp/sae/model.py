"""``TopKSAE``: a thin ``nn.Module`` around the pure TopK math in ``functional``.

Parameters use the names of Gao et al. (2024) and SAELens: ``W_enc`` [d_in, d_sae],
``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae], ``b_dec`` [d_in]. They are always fp32;
inputs in bf16/fp16 are cast in, so parameters and optimizer state never lose
precision to the activations' storage dtype.

Initialization (``init=``): ``"sparsify"`` (default) is EleutherAI's ``sparsify``:
encoder rows drawn like ``nn.Linear``'s weight (uniform in ±1/√d_in, so each row has norm
≈ 1/√3 ≈ 0.58), decoder rows the same directions at unit norm; ``"gao"`` follows Gao et
al. (2024, Appendix A.1): random unit-norm Gaussian decoder rows, encoder = decoder
transpose ("tied init"). The default is what trains to the lower held-out FVU per token
(``benchmarks/sae_throughput.py``'s ablation: 0.302 vs 0.333 after 74k tokens of the
embedded model's layer-15 residuals with schedule-free SignSGD, 0.710 vs 0.750 with
Adam). Both set b_enc = 0; b_dec is set by the trainer on its first batch
(``init_b_dec``: the geometric median, or the mean as sparsify does).

Saving writes SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``,
architecture ``"topk"``), so ``sae_lens.SAE.load_from_disk`` reads our directories;
see ``interp.sae.saelens``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from interp.sae.functional import (
    AllReduce,
    TopKActivations,
    _auxk_loss,
    _blocks,
    _dead_indices,
    _sparse_decode,
    _topk_encode_planned,
    _topk_encode_with_aux,
    dense_decode,
    fvu,
    geometric_median,
    sparse_decode,
)

__all__ = ["INITS", "SAEOutput", "TopKSAE", "TopKSAEConfig"]

INITS = ("gao", "sparsify")
"""``TopKSAE(init=...)`` choices (see the module docstring)."""


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")


@dataclass(frozen=True)
class TopKSAEConfig:
    """Architecture of a TopK SAE. ``hook_name``/``model_name`` are provenance only."""

    d_in: int
    d_sae: int
    k: int
    hook_name: str | None = None
    model_name: str | None = None

    def __post_init__(self) -> None:
        _check_int("d_in", self.d_in)
        _check_int("d_sae", self.d_sae)
        _check_int("k", self.k)
        if self.k > self.d_sae:
            raise ValueError(
                f"k must be ≤ d_sae: cannot keep k={self.k} latents out of d_sae={self.d_sae}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SAEOutput(NamedTuple):
    """Result of ``TopKSAE.forward``.

    ``x_hat`` has the input's shape; ``latents`` are the TopK (index, value) pairs;
    ``fvu`` and ``auxk_loss`` are scalar loss terms (``auxk_loss`` is exactly 0 when no
    dead mask is given or no latent is dead).
    """

    x_hat: Tensor
    latents: TopKActivations
    fvu: Tensor
    auxk_loss: Tensor


class SAEModule(nn.Module):
    """What every SAE class shares: ``cfg.d_in`` / ``cfg.d_sae`` as properties, and the input
    check and cast (last dim ``d_in``, to the encoder's dtype)."""

    cfg: Any
    W_enc: nn.Parameter

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}"

    def _cast_in(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"expected activations with last dim d_in={self.d_in}, got {tuple(x.shape)}"
            )
        return x.to(self.W_enc.dtype)


class TopKSAE(SAEModule):
    """TopK sparse autoencoder: z = TopK(ReLU(W_enc (x − b_dec) + b_enc)), x̂ = W_dec z + b_dec."""

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        *,
        hook_name: str | None = None,
        model_name: str | None = None,
        generator: torch.Generator | None = None,
        init: str = "sparsify",
    ) -> None:
        super().__init__()
        self.cfg = TopKSAEConfig(
            d_in=d_in, d_sae=d_sae, k=k, hook_name=hook_name, model_name=model_name
        )
        if init == "gao":
            W_dec = torch.randn(d_sae, d_in, generator=generator)
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            enc_rows = W_dec.clone()
        elif init == "sparsify":
            bound = 1 / math.sqrt(d_in)  # nn.Linear's default (kaiming_uniform, a=√5)
            enc_rows = torch.rand(d_sae, d_in, generator=generator).mul_(2 * bound).sub_(bound)
            W_dec = enc_rows / (enc_rows.norm(dim=1, keepdim=True) + torch.finfo().eps)
        else:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.W_dec = nn.Parameter(W_dec)
        # W_enc is [d_in, d_sae] but stored as the transpose of a row-major [d_sae, d_in]
        # buffer: the sparse encoder backward then writes whole contiguous rows (one
        # per latent) and its gradient already has the parameter's strides.
        self.W_enc = nn.Parameter(enc_rows.t())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @classmethod
    def from_config(
        cls, cfg: TopKSAEConfig, *, generator: torch.Generator | None = None, init: str = "sparsify"
    ) -> TopKSAE:
        return cls(**cfg.to_dict(), generator=generator, init=init)

    @property
    def k(self) -> int:
        return self.cfg.k

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"

    # ---- encode / decode -------------------------------------------------------------

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> TopKActivations:
        """Top-k latents of ``x`` as (indices, values), each ``[*batch, k]``."""
        x = self._cast_in(x)
        acts, _ = _topk_encode_with_aux(x, self.W_enc, self.b_enc, self.b_dec, self.k)
        return acts

    def encode_dense(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Latents as a dense ``[*batch, d_sae]`` tensor (zeros outside the top k)."""
        return self.encode(x).to_dense(self.d_sae)

    def decode(self, latents: TopKActivations | Tensor) -> Tensor:
        """Reconstruction from sparse ``TopKActivations`` or from dense ``[*batch, d_sae]`` latents."""
        if isinstance(latents, TopKActivations):
            return sparse_decode(latents.indices, latents.values, self.W_dec, self.b_dec)
        if latents.shape[-1] != self.d_sae:
            raise ValueError(
                f"dense latents need last dim d_sae={self.d_sae}, got {tuple(latents.shape)}"
            )
        return dense_decode(latents.to(self.W_dec.dtype), self.W_dec, self.b_dec)

    def forward(
        self,
        x: Float[Tensor, "*batch d_in"],
        *,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
        k_aux: int | None = None,
        all_reduce: AllReduce | None = None,
    ) -> SAEOutput:
        """Reconstruction and loss terms.

        ``dead_mask`` marks dead latents for the AuxK term (``k_aux`` defaults to
        d_in // 2, Gao et al. 2024 Appendix B.1, capped at the number of dead latents).
        ``all_reduce`` is for data-parallel training (see ``functional.fvu``).
        """
        x = self._cast_in(x)
        flat = x.reshape(-1, self.d_in)
        k_aux = self.d_in // 2 if k_aux is None else k_aux
        dead = _dead_indices(dead_mask, k_aux)  # once: the encoder and the AuxK loss read it
        acts, aux, plan = _topk_encode_planned(
            flat, self.W_enc, self.b_enc, self.b_dec, self.k, dead, k_aux
        )
        x_hat = _sparse_decode(acts.indices, acts.values, self.W_dec, self.b_dec, plan)
        fvu_term = fvu(flat, x_hat, all_reduce=all_reduce)
        aux_term = _auxk_loss(flat, x_hat, aux, self.W_dec, all_reduce=all_reduce, dead=dead)
        lead = tuple(x.shape[:-1])
        latents = TopKActivations(
            acts.indices.reshape(*lead, self.k), acts.values.reshape(*lead, self.k)
        )
        return SAEOutput(x_hat.reshape(x.shape), latents, fvu_term, aux_term)

    # ---- training-time constraints (Gao et al. 2024, Appendix A.1) ---------------------

    @torch.no_grad()
    def init_b_dec(
        self,
        sample: Float[Tensor, "n d_in"],
        *,
        max_iter: int = 100,
        method: str = "geometric_median",
    ) -> None:
        """Set b_dec to the geometric median of ``sample`` (Weiszfeld iterations), or to its
        mean with ``method="mean"`` (sparsify's choice)."""
        sample = self._cast_in(sample)
        if method == "geometric_median":
            self.b_dec.copy_(geometric_median(sample, max_iter=max_iter))
        elif method == "mean":
            self.b_dec.copy_(sample.mean(0))
        else:
            raise ValueError(f"method must be 'geometric_median' or 'mean', got {method!r}")

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (``train_sae``: before each forward with
        SignSGD, after each optimizer step with Adam)."""
        tiny = torch.finfo(self.W_dec.dtype).tiny
        for (rows,) in _blocks(self.W_dec, rows=True):
            rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(tiny))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the gradient component parallel to each (unit-norm) decoder row.

        With unit-norm rows the parallel component only changes a row's norm, which the
        renormalization after the step undoes anyway; removing it keeps Adam's moments
        for the direction (Gao et al. 2024, Appendix A.1; Bricken et al. 2023).
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        for g, w in _blocks(grad, self.W_dec, rows=True):
            g.addcmul_(torch.linalg.vecdot(g, w).unsqueeze(1), w, value=-1.0)  # in place

    # ---- persistence (SAELens format) -------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens TopK format) atomically."""
        from interp.sae.saelens import save_saelens

        return save_saelens(self, path)

    @classmethod
    def load(cls, path: str | Path) -> TopKSAE:
        """Load a TopK directory in SAELens's format (ours or one written by SAELens);
        other architectures raise (``interp.sae.load_saelens`` loads them)."""
        from interp.sae.saelens import load_topk_saelens

        return load_topk_saelens(path)

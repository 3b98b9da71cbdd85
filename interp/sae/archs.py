"""Dense-latent SAEs for inference: SAELens's Standard (ReLU) and JumpReLU architectures.

``TopKSAE`` (``interp.sae.model``) keeps its latents sparse; most pretrained SAEs are
ReLU or JumpReLU SAEs whose latents are a dense ``[..., d_sae]`` tensor. These two small
classes compute exactly what SAELens's inference classes compute (``sae_lens/saes/
standard_sae.py``, ``jumprelu_sae.py``, ``sae.py``), op for op:

    sae_in = x − b_dec · apply_b_dec_to_input
    pre    = sae_in @ W_enc + b_enc
    z      = ReLU(pre)                       (StandardSAE)
    z      = ReLU(pre) · [pre > threshold]   (JumpReLUSAE)
    x̂      = z @ W_dec + b_dec

``apply_b_dec_to_input`` is kept as a flag rather than folded into ``b_enc`` so that
encodings match SAELens's to the last bit (a fold would move pre-activations by rounding
and can flip a JumpReLU gate sitting on its threshold). Parameters are fp32; inputs are
cast in and outputs are fp32 (``splice`` casts back to the activation's dtype).

The ``SAE`` protocol is what ``splice`` and ``evaluate_on_model`` need from any SAE:
``d_in``, ``d_sae``, ``W_dec``, ``b_dec``, ``encode_dense`` and ``decode`` of dense
latents. ``TopKSAE`` satisfies it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interp.sae.model import SAEModule

__all__ = ["SAE", "DenseSAEConfig", "JumpReLUSAE", "StandardSAE"]


@runtime_checkable
class SAE(Protocol):
    """What ``splice`` and ``evaluate_on_model`` use: dense encode and decode."""

    W_dec: Tensor
    b_dec: Tensor

    @property
    def d_in(self) -> int: ...

    @property
    def d_sae(self) -> int: ...

    def encode_dense(self, x: Tensor) -> Tensor: ...

    def decode(self, latents: Any) -> Tensor: ...


@dataclass(frozen=True)
class DenseSAEConfig:
    """Architecture of a Standard / JumpReLU SAE. ``hook_name``/``model_name`` are provenance."""

    d_in: int
    d_sae: int
    apply_b_dec_to_input: bool = True
    hook_name: str | None = None
    model_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise TypeError(
                f"apply_b_dec_to_input must be a bool, got {self.apply_b_dec_to_input!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StandardSAE(SAEModule):
    """ReLU SAE (SAELens ``"standard"``): z = ReLU((x − b_dec) W_enc + b_enc), x̂ = z W_dec + b_dec."""

    architecture = "standard"
    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        apply_b_dec_to_input: bool = True,
        hook_name: str | None = None,
        model_name: str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = DenseSAEConfig(d_in, d_sae, apply_b_dec_to_input, hook_name, model_name)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def pre_activations(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """(x − b_dec · apply_b_dec_to_input) W_enc + b_enc, as SAELens computes it."""
        sae_in = self._cast_in(x) - self.b_dec * self.cfg.apply_b_dec_to_input
        return sae_in @ self.W_enc + self.b_enc

    def _activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Dense latents ``[*batch, d_sae]``."""
        return self._activation(self.pre_activations(x))

    def encode_dense(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Same as ``encode`` (the protocol name shared with ``TopKSAE``)."""
        return self.encode(x)

    def decode(self, latents: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_in"]:
        """z W_dec + b_dec from dense latents."""
        if latents.shape[-1] != self.d_sae:
            raise ValueError(
                f"dense latents need last dim d_sae={self.d_sae}, got {tuple(latents.shape)}"
            )
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_in"]:
        """The reconstruction x̂ (SAELens's ``SAE.forward`` without the error term)."""
        return self.decode(self.encode(x))


class JumpReLUSAE(StandardSAE):
    """JumpReLU SAE (SAELens ``"jumprelu"``, Rajamanoharan et al. 2024):
    z = ReLU(pre) · [pre > threshold]."""

    architecture = "jumprelu"
    threshold: nn.Parameter

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        apply_b_dec_to_input: bool = True,
        hook_name: str | None = None,
        model_name: str | None = None,
    ) -> None:
        super().__init__(
            d_in,
            d_sae,
            apply_b_dec_to_input=apply_b_dec_to_input,
            hook_name=hook_name,
            model_name=model_name,
        )
        self.threshold = nn.Parameter(torch.zeros(d_sae))

    def _activation(self, pre: Tensor) -> Tensor:
        # SAELens: activation_fn(hidden_pre) * (hidden_pre > threshold).to(dtype)
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

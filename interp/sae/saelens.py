"""Interchange with SAELens: its on-disk TopK format and its in-memory SAE objects.

Format (SAELens ≥ 6, ``sae_lens/saes/topk_sae.py``, ``sae_lens/constants.py``): a
directory with ``cfg.json`` (``architecture: "topk"``, ``d_in``, ``d_sae``, ``k``,
``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``reshape_activations``, ``rescale_acts_by_decoder_norm``, ``metadata``) and
``sae_weights.safetensors`` with ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in],
``b_enc`` [d_sae], ``b_dec`` [d_in]. Our parameter names are the same, so writing is a
direct dump; reading folds SAELens options that our model does not carry into the
weights, exactly:

* ``rescale_acts_by_decoder_norm``: SAELens selects on pre·‖W_dec[s]‖ and decodes with
  W_dec[s]/‖W_dec[s]‖; scaling W_enc columns and b_enc by the norms and dividing W_dec
  rows by them is the same function (SAELens's own ``_fold_norm_topk``).
* ``apply_b_dec_to_input = false``: pre = x W_enc + b_enc = (x − b_dec) W_enc +
  (b_enc + b_dec W_enc), so b_enc absorbs b_dec W_enc.

Options that change the function at run time (``layer_norm``/``constant_norm_rescale``
normalization, ``hook_z`` reshaping, whitening) are rejected with a clear message.
``sae_lens`` itself is imported only by ``to_saelens``; the file format needs only
``safetensors``.
"""

from __future__ import annotations

import json
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from interp.cache import atomic_write
from interp.sae.model import TopKSAE

__all__ = [
    "SAE_CFG_FILENAME",
    "SAE_WEIGHTS_FILENAME",
    "from_saelens",
    "load_saelens",
    "save_saelens",
    "to_saelens",
]

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
# SAELens reads configs without a version ≥ 6 through its pre-6.0 compatibility path.
_FORMAT_VERSION = "6.0.0"
_RUNTIME_NORMALIZATIONS_OK = ("none", "expected_average_only_in")


def _saelens_version() -> str:
    try:
        return importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:
        return _FORMAT_VERSION


def saelens_cfg_dict(sae: TopKSAE) -> dict[str, Any]:
    """The ``cfg.json`` contents SAELens's ``TopKSAEConfig.from_dict`` expects."""
    meta: dict[str, Any] = {"sae_lens_version": _saelens_version(), "written_by": "interp"}
    if sae.cfg.hook_name is not None:
        meta["hook_name"] = sae.cfg.hook_name
    if sae.cfg.model_name is not None:
        meta["model_name"] = sae.cfg.model_name
    return {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": meta,
    }


def save_saelens(sae: TopKSAE, path: str | Path) -> Path:
    """Write ``sae`` as a SAELens TopK directory; each file is replaced atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: getattr(sae, name).detach().to("cpu", torch.float32).contiguous()
        for name in ("W_enc", "W_dec", "b_enc", "b_dec")
    }
    atomic_write(path / SAE_WEIGHTS_FILENAME, lambda tmp: save_file(tensors, tmp))
    text = json.dumps(saelens_cfg_dict(sae), indent=2)
    atomic_write(path / SAE_CFG_FILENAME, lambda tmp: Path(tmp).write_text(text))
    return path


def _from_cfg_and_weights(cfg: dict[str, Any], weights: dict[str, Tensor]) -> TopKSAE:
    arch = cfg.get("architecture")
    if arch != "topk":
        raise ValueError(
            f"only SAELens 'topk' SAEs can be loaded as TopKSAE, got architecture={arch!r}"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in _RUNTIME_NORMALIZATIONS_OK:
        raise ValueError(
            f"normalize_activations={norm!r} rescales inputs at run time, which TopKSAE does "
            f"not model; supported: {_RUNTIME_NORMALIZATIONS_OK}"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(
            f"reshape_activations={cfg['reshape_activations']!r} is not supported; "
            "flatten hook_z activations to [..., n_heads * d_head] first"
        )
    scale = weights.get("scaling_factor", weights.get("finetuning_scaling_factor"))
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        raise ValueError("SAEs with a non-trivial finetuning scaling factor are not supported")
    missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - set(weights)
    if missing:
        raise ValueError(f"SAELens weights are missing {sorted(missing)}")
    W_enc, W_dec, b_enc, b_dec = (
        weights[n].detach().to("cpu", torch.float32).clone()
        for n in ("W_enc", "W_dec", "b_enc", "b_dec")
    )
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc *= norms[None, :]
        b_enc *= norms
        W_dec /= norms[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc += b_dec @ W_enc
    meta = cfg.get("metadata") or {}
    sae = TopKSAE(
        int(cfg["d_in"]),
        int(cfg["d_sae"]),
        int(cfg["k"]),
        hook_name=meta.get("hook_name"),
        model_name=meta.get("model_name"),
    )
    expected = {"W_enc": (sae.d_in, sae.d_sae), "W_dec": (sae.d_sae, sae.d_in)}
    for name, tensor in (("W_enc", W_enc), ("W_dec", W_dec)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, config says {expected[name]}"
            )
    sae.load_state_dict({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec})
    return sae


def load_saelens(path: str | Path) -> TopKSAE:
    """Read a SAELens TopK directory (``cfg.json`` + ``sae_weights.safetensors``)."""
    path = Path(path)
    cfg_path, weights_path = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a SAELens SAE directory: expected {SAE_CFG_FILENAME} and "
            f"{SAE_WEIGHTS_FILENAME}"
        )
    cfg = json.loads(cfg_path.read_text())
    return _from_cfg_and_weights(cfg, load_file(str(weights_path)))


def from_saelens(sae: Any) -> TopKSAE:
    """Convert an in-memory ``sae_lens`` TopK SAE (inference or training class)."""
    cfg = sae.cfg.to_dict()
    cfg["metadata"] = dict(cfg.get("metadata") or {})
    return _from_cfg_and_weights(cfg, dict(sae.state_dict()))


def to_saelens(sae: TopKSAE) -> Any:
    """An equivalent ``sae_lens.TopKSAE`` (inference class); imports ``sae_lens``."""
    from sae_lens import TopKSAE as SAELensTopKSAE
    from sae_lens import TopKSAEConfig as SAELensTopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = saelens_cfg_dict(sae)
    cfg.pop("architecture")
    meta = SAEMetadata(**cfg.pop("metadata"))
    out = SAELensTopKSAE(SAELensTopKSAEConfig(**cfg, metadata=meta))
    out.load_state_dict(
        {n: getattr(sae, n).detach().clone() for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
    )
    return out

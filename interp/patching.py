"""Activation patching and attribution patching (AtP, AtP*) over any hook name.

Two runs of the same model on a *clean* and a *corrupted* batch, and a metric
``metric(logits, batch) -> [batch]`` (e.g. a logit difference). A *site* is a slice of one
hook's activation: a position (an int column, or a named position such as ``"user_end"``),
a head, both, or the whole activation (``Site``). Sweeps build grids of sites:
``layers_x_positions`` (e.g. ``hook_resid_pre`` at every layer and position),
``layers_x_heads`` (``attn.hook_z`` per head, or ``attn.hook_pattern`` by head), or any
list of ``Site``.

* ``activation_patching``: for each site, rerun the *base* run with that site replaced by
  the *source* run's value. ``direction="denoising"`` patches clean into corrupted (base =
  corrupted, TransformerLens's ``get_act_patch_*``); ``"noising"`` patches corrupted into
  clean. Sites are independent, so ``sites_per_forward`` copies of the base batch are
  stacked along the batch axis and each copy patches one site: one forward pass per
  ``sites_per_forward`` sites.
* ``attribution_patching``: the first-order estimate of the same quantity (Syed et al.
  2023, "Attribution patching outperforms automated circuit discovery"; Kramár et al. 2024,
  "AtP*"): ``metric(patched) - metric(base) ≈ (a_source - a_base) · ∂metric/∂a`` with the
  gradient taken **at the base run** (the corrupted run for denoising, the clean run for
  noising, as in the AtP* paper's noising definition), for every site at once from one
  source forward pass and one base forward+backward pass (``interp.capture_grads``).
  Options from AtP* (Kramár et al. 2024, §3): ``qk_fix=True`` recomputes the attention
  softmax exactly for query / key sites (``attn.hook_q``, ``hook_k``, ``hook_rot_q``,
  ``hook_rot_k``) and linearises only from the pattern on, which removes the false
  negatives of saturated attention; ``graddrop=True`` adds one backward pass per layer with
  that layer's residual-gradient path dropped and combines them as the paper's GradDrop.

Clean and corrupted prompts either have the same token layout (same ``input_ids`` shape and
``attention_mask``), so a column means the same place in both, or are aligned by named
positions (``interp.chat.encode`` batches): a site at ``"user_end"`` patches each row's
``user_end`` token of one run into the other's. Anything else (integer positions or whole
sequences with different layouts, attention patterns whose key axes differ) raises
``PatchingError``.

Results are ``PatchingResult`` values: the tensor over the sweep's axes with the axis
labels, every site's name, the clean and corrupted metric per example, and
``normalized()`` = (patched − corrupted) / (clean − corrupted).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.activations import capture
from interp.gradients import capture_grads
from interp.hooks import HookPoint
from interp.positions import Batch, as_batch, running

__all__ = [
    "PatchingError",
    "PatchingResult",
    "Site",
    "Sweep",
    "activation_patching",
    "attribution_patching",
    "layers_x_heads",
    "layers_x_positions",
]

Metric = Callable[[Tensor, Batch], Tensor]
Position = int | str | None
_PATTERN_LIKE = ("hook_pattern", "hook_attn_scores")
_QUERY_SITES = ("attn.hook_q", "attn.hook_rot_q")
_KEY_SITES = ("attn.hook_k", "attn.hook_rot_k")


class PatchingError(ValueError):
    """Clean and corrupted runs, or a site, that cannot be patched as asked."""


@dataclass(frozen=True)
class Site:
    """One patched slice of one hook's activation.

    Attributes:
        name: a full hook name, e.g. ``"blocks.3.hook_resid_pre"``.
        position: ``None`` (every position), an int column (clean and corrupted prompts with
            the same layout) or a named position of both batches (``"user_end"``). On
            ``attn.hook_pattern`` / ``hook_attn_scores`` it is the query position.
        head: ``None``, or a head index on activations with a head axis
            (``attn.hook_z``/``q``/``k``/``v``/``rot_q``/``rot_k``: axis 2, KV heads for
            k and v under grouped-query attention; patterns and scores: axis 1).
    """

    name: str
    position: Position = None
    head: int | None = None

    @property
    def label(self) -> str:
        parts = []
        if self.position is not None:
            parts.append(f"pos={self.position}")
        if self.head is not None:
            parts.append(f"head={self.head}")
        return f"{self.name}[{', '.join(parts)}]" if parts else self.name


@dataclass(frozen=True)
class Sweep:
    """A grid of sites: ``sites`` in row-major order over ``axes`` with ``labels``.

    Build one with ``layers_x_positions`` / ``layers_x_heads``; a plain list of ``Site``
    becomes a one-axis sweep (``axes == ("site",)``). Sweeps whose size depends on the
    model or the batch (every layer, every position, every head) are resolved by the
    patching functions.
    """

    sites: tuple[Site, ...]
    axes: tuple[str, ...]
    labels: dict[str, tuple[Any, ...]]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.labels[a]) for a in self.axes)


@dataclass(frozen=True)
class _Grid:
    """An unresolved sweep: ``kind`` is ``"positions"`` or ``"heads"``."""

    kind: str
    name: str
    layers: tuple[int, ...] | None
    positions: Any
    heads: tuple[int, ...] | None = None


def layers_x_positions(
    name: str = "hook_resid_pre",
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] | None = None,
) -> _Grid:
    """Sites ``blocks.{layer}.{name}`` × positions, axes ``("layer", "position")``.

    ``name``: the hook name inside a block (``"hook_resid_pre"``, ``"hook_attn_out"``,
    ``"mlp.hook_post"`` …, or ``"blocks.*.hook_resid_pre"``); ``layers``: default every
    layer that has it; ``positions``: default every column (prompts of the same layout),
    or a list of ints and named positions (``["user_end", "pre_assistant"]``).
    """
    return _Grid(
        "positions",
        _suffix(name),
        None if layers is None else tuple(layers),
        None if positions is None else tuple(positions),
    )


def layers_x_heads(
    name: str = "attn.hook_z",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Position | Sequence[int | str] = None,
) -> _Grid:
    """Sites ``blocks.{layer}.{name}`` per head, axes ``("layer", "head")``.

    ``name``: ``"attn.hook_z"`` (default; the head's output), ``"attn.hook_pattern"`` (the
    head's attention pattern), or any per-head hook (``attn.hook_q``/``k``/``v``,
    ``hook_rot_q``/``rot_k``; KV heads for k/v). ``positions``: ``None`` patches the head
    at every position; one int / named position patches it there only; a list adds a
    third axis ``"position"``.
    """
    return _Grid(
        "heads",
        _suffix(name),
        None if layers is None else tuple(layers),
        tuple(positions) if isinstance(positions, list | tuple) else positions,
        None if heads is None else tuple(heads),
    )


def _suffix(name: str) -> str:
    if name.startswith("blocks."):
        parts = name.split(".", 2)
        if len(parts) < 3:
            raise ValueError(f"{name!r} is not a hook name inside a block")
        return parts[2]
    return name


@dataclass(frozen=True)
class PatchingResult:
    """A patching sweep's result.

    Attributes:
        values: the patched metric (batch mean) per site, shaped ``sweep.shape``; for
            attribution patching the first-order estimate of it (base metric + estimated
            change), so both methods read the same way.
        per_example: the same per example, ``[*shape, batch]``.
        axes: axis names, e.g. ``("layer", "position")``, ``("layer", "head")``,
            ``("site",)``.
        labels: axis name -> labels (layer indices, positions as ints or names, head
            indices, site labels).
        sites: every site's label in row-major order (``Site.label``), one per entry.
        clean_metric: ``metric`` on the clean run, ``[batch]``.
        corrupted_metric: ``metric`` on the corrupted run, ``[batch]``.
        direction: ``"denoising"`` (clean patched into corrupted) or ``"noising"``.
        method: ``"activation"``, ``"attribution"`` or ``"attribution+qk_fix"``, each
            with ``"+graddrop"`` when GradDrop was applied.
    """

    values: Float[Tensor, "..."]
    per_example: Float[Tensor, "..."]
    axes: tuple[str, ...]
    labels: dict[str, tuple[Any, ...]]
    sites: tuple[str, ...]
    clean_metric: Float[Tensor, " batch"]
    corrupted_metric: Float[Tensor, " batch"]
    direction: str
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_metric(self) -> Float[Tensor, " batch"]:
        """The metric of the run that was patched (corrupted for denoising)."""
        return self.corrupted_metric if self.direction == "denoising" else self.clean_metric

    @property
    def effect(self) -> Float[Tensor, "..."]:
        """``values - base_metric.mean()``: the change patching made (or is estimated to)."""
        return self.values - self.base_metric.mean()

    def normalized(self) -> Float[Tensor, "..."]:
        """``(values - corrupted) / (clean - corrupted)`` on batch means: 1 where patching a
        site restores the clean metric, 0 where it leaves the corrupted one (denoising)."""
        clean, corrupted = self.clean_metric.mean(), self.corrupted_metric.mean()
        return (self.values - corrupted) / (clean - corrupted)


# -- sites and alignment ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Runs:
    clean: Batch
    corrupted: Batch
    aligned: bool  # same layout: a column means the same place in both

    def base_source(self, direction: str) -> tuple[Batch, Batch]:
        if direction == "denoising":
            return self.corrupted, self.clean
        return self.clean, self.corrupted


def _runs(model: Any, clean: Any, corrupted: Any) -> _Runs:
    clean, corrupted = as_batch(model, clean), as_batch(model, corrupted)
    if len(clean) != len(corrupted):
        raise PatchingError(
            f"clean and corrupted batches must pair up row by row; got {len(clean)} clean and "
            f"{len(corrupted)} corrupted rows"
        )
    aligned = clean.input_ids.shape == corrupted.input_ids.shape and torch.equal(
        clean.attention_mask, corrupted.attention_mask
    )
    return _Runs(clean, corrupted, aligned)


def _direction(direction: str) -> str:
    if direction not in ("denoising", "noising"):
        raise ValueError(
            f"direction must be 'denoising' (clean into corrupted) or 'noising' (corrupted "
            f"into clean), got {direction!r}"
        )
    return direction


def _layers_with(model: Any, suffix: str, layers: tuple[int, ...] | None) -> list[int]:
    have = set(model.hook_names)
    n = model.cfg.n_layers
    wanted = range(n) if layers is None else layers
    out = []
    for layer in wanted:
        if not -n <= layer < n:
            raise PatchingError(f"layer {layer} is out of range for {n} layers")
        layer = layer % n
        name = f"blocks.{layer}.{suffix}"
        if name not in have:
            if layers is not None:
                model.resolve(name)  # raises HookNameError with the closest names
            continue
        out.append(layer)
    if not out:
        model.resolve(f"blocks.*.{suffix}")
    return out


def _resolve(model: Any, sweep: Any, runs: _Runs, shapes: Callable[[str], tuple]) -> Sweep:
    """A ``Sweep`` from a grid or a list of sites; ``shapes(name)`` gives activation shapes."""
    if isinstance(sweep, Sweep):
        return sweep
    if isinstance(sweep, Site):
        sweep = [sweep]
    if isinstance(sweep, list | tuple):
        sites = tuple(sweep)
        if not sites or not all(isinstance(s, Site) for s in sites):
            raise TypeError(
                "sites must be layers_x_positions(...), layers_x_heads(...), or a non-empty "
                "list of patching.Site"
            )
        for s in sites:
            model.resolve(s.name)
        return Sweep(sites, ("site",), {"site": tuple(s.label for s in sites)})
    if not isinstance(sweep, _Grid):
        raise TypeError(f"unknown sweep {sweep!r}")
    layers = _layers_with(model, sweep.name, sweep.layers)
    if sweep.kind == "positions":
        positions = sweep.positions
        if positions is None:
            if not runs.aligned:
                raise PatchingError(_unaligned("every position"))
            positions = tuple(range(runs.clean.input_ids.shape[1]))
        sites = tuple(
            Site(f"blocks.{layer}.{sweep.name}", position=p)
            for layer, p in itertools.product(layers, positions)
        )
        return Sweep(sites, ("layer", "position"), {"layer": tuple(layers), "position": positions})
    shape = shapes(f"blocks.{layers[0]}.{sweep.name}")
    head_axis = 1 if sweep.name.endswith(_PATTERN_LIKE) else 2
    if len(shape) != 4:
        raise PatchingError(
            f"{sweep.name!r} has no head axis (activation shape {shape}); heads are swept on "
            "attn.hook_z, hook_q/k/v, hook_rot_q/k, hook_pattern, hook_attn_scores"
        )
    heads = sweep.heads if sweep.heads is not None else tuple(range(shape[head_axis]))
    if isinstance(sweep.positions, tuple):
        sites = tuple(
            Site(f"blocks.{layer}.{sweep.name}", position=p, head=h)
            for layer, h, p in itertools.product(layers, heads, sweep.positions)
        )
        return Sweep(
            sites,
            ("layer", "head", "position"),
            {"layer": tuple(layers), "head": heads, "position": sweep.positions},
        )
    sites = tuple(
        Site(f"blocks.{layer}.{sweep.name}", position=sweep.positions, head=h)
        for layer, h in itertools.product(layers, heads)
    )
    return Sweep(sites, ("layer", "head"), {"layer": tuple(layers), "head": heads})


def _unaligned(what: str) -> str:
    return (
        f"{what} needs clean and corrupted prompts of the same layout (same input_ids shape "
        "and attention_mask), so that a column means the same token in both; these differ. "
        "Align them by named positions instead (positions=['user_end', ...] with batches "
        "from interp.chat.encode)"
    )


@dataclass(frozen=True)
class _Index:
    """Where one site lives in one run's activation (rows ``offset .. offset + batch``)."""

    key: tuple

    def __call__(self, t: Tensor) -> Tensor:
        return t[self.key]


def _site_index(site: Site, batch: Batch, runs: _Runs, ndim: int, T: int, offset: int) -> _Index:
    """Index tuple of ``site`` in an activation of ``ndim`` dims and ``T`` positions."""
    B = len(batch)
    device = batch.input_ids.device
    rows = torch.arange(offset, offset + B, device=device)
    pattern = site.name.endswith(_PATTERN_LIKE)
    if pattern and not runs.aligned:
        raise PatchingError(
            _unaligned(f"patching {site.name!r}") + "; the key axis of an attention pattern "
            "cannot be aligned by named positions"
        )
    pos = site.position
    if pos is None:
        if not runs.aligned:
            raise PatchingError(_unaligned(f"site {site.label} (every position)"))
        index = None
    elif isinstance(pos, str):
        if pos not in batch.positions:
            known = sorted(batch.positions)
            raise PatchingError(
                f"site {site.label}: named position {pos!r} is missing from one of the runs, "
                f"which has {known or 'no named positions'}; both clean and corrupted batches "
                "need it (interp.chat.encode)"
            )
        index = batch.positions[pos].to(device)
    elif isinstance(pos, int) and not isinstance(pos, bool):
        if not runs.aligned:
            raise PatchingError(_unaligned(f"site {site.label} (an integer position)"))
        if not -T <= pos < T:
            raise PatchingError(f"site {site.label}: position {pos} is out of range for {T}")
        index = torch.full((B,), pos % T, device=device, dtype=torch.long)
    else:
        raise TypeError(f"site position must be None, an int or a named position, got {pos!r}")
    head = site.head
    if head is not None and ndim != 4:
        raise PatchingError(f"site {site.label}: the activation has no head axis ({ndim} dims)")
    if pattern:  # [batch, head, q, k]: positions are queries
        h = slice(None) if head is None else head
        key = (rows, h) if index is None else (rows, h, index)
    elif head is None:
        key = (rows,) if index is None else (rows, index)
    else:
        key = (rows, slice(None), head) if index is None else (rows, index, head)
    return _Index(key)


def _check_metric(value: Any, n: int) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != (n,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise PatchingError(
            f"metric(logits, batch) must return one value per example ([batch] = ({n},)); got "
            f"{shape}"
        )
    return value.detach()


# -- activation patching ---------------------------------------------------------------------
def activation_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    sites: Any = None,
    *,
    direction: str = "denoising",
    sites_per_forward: int = 16,
    progress: bool = True,
) -> PatchingResult:
    """Patch each site from one run into the other and read ``metric`` (one run per site).

    Args:
        model: a ``HookedModel``.
        clean, corrupted: batches (anything ``model`` takes) with the same number of rows;
            same layout, or ``Batch``es with the named positions the sites use.
        metric: ``metric(logits, batch) -> [batch]``, called on each patched copy's logits
            with the base run's batch (so it may close over per-row answers).
        sites: ``layers_x_positions(...)`` (default: ``hook_resid_pre`` at every layer and
            position), ``layers_x_heads(...)``, or a list of ``Site``.
        direction: ``"denoising"`` (clean into the corrupted run) or ``"noising"``.
        sites_per_forward: how many sites one forward pass patches (that many stacked
            copies of the base batch); 1 is one forward per site.
        progress: show a tqdm progress bar (counting sites).
    """
    direction = _direction(direction)
    if sites_per_forward < 1:
        raise ValueError(f"sites_per_forward must be ≥ 1, got {sites_per_forward}")
    runs = _runs(model, clean, corrupted)
    sweep0 = layers_x_positions() if sites is None else sites
    names = _site_names(model, sweep0, runs)
    clean_logits, clean_cache = capture(model, runs.clean, names, return_logits=True)
    corr_logits, corr_cache = capture(model, runs.corrupted, names, return_logits=True)
    base, source = runs.base_source(direction)
    source_cache = clean_cache if direction == "denoising" else corr_cache
    sweep = _resolve(model, sweep0, runs, lambda n: tuple(source_cache[n].shape))
    _validate(sweep, runs, clean_cache, corr_cache)
    clean_metric = _check_metric(metric(clean_logits, runs.clean), len(runs.clean))
    corr_metric = _check_metric(metric(corr_logits, runs.corrupted), len(runs.clean))
    del clean_logits, corr_logits
    B = len(base)
    out = torch.empty(len(sweep.sites), B, dtype=clean_metric.dtype, device=clean_metric.device)
    chunks = [
        list(range(i, min(i + sites_per_forward, len(sweep.sites))))
        for i in range(0, len(sweep.sites), sites_per_forward)
    ]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(sweep.sites), desc="activation patching", disable=not progress)
    try:
        for chunk in chunks:
            k = len(chunk)
            stacked = _repeat(base, k)
            plan: dict[str, list[tuple[_Index, _Index]]] = {}
            for j, i in enumerate(chunk):
                site = sweep.sites[i]
                src = source_cache[site.name]
                ndim, T_src = src.ndim, src.shape[2 if site.name.endswith(_PATTERN_LIKE) else 1]
                T_dst = base.input_ids.shape[1]
                dst_idx = _site_index(site, base, runs, ndim, T_dst, j * B)
                src_idx = _site_index(site, source, runs, ndim, T_src, 0)
                plan.setdefault(site.name, []).append((dst_idx, src_idx))
            hooks = [
                (name, _patch_hook(source_cache[name], entries)) for name, entries in plan.items()
            ]
            with torch.no_grad(), running(stacked), model.hooks(fwd=hooks):
                logits = model.forward(stacked.input_ids, stacked.attention_mask)
            for j, i in enumerate(chunk):
                out[i] = _check_metric(metric(logits[j * B : (j + 1) * B], base), B)
            del logits
            bar.update(k)
    finally:
        bar.close()
    return _result(sweep, out, clean_metric, corr_metric, direction, "activation")


def _validate(sweep: Sweep, runs: _Runs, clean_cache: Any, corr_cache: Any) -> None:
    """Every site fits both runs (raises ``PatchingError`` before any patched forward)."""
    for site in sweep.sites:
        axis = 2 if site.name.endswith(_PATTERN_LIKE) else 1
        for batch, cache in ((runs.clean, clean_cache), (runs.corrupted, corr_cache)):
            act = cache[site.name]
            _site_index(site, batch, runs, act.ndim, act.shape[axis], 0)


def _patch_hook(source: Tensor, entries: list[tuple[_Index, _Index]]):
    def hook(tensor: Tensor, hook: HookPoint) -> Tensor:
        new = tensor.clone()
        for dst, src in entries:
            new[dst.key] = src(source).to(new.dtype)
        return new

    return hook


def _repeat(batch: Batch, k: int) -> Batch:
    if k == 1:
        return batch
    return Batch(
        batch.input_ids.repeat(k, 1),
        batch.attention_mask.repeat(k, 1),
        positions={n: v.repeat(k) for n, v in batch.positions.items()},
        masks={n: m.repeat(k, 1) for n, m in batch.masks.items()},
    )


def _site_names(model: Any, sweep: Any, runs: _Runs) -> list[str]:
    if isinstance(sweep, Sweep):
        return list(dict.fromkeys(s.name for s in sweep.sites))
    if isinstance(sweep, Site):
        return [sweep.name]
    if isinstance(sweep, list | tuple) and sweep and all(isinstance(s, Site) for s in sweep):
        return list(dict.fromkeys(s.name for s in sweep))
    if isinstance(sweep, _Grid):
        return [
            f"blocks.{layer}.{sweep.name}"
            for layer in _layers_with(model, sweep.name, sweep.layers)
        ]
    raise TypeError(
        "sites must be layers_x_positions(...), layers_x_heads(...), or a list of patching.Site;"
        f" got {type(sweep).__name__}"
    )


def _result(
    sweep: Sweep,
    per_site: Tensor,  # [n_sites, batch]
    clean_metric: Tensor,
    corr_metric: Tensor,
    direction: str,
    method: str,
    values: Tensor | None = None,
    extra: dict | None = None,
) -> PatchingResult:
    shape = sweep.shape
    per_example = per_site.reshape(*shape, per_site.shape[-1])
    return PatchingResult(
        values=per_example.mean(-1) if values is None else values.reshape(shape),
        per_example=per_example,
        axes=sweep.axes,
        labels=sweep.labels,
        sites=tuple(s.label for s in sweep.sites),
        clean_metric=clean_metric,
        corrupted_metric=corr_metric,
        direction=direction,
        method=method,
        extra=extra or {},
    )


# -- attribution patching --------------------------------------------------------------------
def attribution_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    sites: Any = None,
    *,
    direction: str = "denoising",
    qk_fix: bool = False,
    graddrop: bool = False,
) -> PatchingResult:
    """First-order estimates of ``activation_patching`` for every site at once (AtP).

    ``metric(patched) ≈ metric(base) + (a_source − a_base) · ∂metric/∂a|base``, the gradient
    taken at the base run: the **corrupted** run for ``direction="denoising"`` (clean patched
    into corrupted), the clean run for ``"noising"``. Costs one source forward pass and one
    base forward+backward pass (``interp.capture_grads``; no parameter ``.grad`` is written),
    whatever the number of sites. Arguments as in ``activation_patching``.

    Args:
        qk_fix: AtP*'s fix for attention saturation (Kramár et al. 2024, §3.1.1) on query and
            key sites (``attn.hook_q``/``hook_rot_q``: a query head at a position or at every
            position; ``attn.hook_k``/``hook_rot_k``: a key head): the patched attention
            pattern is recomputed exactly (softmax of the scores with the source run's
            queries or keys) and only its effect on the metric is linearised,
            ``Σ (A_patched − A_base) · ∂metric/∂A``. Other sites keep plain AtP. Prompts of
            the same layout; the recomputed scores are checked against the model's own
            ``hook_attn_scores`` and a mismatch raises.
        graddrop: AtP*'s GradDrop (§3.1.2): for each layer ``ℓ`` one more backward pass in
            which the gradient into layer ``ℓ``'s attention and MLP outputs
            (``hook_attn_out``, ``hook_mlp_out``) is zeroed, so it reaches earlier layers
            through the residual connection only; the estimate is
            ``sign(AtP) · Σ_ℓ |AtP_ℓ| / (L − 1)`` (a site inside layer ``ℓ`` gets 0 when
            ``ℓ`` is dropped, hence ``L − 1``), computed on batch means for ``values`` and
            per example for ``per_example``. Costs one more forward pass of the base run and
            ``L`` backward passes through its kept graph (no parameter ``.grad`` written).
    """
    direction = _direction(direction)
    runs = _runs(model, clean, corrupted)
    base, source = runs.base_source(direction)
    sweep0 = layers_x_positions() if sites is None else sites
    names = _site_names(model, sweep0, runs)
    qk_layers: set[int] = set()
    if qk_fix:
        qk_layers = {int(n.split(".")[1]) for n in names if n.endswith(_QUERY_SITES + _KEY_SITES)}
    extra_names = [
        f"blocks.{layer}.attn.{k}"
        for layer in sorted(qk_layers)
        for k in (
            "hook_q",
            "hook_k",
            "hook_rot_q",
            "hook_rot_k",
            "hook_attn_scores",
            "hook_pattern",
        )
        if f"blocks.{layer}.attn.{k}" in model.hook_names
    ]
    grad_names = list(dict.fromkeys(names + extra_names))
    src_logits, src_cache = capture(model, source, grad_names, return_logits=True)
    sweep = _resolve(model, sweep0, runs, lambda n: tuple(src_cache[n].shape))
    _validate(sweep, runs, src_cache, src_cache)
    src_metric = _check_metric(metric(src_logits, source), len(source))
    del src_logits
    g = capture_grads(model, base, metric, grad_names, return_activations=True)
    base_metric = _check_metric(g.loss, len(base))
    est = _estimates(sweep, runs, base, source, src_cache, g.activations, g.grads)
    method = "attribution"
    if qk_fix:
        method += "+qk_fix"
        _qk_fix(model, sweep, runs, base, source, src_cache, g.activations, g.grads, est)
    values = None
    if graddrop:
        method += "+graddrop"
        est, values = _graddrop(
            model, sweep, runs, base, source, metric, grad_names, src_cache, g.activations, est
        )
        values = base_metric.mean() + values
    clean_metric, corr_metric = (
        (src_metric, base_metric) if direction == "denoising" else (base_metric, src_metric)
    )
    return _result(sweep, base_metric + est, clean_metric, corr_metric, direction, method, values)


def _estimates(sweep, runs, base, source, src_cache, base_acts, grads) -> Tensor:
    """``(a_source − a_base) · ∂metric/∂a`` per site and example: ``[n_sites, batch]``."""
    out = []
    for site in sweep.sites:
        a_src, a_base, grad = src_cache[site.name], base_acts[site.name], grads[site.name]
        axis = 2 if site.name.endswith(_PATTERN_LIKE) else 1
        dst = _site_index(site, base, runs, a_base.ndim, a_base.shape[axis], 0)
        src = _site_index(site, source, runs, a_src.ndim, a_src.shape[axis], 0)
        delta = src(a_src).to(grad.dtype) - dst(a_base).to(grad.dtype)
        out.append((delta * dst(grad)).flatten(1).sum(1))
    return torch.stack(out)


def _graddrop(model, sweep, runs, base, source, metric, names, src_cache, base_acts, est_atp):
    """AtP*'s GradDrop: one forward pass of the base run, then one backward pass per layer
    with that layer's residual branch dropped (the graph is kept between them).

    As in ``capture_grads``: gradients are taken with respect to the embedding output only,
    so no parameter ``.grad`` is written.
    """
    L = model.cfg.n_layers
    state: dict[str, Any] = {"layer": None, "grads": {}}
    root: list[Tensor] = []

    def keep_root(tensor: Tensor, hook: HookPoint) -> None:
        root.append(tensor)

    def keep_grad(grad: Tensor, hook: HookPoint) -> None:
        state["grads"][hook.name] = grad.detach()

    def drop_at(layer: int):
        def drop(grad: Tensor, hook: HookPoint) -> Tensor | None:
            return torch.zeros_like(grad) if state["layer"] == layer else None

        return drop

    dropped = []
    for layer in range(L):
        here = [f"blocks.{layer}.{k}" for k in ("hook_attn_out", "hook_mlp_out")]
        here = [n for n in here if n in model.hook_names]
        if not here:
            raise PatchingError(f"GradDrop needs hook_attn_out / hook_mlp_out on layer {layer}")
        dropped += [(n, drop_at(layer)) for n in here]
    if "hook_embed" not in model.hook_names:
        raise PatchingError("GradDrop needs a 'hook_embed' hook point on the model")
    bwd = [(n, keep_grad) for n in names] + dropped
    per_layer = []
    with torch.enable_grad(), running(base), model.hooks(fwd=[("hook_embed", keep_root)], bwd=bwd):
        logits = model.forward(base.input_ids, base.attention_mask)
        total = metric(logits, base).sum()
        for layer in range(L):
            state["layer"], state["grads"] = layer, {}
            torch.autograd.grad(total, root[0], retain_graph=layer < L - 1)
            grads = state["grads"]
            per_layer.append(_estimates(sweep, runs, base, source, src_cache, base_acts, grads))
    stack = torch.stack(per_layer)  # [L, n_sites, batch]
    denom = max(L - 1, 1)
    per_example = est_atp.sign() * stack.abs().sum(0) / denom
    means = est_atp.mean(-1).sign() * stack.mean(-1).abs().sum(0) / denom
    return per_example, means


# -- AtP* QK fix -------------------------------------------------------------------------------
def _qk_fix(model, sweep, runs, base, source, src_cache, base_acts, grads, est) -> None:
    """Replace the plain AtP estimate of query / key sites by the QK-fixed one, in place."""
    for i, site in enumerate(sweep.sites):
        if not site.name.endswith(_QUERY_SITES + _KEY_SITES):
            continue
        if not runs.aligned:
            raise PatchingError(_unaligned("qk_fix (rotary positions must match)"))
        layer = int(site.name.split(".")[1])
        est[i] = _qk_site(model, layer, site, base_acts, grads, src_cache)


def _qk_site(model, layer, site, base_acts, grads, src_cache) -> Tensor:
    pre = f"blocks.{layer}.attn."
    rot = "hook_rot_" if f"{pre}hook_rot_q" in base_acts else "hook_"
    if (
        rot == "hook_rot_"
        and base_acts[pre + "hook_rot_q"].shape != base_acts[pre + "hook_q"].shape
    ):
        rot = "hook_"  # DeepSeek MLA: rot_q is only the rotary part; hook_q is what meets k
    q_base, k_base = base_acts[pre + rot + "q"], base_acts[pre + rot + "k"]  # [b, pos, h, d]
    if site.name.endswith(("attn.hook_q", "attn.hook_k")) and _cross_head_qk_norm(model, layer):
        raise PatchingError(
            f"qk_fix on {site.label}: this family normalises queries / keys across all heads "
            "(OLMoE / OLMo-2 q_norm, k_norm), so patching one head's hook_q / hook_k changes "
            "the others' too; use attn.hook_rot_q / attn.hook_rot_k sites (after the norm)"
        )
    q_src, k_src = src_cache[pre + rot + "q"], src_cache[pre + rot + "k"]
    scores = base_acts[pre + "hook_attn_scores"]  # [b, h, q, k], masked entries -inf
    pattern = base_acts[pre + "hook_pattern"]
    g_pattern = grads[pre + "hook_pattern"]
    scale, softcap = _attention_scale(model, layer)
    n_heads, n_kv = q_base.shape[2], k_base.shape[2]
    group = n_heads // n_kv
    # Masked entries: -inf (HF backend, HookedTransformer) or the dtype's minimum (Bridge).
    masked = scores <= torch.finfo(scores.dtype).min / 2

    def logits(q: Tensor, k: Tensor) -> Tensor:  # q [b, pos, h, d], k [b, pos, h_kv, d]
        k = k.repeat_interleave(group, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        return s.masked_fill(masked, float("-inf"))

    reference = logits(q_base, k_base)
    finite = ~masked
    err = (reference[finite] - scores[finite].double()).abs().max().item() if finite.any() else 0.0
    tol = 1e-3 * max(1.0, scores[finite].abs().max().item()) if finite.any() else 0.0
    if err > tol:
        raise PatchingError(
            f"qk_fix: recomputed attention scores of layer {layer} differ from the model's by "
            f"{err:.3g}; this family's attention is not plain scaled dot-product attention"
        )
    A = pattern.double()
    G = g_pattern.double()
    if site.name.endswith(_QUERY_SITES):
        # Rows t of the pattern recomputed with the source query: exact softmax.
        heads = range(n_heads) if site.head is None else [site.head]
        q_new = q_base.clone()
        q_new[:, :, list(heads)] = q_src[:, :, list(heads)]
        new = torch.softmax(logits(q_new, k_base), dim=-1)
        rows = ((new - A) * G).sum(-1)  # [b, h, q]
        rows = rows[:, list(heads)]
        if site.position is not None:
            T = rows.shape[-1]
            rows = rows[..., site.position % T : site.position % T + 1]
        return rows.flatten(1).sum(1).to(g_pattern.dtype)
    # Key sites: every query's row changes in the columns of the patched key(s).
    kv_heads = range(n_kv) if site.head is None else [site.head]
    q_heads = [h for kv in kv_heads for h in range(kv * group, (kv + 1) * group)]
    if site.position is None:
        k_new = k_base.clone()
        k_new[:, :, list(kv_heads)] = k_src[:, :, list(kv_heads)]
        new = torch.softmax(logits(q_base, k_new), dim=-1)
        return ((new - A) * G)[:, q_heads].flatten(1).sum(1).to(g_pattern.dtype)
    s = site.position % k_base.shape[1]
    k_new = k_base.clone()
    k_new[:, s, list(kv_heads)] = k_src[:, s, list(kv_heads)]
    new = torch.softmax(logits(q_base, k_new), dim=-1)
    return ((new - A) * G)[:, q_heads].flatten(1).sum(1).to(g_pattern.dtype)


def _tl_attention(model: Any, layer: int) -> Any:
    try:
        return model.model.blocks[layer].attn
    except (AttributeError, IndexError, TypeError):
        raise PatchingError(
            f"qk_fix: no attention module for layer {layer} on this backend"
        ) from None


def _cross_head_qk_norm(model: Any, layer: int) -> bool:
    from interp.adapters.hf_attention import attention_module

    if getattr(model, "_layers", None) is None:
        return False  # TransformerLens: per-head queries and keys
    attn = attention_module(model._layers[layer])
    head_dim = getattr(attn, "head_dim", None)
    for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
        weight = getattr(norm, "weight", None)
        if weight is not None and head_dim and weight.numel() != head_dim:
            return True
    return False


def _attention_scale(model: Any, layer: int) -> tuple[float, float | None]:
    """(score scaling, logit soft-cap) of an attention layer, on every backend."""
    from interp.adapters.hf_attention import attention_module

    layers = getattr(model, "_layers", None)
    if layers is None:
        # TransformerBridge: the wrapped HF attention's scaling; HookedTransformer: scores =
        # q·k / attn_scale, then the soft-cap.
        attn = _tl_attention(model, layer)
        hf_attn = getattr(attn, "original_component", None)  # TransformerBridge
        if getattr(hf_attn, "scaling", None) is not None:
            cap = getattr(getattr(hf_attn, "config", None), "attn_logit_softcapping", None)
            return float(hf_attn.scaling), cap
        scale = getattr(attn, "attn_scale", None)
        if scale is None:
            raise PatchingError(
                f"qk_fix: cannot find layer {layer}'s attention scale on this backend"
            )
        cap = getattr(getattr(attn, "cfg", None), "attn_scores_soft_cap", -1.0)
        return 1.0 / float(scale), (float(cap) if cap and cap > 0 else None)
    attn = attention_module(layers[layer])
    scale = getattr(attn, "scaling", None)
    if scale is None:
        head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
        scale = 1.0 / math.sqrt(head_dim)
    softcap = getattr(getattr(attn, "config", None), "attn_logit_softcapping", None)
    return float(scale), softcap

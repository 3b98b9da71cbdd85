"""Gradient alignment with a direction, and its controls.

Design
------
Does a training condition (e.g. inoculation prompting: a system prompt that
asks for the trait during training) *rotate* the training gradient away from a
trait direction or merely *shrink* it (a lower loss shrinks every projection)?
For gradients of the loss with respect to the residual stream at one position,
``g[i, l] = ∂L_i/∂h_l`` of shape ``[n_examples, n_layers, d_model]``, and a
:class:`~interp.directions.Direction` ``v``, :func:`gradient_alignment` keeps per example and layer

* ``‖g‖`` — the overall size (what loss reduction changes),
* ``⟨g, v⟩`` — the raw projection (changes with size *and* angle),
* ``cos(g, v)`` — the angle alone (the headline metric).

Sign convention: gradient descent moves the residual stream along ``−g``, so
a training step pushes activations *towards* the trait when ``cos(g, v) < 0``.
Nothing here flips signs; compare conditions by the change in mean cosine.

Controls, all computed from the same per-example values:

* :func:`random_direction_null` — the mean cosine with ``N ≥ 100`` seeded
  random unit directions per layer (spread ≈ 1/√d_model for unrelated
  directions). An :class:`Alignment` keeps the mean *unit* gradient per layer,
  ``ū_l = mean_i g_il/‖g_il‖``; the mean cosine with any unit direction ``r``
  is exactly ``⟨ū_l, r⟩``, so nulls need no stored gradients, and the null
  keeps only its generator state and regenerates its directions on demand.
* :func:`compare_conditions` — change in mean cosine between two conditions
  (bootstrap interval over examples) against the band of changes the same
  random directions show.
* :func:`select_loss_matched` / :func:`select_loss_matched_prompt` — pick the
  control prompt whose mean loss is closest to the condition's prompt, so a
  difference in alignment cannot be explained by a difference in loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, UInt8
from torch import Tensor

from interp.directions import Direction, LayerDict, random_directions, stack_layers
from interp.stats import Interval, bootstrap_ci, paired_bootstrap_ci, sign_flip_columns

__all__ = [
    "Alignment",
    "ConditionComparison",
    "LayerAverage",
    "LossMatch",
    "NullBand",
    "compare_conditions",
    "gradient_alignment",
    "layer_average",
    "random_direction_null",
    "report_comparison",
    "select_loss_matched",
    "select_loss_matched_prompt",
]

MIN_RANDOM_DIRECTIONS = 100
"""Fewest random directions accepted: 2.5/97.5 percentiles need enough draws."""


def _per_layer_mean(x: Tensor) -> list[float]:
    return x.double().mean(0).tolist()


@dataclass(frozen=True, eq=False)
class Alignment:
    """Per-example, per-layer alignment of loss gradients with a direction.

    Attributes:
        layers: model layer of each column.
        loss: ``[n]`` per-example loss the gradients came from.
        grad_norm: ``[n, n_layers]`` ``‖g‖``.
        dot: ``[n, n_layers]`` ``⟨g, v⟩`` with ``v`` the unit direction (the
            scalar projection; multiply by ``Direction.norms`` for the raw one).
        cos: ``[n, n_layers]`` ``cos(g, v)``; 0 where ``‖g‖ = 0``.
        mean_unit_grad: ``[n_layers, d_model]`` mean over examples of
            ``g/‖g‖``; its inner product with a unit direction is the mean
            cosine with that direction (used for random-direction nulls).
    """

    layers: tuple[int, ...]
    loss: Float[Tensor, " n"]
    grad_norm: Float[Tensor, "n n_layers"]
    dot: Float[Tensor, "n n_layers"]
    cos: Float[Tensor, "n n_layers"]
    mean_unit_grad: Float[Tensor, "n_layers d_model"]

    def __post_init__(self) -> None:
        if len(self.layers) != self.cos.shape[1]:
            raise ValueError(f"{len(self.layers)} layers for {self.cos.shape[1]} columns")

    @property
    def n(self) -> int:
        return self.cos.shape[0]

    def summary(self) -> dict[str, Any]:
        """JSON-ready per-layer means (and the mean loss) over examples."""
        return {
            "layers": list(self.layers),
            "n": self.n,
            "loss": float(self.loss.double().mean()),
            "grad_norm": _per_layer_mean(self.grad_norm),
            "dot": _per_layer_mean(self.dot),
            "cos": _per_layer_mean(self.cos),
            "abs_cos": _per_layer_mean(self.cos.abs()),
        }


def gradient_alignment(
    grads: Float[Tensor, "n n_layers d_model"] | LayerDict,
    losses: Float[Tensor, " n"],
    direction: Direction,
) -> Alignment:
    """Norms, projections and cosines of per-example gradients against ``direction``.

    ``grads`` is ``[n, n_layers, d_model]`` with axis 1 in ``direction.layers``
    order, or a dict ``layer|hook name -> [n, d_model]`` (e.g. from
    ``interp.capture_grads``) from which the direction's layers are taken.
    Computed in float64: gradients at one position are small and low-precision
    norms would distort the cosines.
    """
    if not isinstance(grads, Tensor):
        grads, _, _ = stack_layers(grads, direction.layers)
    if grads.shape[1:] != direction.vectors.shape:
        raise ValueError(
            f"gradients are {tuple(grads.shape)} but the direction is "
            f"{tuple(direction.vectors.shape)} (layers {list(direction.layers)})"
        )
    if grads.shape[0] != losses.shape[0]:
        raise ValueError(f"{grads.shape[0]} gradients but {losses.shape[0]} losses")
    g = grads.detach().double()
    v = direction.vectors.detach().to(device=g.device, dtype=torch.float64)
    norm = g.norm(dim=-1)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    dot = torch.einsum("nld,ld->nl", g, v)
    # A zero gradient has no direction: cosine 0 (and it adds 0 to the mean unit gradient).
    cos = torch.where(norm > 0, dot / safe, torch.zeros_like(dot))
    unit = g / safe[..., None]
    return Alignment(
        layers=direction.layers,
        loss=losses.detach().double().cpu(),
        grad_norm=norm.cpu(),
        dot=dot.cpu(),
        cos=cos.cpu(),
        mean_unit_grad=unit.mean(0).cpu(),
    )


@dataclass(frozen=True, eq=False)
class NullBand:
    """Mean cosine of one condition's gradients with ``N`` random unit directions.

    Attributes:
        layers: model layer of each column.
        mean_cos: ``[N, n_layers]`` mean cosine (over examples) with each
            random direction.
        generator_state: CPU generator state the directions were drawn from;
            :meth:`directions` regenerates them, so two conditions can be
            compared on the *same* random directions without storing them.
        level: central mass of the band (0.95 -> 2.5/97.5 percentiles).
    """

    layers: tuple[int, ...]
    mean_cos: Float[Tensor, "N n_layers"]
    generator_state: UInt8[Tensor, " state"]
    d_model: int
    level: float = 0.95

    @property
    def n_directions(self) -> int:
        return self.mean_cos.shape[0]

    @property
    def mean(self) -> Float[Tensor, " n_layers"]:
        return self.mean_cos.mean(0)

    @property
    def std(self) -> Float[Tensor, " n_layers"]:
        return self.mean_cos.std(0)

    @property
    def low(self) -> Float[Tensor, " n_layers"]:
        return _quantile(self.mean_cos, (1 - self.level) / 2)

    @property
    def high(self) -> Float[Tensor, " n_layers"]:
        return _quantile(self.mean_cos, (1 + self.level) / 2)

    def directions(self) -> Float[Tensor, "N n_layers d_model"]:
        """The random unit directions behind this band (regenerated, float32)."""
        gen = torch.Generator()
        gen.set_state(self.generator_state)
        return random_directions(self.n_directions, self.d_model, len(self.layers), gen)

    def summary(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "n_directions": self.n_directions,
            "level": self.level,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "low": self.low.tolist(),
            "high": self.high.tolist(),
        }


def _quantile(x: Tensor, q: float) -> Tensor:
    return torch.quantile(x.double(), q, dim=0)


def random_direction_null(
    source: Alignment | Float[Tensor, "n n_layers d_model"],
    n_directions: int = 200,
    generator: torch.Generator | int = 0,
    level: float = 0.95,
    layers: Sequence[int] | None = None,
) -> NullBand:
    """The random-direction control band for one condition's gradients.

    ``source`` is an :class:`Alignment` (its mean unit gradient is used) or raw
    gradients ``[n, n_layers, d_model]``. Draws ``n_directions`` (≥ 100)
    uniformly random unit directions per layer from ``generator`` and records
    the mean cosine with each. For directions unrelated to the gradients the
    band is centred at 0 with spread ≈ ``‖ū‖/√d_model``. ``layers`` labels
    raw gradients (default ``0..n_layers-1``); an Alignment brings its own.
    """
    if n_directions < MIN_RANDOM_DIRECTIONS:
        raise ValueError(
            f"n_directions must be ≥ {MIN_RANDOM_DIRECTIONS} for 2.5/97.5 percentiles "
            f"to mean anything, got {n_directions}"
        )
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(source, Alignment):
        mean_unit, layers = source.mean_unit_grad, source.layers
    else:
        g = source.detach().double()
        norm = g.norm(dim=-1, keepdim=True)
        mean_unit = (g / torch.where(norm > 0, norm, torch.ones_like(norm))).mean(0).cpu()
        layers = tuple(range(g.shape[1])) if layers is None else tuple(int(x) for x in layers)
        if len(layers) != g.shape[1]:
            raise ValueError(f"{len(layers)} layer labels for {g.shape[1]} layers of gradients")
    gen = (
        generator
        if isinstance(generator, torch.Generator)
        else torch.Generator().manual_seed(int(generator))
    )
    if gen.device.type != "cpu":
        raise ValueError(
            "pass a CPU generator: directions are drawn on the CPU for reproducibility"
        )
    state = gen.get_state()
    n_layers, d_model = mean_unit.shape
    # float32 directions: N·n_layers·d_model floats can be large for 7B-sized
    # models, and an inner product of unit vectors needs no more precision.
    dirs = random_directions(n_directions, d_model, n_layers, gen)
    return NullBand(
        layers=layers,
        mean_cos=torch.einsum("ld,kld->kl", mean_unit.float(), dirs).double(),
        generator_state=state,
        d_model=d_model,
        level=level,
    )


@dataclass(frozen=True, eq=False)
class ConditionComparison:
    """Change from condition ``a`` to condition ``b``, per layer, with its controls.

    Attributes:
        layers: model layer of each entry.
        delta_cos: mean cos(b) − mean cos(a) against the trait direction, with
            a bootstrap interval over examples.
        null_delta: ``[N, n_layers]`` the same change for each random direction.
        null_low, null_high: the ``level`` band of ``null_delta`` per layer.
        outside_null: whether the trait direction's change (point estimate)
            lies outside that band.
        p_null: share of random directions whose ``|change|`` is at least the
            trait direction's, ``(1 + #) / (1 + N)``.
        delta_loss: mean loss(b) − mean loss(a), with a bootstrap interval.
        delta_grad_norm, delta_dot: change in the per-layer mean ``‖g‖`` and
            ``⟨g, v⟩`` — if these move but ``delta_cos`` does not, the
            condition acts through gradient size, not direction.
        paired: whether examples were resampled as pairs.
    """

    layers: tuple[int, ...]
    delta_cos: tuple[Interval, ...]
    null_delta: Float[Tensor, "N n_layers"]
    null_low: tuple[float, ...]
    null_high: tuple[float, ...]
    outside_null: tuple[bool, ...]
    p_null: tuple[float, ...]
    delta_loss: Interval
    delta_grad_norm: tuple[float, ...]
    delta_dot: tuple[float, ...]
    paired: bool

    def summary(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "delta_cos": [ci.as_dict() for ci in self.delta_cos],
            "null_low": list(self.null_low),
            "null_high": list(self.null_high),
            "outside_null": list(self.outside_null),
            "p_null": list(self.p_null),
            "delta_loss": self.delta_loss.as_dict(),
            "delta_grad_norm": list(self.delta_grad_norm),
            "delta_dot": list(self.delta_dot),
            "paired": self.paired,
        }


def _mean_diff(x: Tensor, y: Tensor) -> float:
    return float(y.mean() - x.mean())


def compare_conditions(
    a: Alignment,
    b: Alignment,
    null: NullBand,
    *,
    paired: bool = True,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> ConditionComparison:
    """How much mean cosine changes from ``a`` to ``b``, and whether that is special.

    The interval resamples examples: with ``paired=True`` (default — the same
    training examples under two system prompts) example ``i`` of ``a`` and
    ``b`` is resampled together, which needs equal ``n``. The random band
    evaluates both conditions on ``null``'s random directions (the null from
    either condition; only its directions are used), so it answers whether
    *any* direction would have moved this much.
    """
    if a.layers != b.layers or a.layers != null.layers:
        raise ValueError(f"layers differ: a {a.layers}, b {b.layers}, null {null.layers}")
    if a.mean_unit_grad.shape != b.mean_unit_grad.shape:
        raise ValueError("a and b come from gradients of different d_model")
    if null.d_model != a.mean_unit_grad.shape[1]:
        raise ValueError(f"null has d_model {null.d_model}, gradients {a.mean_unit_grad.shape[1]}")
    if paired and a.n != b.n:
        raise ValueError(f"paired comparison needs equal n, got {a.n} and {b.n}; pass paired=False")
    boot = paired_bootstrap_ci if paired else bootstrap_ci
    dirs = null.directions()
    shift = (b.mean_unit_grad - a.mean_unit_grad).float()
    null_delta = torch.einsum("ld,kld->kl", shift, dirs).double()
    lows = _quantile(null_delta, (1 - null.level) / 2).tolist()
    highs = _quantile(null_delta, (1 + null.level) / 2).tolist()
    deltas, outside, p_null = [], [], []
    for col in range(len(a.layers)):
        ci = boot(_mean_diff, a.cos[:, col], b.cos[:, col], n_boot=n_boot, level=level, seed=seed)
        deltas.append(ci)
        outside.append(not lows[col] <= ci.estimate <= highs[col])
        as_big = int((null_delta[:, col].abs() >= abs(ci.estimate)).sum())
        p_null.append((1 + as_big) / (1 + null_delta.shape[0]))
    return ConditionComparison(
        layers=a.layers,
        delta_cos=tuple(deltas),
        null_delta=null_delta,
        null_low=tuple(lows),
        null_high=tuple(highs),
        outside_null=tuple(outside),
        p_null=tuple(p_null),
        delta_loss=boot(_mean_diff, a.loss, b.loss, n_boot=n_boot, level=level, seed=seed),
        delta_grad_norm=tuple((b.grad_norm.mean(0) - a.grad_norm.mean(0)).tolist()),
        delta_dot=tuple((b.dot.mean(0) - a.dot.mean(0)).tolist()),
        paired=paired,
    )


class LossMatch(NamedTuple):
    """One row of the loss-matching table.

    ``mean_loss`` is the candidate's mean loss with a bootstrap interval;
    ``diff`` is candidate − target with an interval (paired when the target
    losses are per-example on the same batch); ``abs_diff = |diff.estimate|``.
    """

    name: str
    n: int
    mean_loss: Interval
    diff: Interval
    abs_diff: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.n,
            "mean_loss": self.mean_loss.as_dict(),
            "diff": self.diff.as_dict(),
            "abs_diff": self.abs_diff,
        }


def _mean(x: Tensor) -> float:
    return float(x.mean())


def select_loss_matched(
    candidate_losses: Mapping[str, Float[Tensor, " _"]],
    target_loss: float | Float[Tensor, " _"],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[str, tuple[LossMatch, ...]]:
    """The candidate whose mean loss is closest to ``target_loss``, and the full table.

    ``candidate_losses`` maps a name to per-example losses on the calibration
    batch. ``target_loss`` is a mean loss, or the target's per-example losses
    (on the same batch they give a paired interval for the difference).
    The table is sorted by ``abs_diff`` (ties keep the input order); the
    first row is the selected control.
    """
    if not candidate_losses:
        raise ValueError("no candidates to select from")
    target = target_loss.detach().double().flatten() if isinstance(target_loss, Tensor) else None
    target_mean = float(target.mean()) if target is not None else float(target_loss)
    rows = []
    for name, losses in candidate_losses.items():
        x = losses.detach().double().flatten()
        if x.numel() == 0:
            raise ValueError(f"candidate {name!r} has no losses")
        mean_ci = bootstrap_ci(_mean, x, n_boot=n_boot, level=level, seed=seed)
        if target is None:
            diff = Interval(
                mean_ci.estimate - target_mean,
                mean_ci.low - target_mean,
                mean_ci.high - target_mean,
            )
        elif target.numel() == x.numel():
            diff = paired_bootstrap_ci(
                lambda t, c: float(c.mean() - t.mean()),
                target,
                x,
                n_boot=n_boot,
                level=level,
                seed=seed,
            )
        else:
            diff = bootstrap_ci(
                lambda t, c: float(c.mean() - t.mean()),
                target,
                x,
                n_boot=n_boot,
                level=level,
                seed=seed,
            )
        rows.append(LossMatch(name, x.numel(), mean_ci, diff, abs(diff.estimate)))
    table = tuple(sorted(rows, key=lambda r: r.abs_diff))  # sorted() is stable
    return table[0].name, table


def select_loss_matched_prompt(
    loss_of: Callable[[str], Tensor],
    candidates: Mapping[str, str] | Sequence[str],
    target: str | float,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[str, tuple[LossMatch, ...]]:
    """Loss-match a control system prompt using the model through ``loss_of``.

    ``loss_of(system_prompt)`` returns per-example losses of the calibration
    batch under that system prompt (the caller closes over model and batch).
    ``candidates`` maps names to prompt texts (a plain list is named by its
    texts). ``target`` is the condition's prompt text (its losses are computed
    with ``loss_of`` and paired with the candidates') or a target mean loss.
    Returns ``(best_name, table)`` as :func:`select_loss_matched`.
    """
    if isinstance(candidates, str):
        raise TypeError("candidates must be a list or dict of prompts, not one string")
    named = dict(candidates) if isinstance(candidates, Mapping) else {c: c for c in candidates}
    losses = {name: loss_of(prompt) for name, prompt in named.items()}
    target_loss = loss_of(target) if isinstance(target, str) else float(target)
    return select_loss_matched(losses, target_loss, n_boot=n_boot, level=level, seed=seed)


@dataclass(frozen=True)
class LayerAverage:
    """A :class:`ConditionComparison` averaged over its layers (:func:`layer_average`).

    Attributes:
        delta_cos: change of the per-example layer-averaged cosine, with a bootstrap
            interval over examples.
        null_low, null_high: the ``level`` band of the same change for the random
            directions (each direction's change averaged over the layers).
        p_null: share of random directions whose ``|change|`` is at least the trait
            direction's, ``(1 + #) / (1 + N)``.
    """

    delta_cos: Interval
    null_low: float
    null_high: float
    p_null: float

    def summary(self) -> dict[str, Any]:
        return {
            "delta_cos": self.delta_cos.as_dict(),
            "null_low": self.null_low,
            "null_high": self.null_high,
            "p_null": self.p_null,
        }


def layer_average(
    a: Alignment,
    b: Alignment,
    comparison: ConditionComparison,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> LayerAverage:
    """One test over all layers instead of one per layer: the change of the mean cosine
    from ``a`` to ``b`` with each example's cosines averaged over the layers, against
    ``comparison``'s random directions averaged the same way (``comparison`` =
    ``compare_conditions(a, b, null)``; paired as it was)."""
    if a.layers != comparison.layers or b.layers != comparison.layers:
        raise ValueError(f"layers differ: a {a.layers}, b {b.layers}, {comparison.layers}")
    boot = paired_bootstrap_ci if comparison.paired else bootstrap_ci
    x, y = a.cos.mean(1), b.cos.mean(1)
    ci = boot(_mean_diff, x, y, n_boot=n_boot, level=level, seed=seed)
    band = comparison.null_delta.mean(1)
    as_big = int((band.abs() >= abs(ci.estimate)).sum())
    return LayerAverage(
        delta_cos=ci,
        null_low=float(_quantile(band, (1 - level) / 2)),
        null_high=float(_quantile(band, (1 + level) / 2)),
        p_null=(1 + as_big) / (1 + band.shape[0]),
    )


def report_comparison(
    a: Alignment,
    b: Alignment,
    null: NullBand,
    *,
    n_perm: int = 9999,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything about the change from ``a`` to ``b`` in one JSON-ready dict: the
    :func:`compare_conditions` summary (per-layer change with intervals, random-direction
    band and ``p_null``), per-layer sign-flip p-values of the paired per-example change of
    cos (``p_sign_flip``, ``n_perm`` flips; needs equal ``n``) and the
    :func:`layer_average` test (``layer_average``)."""
    comp = compare_conditions(a, b, null, n_boot=n_boot, level=level, seed=seed)
    flips = sign_flip_columns(b.cos, a.cos, n_perm=n_perm, seed=seed).p_value.tolist()
    average = layer_average(a, b, comp, n_boot=n_boot, level=level, seed=seed)
    return {**comp.summary(), "p_sign_flip": flips, "layer_average": average.summary()}

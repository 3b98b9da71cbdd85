"""Linear probes: L2-regularized logistic regression per layer on pooled activations.

Design
------
A :class:`LinearProbe` is a frozen value: a weight vector and bias acting on
*standardized* features ``(x - mean) / scale``, plus the standardization
itself and JSON metadata (layer, hook name, what the positive class means).
Standardizing matters in the residual stream, where a few dimensions carry
activations orders of magnitude larger than the rest; without it the L2
penalty would effectively only shrink the small dimensions.

:func:`fit_probe` minimizes the mean (optionally class-balanced) binary
cross-entropy plus ``l2/2 ‖w‖²`` with full-batch L-BFGS in float64 from a zero
initialization, so a fit is deterministic — no seed needed. This is the
textbook probe (Alain & Bengio 2016, *Understanding intermediate layers using
linear classifier probes*); with a few hundred examples and a few thousand
dimensions it converges in well under a second on a CPU.

:func:`probe_layers` is the per-layer sweep a study reports: out-of-fold
probabilities from grouped, roughly stratified k-fold cross-validation
(:func:`group_folds`; rows of one group — e.g. the candidates of one prompt —
never straddle a train/test split), the AUROC of those held-out scores with a
bootstrap interval (:mod:`interp.stats`), and held-out accuracy at 0.5.
Picking the best layer from the same sweep is optimistic; say so when you
report it, or choose the layer on a separate split.

:func:`classify` turns pooled activations into probabilities and labels.
Pool token activations with :func:`interp.directions.mean_over_tokens`.

``LinearProbe.save`` writes one safetensors file whose header carries the JSON
metadata, atomically (:func:`interp.cache.atomic_write`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.cache import atomic_write
from interp.stats import (
    Interval,
    auroc,
    bootstrap_ci,
    cluster_bootstrap_ci,
    holm,
    permutation_test,
)

__all__ = [
    "Classification",
    "HeldOutProbe",
    "LayerProbeScore",
    "LinearProbe",
    "classify",
    "cross_val_proba",
    "fit_probe",
    "fit_probes",
    "group_folds",
    "held_out_layer_probe",
    "probe_layers",
    "token_counts",
]

_FORMAT = "interp.LinearProbe"
_FORMAT_VERSION = 1
# Standard deviations below this are treated as constant features (scale 1, weight ~0).
_MIN_SCALE = 1e-6


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """``P(positive | x) = sigmoid(((x - mean) / scale) · weight + bias)``.

    Attributes:
        weight: ``[d]`` coefficients on standardized features.
        bias: intercept.
        mean: ``[d]`` feature means of the training data.
        scale: ``[d]`` feature standard deviations of the training data (≥ 1e-6).
        meta: JSON-serializable provenance: layer, hook name, label meaning,
            regularization, class counts …
    """

    weight: Float[Tensor, " d"]
    bias: float
    mean: Float[Tensor, " d"]
    scale: Float[Tensor, " d"]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if bool((self.scale <= 0).any()):
            raise ValueError("LinearProbe.scale must be positive")

    @property
    def d(self) -> int:
        return self.weight.shape[0]

    @property
    def direction(self) -> Float[Tensor, " d"]:
        """The probe's decision direction in raw activation space, unit length."""
        raw = self.weight / self.scale
        return raw / raw.norm().clamp_min(1e-12)

    def logits(self, x: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """Log-odds of the positive class for each row of ``x``."""
        if x.shape[-1] != self.d:
            raise ValueError(f"probe expects {self.d} features, got {x.shape[-1]}")
        z = (x.to(self.weight.dtype) - self.mean) / self.scale
        return z @ self.weight + self.bias

    def predict_proba(self, x: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """``P(positive)`` for each row of ``x``."""
        return torch.sigmoid(self.logits(x))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file (tensors + JSON metadata in its header), atomically."""
        from safetensors.torch import save_file

        header = {"format": _FORMAT, "version": _FORMAT_VERSION, "meta": dict(self.meta)}
        try:
            metadata = {"interp": json.dumps(header)}
        except TypeError as exc:
            raise TypeError(f"LinearProbe.meta must be JSON-serializable: {exc}") from None
        tensors = {
            "weight": self.weight.detach().float().cpu().contiguous(),
            "bias": torch.tensor([float(self.bias)]),
            "mean": self.mean.detach().float().cpu().contiguous(),
            "scale": self.scale.detach().float().cpu().contiguous(),
        }
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LinearProbe:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if "interp" not in metadata:
                raise ValueError(f"{path} is not an interp probe file (no 'interp' metadata)")
            header = json.loads(metadata["interp"])
            if header.get("format") != _FORMAT:
                raise ValueError(f"{path} holds {header.get('format')!r}, not {_FORMAT!r}")
            if header.get("version") != _FORMAT_VERSION:
                raise ValueError(
                    f"{path}: unsupported probe format version {header.get('version')}"
                )
            tensors = {k: f.get_tensor(k) for k in ("weight", "bias", "mean", "scale")}
        return cls(
            weight=tensors["weight"],
            bias=float(tensors["bias"][0]),
            mean=tensors["mean"],
            scale=tensors["scale"],
            meta=header["meta"],
        )


def _labels(y: Tensor, n: int) -> Tensor:
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(y.shape)}")
    if y.dtype != torch.bool:
        if bool(((y != 0) & (y != 1)).any()):
            raise ValueError("labels must be boolean or 0/1")
        y = y != 0
    return y


def fit_probe(
    x: Float[Tensor, "n d"],
    y: Bool[Tensor, " n"] | Int[Tensor, " n"],
    *,
    l2: float = 1e-2,
    balanced: bool = True,
    max_iter: int = 200,
    meta: Mapping[str, Any] | None = None,
) -> LinearProbe:
    """Fit a logistic-regression probe on rows ``x`` with labels ``y`` (True = positive).

    Args:
        l2: coefficient of ``½‖w‖²`` (on standardized features) added to the mean loss.
        balanced: weight each class by ``n / (2 n_class)`` so an imbalanced label
            set does not collapse the probe onto the majority class.
        max_iter: L-BFGS iterations.
        meta: provenance stored in the probe (class counts and ``l2`` are added).

    Raises:
        ValueError: if ``y`` holds only one class — a probe cannot be fit then,
            and callers should report that rather than a meaningless score.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be ≥ 0, got {l2}")
    n = x.shape[0]
    y = _labels(y, n)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == n:
        raise ValueError(
            f"fit_probe needs both classes; got {n_pos} positive and {n - n_pos} negative rows"
        )
    x64 = x.detach().double().cpu()
    mean = x64.mean(0)
    std = x64.std(0, correction=0)
    scale = torch.where(std > _MIN_SCALE, std, torch.ones_like(std))
    z = (x64 - mean) / scale
    target = y.cpu().double()
    if balanced:
        weights = torch.where(y.cpu(), n / (2.0 * n_pos), n / (2.0 * (n - n_pos))).double()
    else:
        weights = torch.ones(n, dtype=torch.float64)

    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        logits = z @ w + b
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target, weight=weights, reduction="mean"
        )
        loss = bce + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    info = {"l2": l2, "balanced": balanced, "n_pos": n_pos, "n_neg": n - n_pos}
    return LinearProbe(
        weight=w.detach().float(),
        bias=float(b.detach()),
        mean=mean.float(),
        scale=scale.float(),
        meta={**dict(meta or {}), **info},
    )


def fit_probes(
    acts: Float[Tensor, "layer n d"],
    y: Bool[Tensor, " n"] | Int[Tensor, " n"],
    *,
    layers: Sequence[int] | None = None,
    hook: str = "blocks.{layer}.hook_resid_post",
    **fit_kwargs: Any,
) -> list[LinearProbe]:
    """One probe per layer of ``acts`` (``layers`` names the rows; default ``0..L-1``)."""
    layers = list(range(acts.shape[0])) if layers is None else [int(i) for i in layers]
    if len(layers) != acts.shape[0]:
        raise ValueError(f"{len(layers)} layer indices for {acts.shape[0]} layers of activations")
    extra = dict(fit_kwargs.pop("meta", None) or {})
    return [
        fit_probe(
            acts[i],
            y,
            meta={**extra, "layer": layer, "hook": hook.format(layer=layer)},
            **fit_kwargs,
        )
        for i, layer in enumerate(layers)
    ]


def group_folds(
    groups: Sequence[Hashable],
    y: Bool[Tensor, " n"] | Int[Tensor, " n"],
    k: int = 5,
    seed: int = 0,
) -> list[Int[Tensor, " _m"]]:
    """Test-row indices of ``k`` folds that keep each group whole and spread the positives.

    Groups are shuffled (seeded), then ordered by their fraction of positive
    rows (a stable sort, so ties keep the shuffled order) and dealt round-robin,
    so every fold gets a similar class mix. ``k`` is capped at the number of
    groups; folds are never empty.
    """
    n = len(groups)
    y = _labels(y, n)
    if k < 2:
        raise ValueError(f"k must be ≥ 2, got {k}")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = list(members)
    if len(keys) < 2:
        raise ValueError("cross-validation needs at least two groups")
    k = min(k, len(keys))
    gen = torch.Generator().manual_seed(int(seed))
    keys = [keys[i] for i in torch.randperm(len(keys), generator=gen).tolist()]
    frac = [float(y[members[g]].double().mean()) for g in keys]
    order = sorted(range(len(keys)), key=lambda i: frac[i])
    folds: list[list[int]] = [[] for _ in range(k)]
    for rank, i in enumerate(order):
        folds[rank % k].extend(members[keys[i]])
    return [torch.tensor(sorted(f), dtype=torch.long) for f in folds]


def cross_val_proba(
    x: Float[Tensor, "n d"],
    y: Bool[Tensor, " n"] | Int[Tensor, " n"],
    folds: Sequence[Int[Tensor, " _m"]],
    **fit_kwargs: Any,
) -> Float[Tensor, " n"]:
    """Out-of-fold ``P(positive)``: each fold scored by a probe fit on the other folds.

    Rows of a fold whose training part holds a single class, and rows in no
    fold, are NaN.
    """
    n = x.shape[0]
    y = _labels(y, n)
    out = torch.full((n,), float("nan"))
    for test in folds:
        train = torch.ones(n, dtype=torch.bool)
        train[test] = False
        y_train = y[train]
        if y_train.numel() == 0 or bool(y_train.all()) or not bool(y_train.any()):
            continue
        probe = fit_probe(x[train], y_train, **fit_kwargs)
        out[test] = probe.predict_proba(x[test]).float().cpu()
    return out


class LayerProbeScore(NamedTuple):
    """Held-out quality of one layer's probe (from :func:`probe_layers`).

    Attributes:
        layer: model layer index.
        auroc: AUROC of the out-of-fold probabilities, with a bootstrap interval
            (NaN when fewer than one scored row per class).
        accuracy: out-of-fold accuracy at probability 0.5.
        balanced_accuracy: mean of the per-class accuracies at 0.5.
        n_scored: rows with an out-of-fold score.
        proba: ``[n]`` out-of-fold probabilities (NaN where unscored).
    """

    layer: int
    auroc: Interval
    accuracy: float
    balanced_accuracy: float
    n_scored: int
    proba: Tensor


def probe_layers(
    acts: Float[Tensor, "layer n d"],
    y: Bool[Tensor, " n"] | Int[Tensor, " n"],
    groups: Sequence[Hashable] | None = None,
    *,
    layers: Sequence[int] | None = None,
    k: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    **fit_kwargs: Any,
) -> list[LayerProbeScore]:
    """Cross-validated probe quality at every layer of ``acts``.

    ``groups`` keeps related rows (e.g. candidates of one prompt) in the same
    fold; by default every row is its own group. The same folds are used at
    every layer, so layers are compared on identical splits.
    """
    n = acts.shape[1]
    y = _labels(y, n)
    layers = list(range(acts.shape[0])) if layers is None else [int(i) for i in layers]
    if len(layers) != acts.shape[0]:
        raise ValueError(f"{len(layers)} layer indices for {acts.shape[0]} layers of activations")
    folds = group_folds(list(range(n)) if groups is None else list(groups), y, k=k, seed=seed)
    results = []
    for i, layer in enumerate(layers):
        proba = cross_val_proba(acts[i], y, folds, **fit_kwargs)
        ok = ~proba.isnan()
        p, t = proba[ok].double(), y[ok]
        pos, neg = p[t], p[~t]
        if pos.numel() and neg.numel():
            interval = bootstrap_ci(auroc, pos, neg, n_boot=n_boot, seed=seed + layer)
        else:
            interval = Interval(float("nan"), float("nan"), float("nan"))
        pred = p >= 0.5
        correct = pred == t
        acc = float(correct.double().mean()) if correct.numel() else float("nan")
        per_class = [
            float(correct[t == c].double().mean()) for c in (True, False) if (t == c).any()
        ]
        bal = sum(per_class) / len(per_class) if per_class else float("nan")
        results.append(LayerProbeScore(layer, interval, acc, bal, int(ok.sum()), proba))
    return results


class Classification(NamedTuple):
    """Output of :func:`classify`: ``P(positive)`` and the thresholded label per row."""

    proba: Tensor
    label: Tensor


def classify(probe: LinearProbe, x: Float[Tensor, "n d"], threshold: float = 0.5) -> Classification:
    """Score pooled activations ``x`` with ``probe``: probabilities and labels (``≥ threshold``)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    proba = probe.predict_proba(x)
    return Classification(proba, proba >= threshold)


def token_counts(
    tokenizer: Any, texts: Sequence[str], rows: Bool[Tensor, " n"] | None = None
) -> Float[Tensor, "n vocab"]:
    """A bag of tokens: ``[n, vocab]`` counts of each text's tokens (no special tokens added).

    The columns are the tokens that occur in ``rows`` (a mask over ``texts``; default every
    text), in token-id order: restrict them to the rows a model is fit on, so the held-out
    rows contribute no vocabulary of their own.
    """
    if rows is not None and rows.shape != (len(texts),):
        raise ValueError(f"rows: a mask of {len(texts)} texts, got shape {tuple(rows.shape)}")
    counts = torch.zeros(len(texts), len(tokenizer))
    for r, text in enumerate(texts):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        counts[r].index_add_(0, ids, torch.ones(len(ids)))
    return counts[:, counts[rows if rows is not None else slice(None)].sum(0) > 0]


def _split_auroc(p: Tensor, y: Tensor) -> float:
    return auroc(p[y].double(), p[~y].double())


@dataclass(frozen=True)
class HeldOutProbe:
    """What :func:`held_out_layer_probe` returns.

    Attributes:
        best_layer: the layer (index into ``acts``) with the highest validation AUROC.
        validation_auroc_by_layer: per layer, the AUROC on the validation rows of a probe fit
            on the training rows.
        test: per feature set (``"probe"``, then each baseline): ``auroc`` (estimate and
            cluster-bootstrap interval), ``permutation`` (label permutation test of the
            AUROC, one-sided ``greater``) and ``p_holm`` (Holm over all feature sets).
        differences: ``probe_minus_<baseline>``: the test-AUROC difference with a paired
            cluster-bootstrap interval.
        n: rows per split (``train``, ``val``, ``test``).
        n_test_groups: distinct groups among the test rows (the bootstrap's clusters).
    """

    best_layer: int
    validation_auroc_by_layer: list[float]
    test: dict[str, dict[str, Any]]
    differences: dict[str, dict[str, float]]
    n: dict[str, int]
    n_test_groups: int

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def held_out_layer_probe(
    acts: Float[Tensor, "layer n d"],
    y: Bool[Tensor, " n"],
    split: Sequence[str],
    groups: Sequence[Hashable],
    baselines: Mapping[str, Float[Tensor, "n _"]] | None = None,
    *,
    l2: float = 1e-2,
    n_boot: int = 1000,
    n_perm: int = 1000,
    seed: int = 0,
) -> HeldOutProbe:
    """A probe's layer chosen on held-out rows and tested once on others, with baselines.

    ``split`` names each row ``"train"``, ``"val"`` or ``"test"`` (split by group, e.g. by
    prompt, so no group straddles two splits). A probe per layer is fit on train and scored
    (AUROC) on val; the best layer (the lowest on ties) is refit on train + val and scored
    once on test, and so is every baseline feature set (e.g. a bag of tokens from
    :func:`token_counts`, or layer 0) on the same rows. Test AUROCs and the differences
    probe − baseline get a cluster bootstrap over ``groups`` (rows of one group are not
    independent); label-permutation p-values get Holm over the probe and the baselines.

    Raises:
        ValueError: an unknown split name, mismatched lengths, or a split with one class.
    """
    n = acts.shape[1]
    if len(split) != n or len(groups) != n or y.shape != (n,):
        raise ValueError(
            f"{n} rows of activations, {len(split)} split names, {len(groups)} "
            f"groups and {tuple(y.shape)} labels"
        )
    if unknown := set(split) - {"train", "val", "test"}:
        raise ValueError(f"split names are train, val and test; got {sorted(unknown)}")
    baselines = dict(baselines or {})
    if "probe" in baselines or any(b.shape[0] != n for b in baselines.values()):
        raise ValueError(f"baselines: {n} rows each, none named 'probe'")
    masks = {name: torch.tensor([s == name for s in split]) for name in ("train", "val", "test")}
    tr, va, te = masks.values()
    for name, m in zip(("train", "validation", "test"), masks.values(), strict=True):
        if not (y[m].any() and (~y[m]).any()):
            raise ValueError(f"the probe's {name} split has one label class")
    val = [_split_auroc(fit_probe(a[tr], y[tr], l2=l2).predict_proba(a[va]), y[va]) for a in acts]
    best = max(range(len(val)), key=lambda i: (val[i], -i))
    fit, yt = tr | va, y[te]
    feats = {"probe": acts[best], **baselines}
    scores = {k: fit_probe(f[fit], y[fit], l2=l2).predict_proba(f[te]) for k, f in feats.items()}
    g = [x for x, m in zip(groups, te.tolist(), strict=True) if m]
    boot = dict(groups=g, n_boot=n_boot, seed=seed)
    test: dict[str, dict[str, Any]] = {}
    for k, p in scores.items():
        perm = permutation_test(
            p[yt].double(),
            p[~yt].double(),
            statistic=auroc,
            n_perm=n_perm,
            alternative="greater",
            seed=seed,
        )
        test[k] = {
            "auroc": cluster_bootstrap_ci(_split_auroc, p, yt, **boot).as_dict(),
            "permutation": perm.as_dict(),
        }
    p_holm = holm([t["permutation"]["p_value"] for t in test.values()]).tolist()
    for t, p_adj in zip(test.values(), p_holm, strict=True):
        t["p_holm"] = p_adj

    def minus(p: Tensor, q: Tensor, t: Tensor) -> float:
        return _split_auroc(p, t) - _split_auroc(q, t)

    diff = {
        f"probe_minus_{b}": cluster_bootstrap_ci(
            minus, scores["probe"], scores[b], yt, **boot
        ).as_dict()
        for b in baselines
    }
    return HeldOutProbe(
        best, val, test, diff, {k: int(m.sum()) for k, m in masks.items()}, len(set(g))
    )

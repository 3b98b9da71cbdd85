"""Sentence-level SAEs: edit a model through an SAE trained on pooled rows, and draw control
latents matched on firing rate.

An SAE trained on mean-pooled activations (``capture_dataset(pool="mean")``, one row per
example) describes examples, not tokens: ``splice`` would apply it to token activations it
never saw. ``pooled_splice`` edits at the level the SAE was trained at. For each row of the
running batch it encodes the mean of the row's pooled tokens (real tokens, minus the
``exclude_ids`` such as BOS), computes the change the feature edit makes to the
reconstruction (``splice(keep_error=True)`` semantics: only the edited latents' decoder
rows, the SAE error is kept), and adds that change to every pooled token. The row's mean
then equals exactly the edited pooled vector; padding and excluded tokens are untouched.
The hook reads the running batch (``interp.positions.running_batch``), so run the model
through ``interp`` (``score``, ``capture``, ``model(batch)``); decoding steps of
``generate`` (one new token, no row mean) raise.

``matched_features`` draws random latents with the firing-rate profile of a tested set:
the control for "ablating these latents does X" that random latents of another firing
rate (dead ones, or ones that fire on everything) would not be.

``train_on_rows`` fits a ``TopKSAE`` to pooled rows held in memory (with the ``input_scale``
``pooled_splice`` takes); ``ablation_nll`` gives each text's Δ NLL when each of several
latent sets (a tested set and its matched controls) is removed from its pooled vector;
``matched_ablation_nll`` draws the matched control sets and does both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.positions import PositionError, decoding_step, running_batch
from interp.sae.functional import sparse_decode
from interp.sae.model import TopKSAE
from interp.sae.splice import _factors
from interp.sae.train import SAETrainConfig, SAETrainResult, train_sae

__all__ = [
    "ablation_nll",
    "matched_ablation_nll",
    "matched_features",
    "pooled_splice",
    "train_on_rows",
]


def pooled_splice(
    sae: TopKSAE,
    ablate: Iterable[int] = (),
    scale: Mapping[int, float | int] | None = None,
    *,
    input_scale: float = 1.0,
    exclude_ids: Sequence[int] | Tensor = (),
) -> Callable[[Tensor, Any], Tensor]:
    """Hook function editing each row's pooled vector through ``sae`` (see the module doc).

    Args:
        sae: a ``TopKSAE`` trained on pooled rows (divided by ``input_scale``).
        ablate: latents to zero (after ``scale``, so ablation wins).
        scale: ``{latent: factor}`` multipliers.
        input_scale: the SAE's rows were the pooled activations divided by this; the
            edit is computed on ``mean / input_scale`` and scaled back.
        exclude_ids: token ids left out of the mean and of the edit (pass
            ``interp.runs.special_ids(tokenizer)`` to match ``capture_dataset``'s
            ``exclude_special=True``).
    """
    factors = _factors(sae, ablate, scale)
    if not input_scale > 0:
        raise ValueError(f"input_scale must be > 0, got {input_scale}")
    excluded = torch.as_tensor(
        exclude_ids if isinstance(exclude_ids, Tensor) else list(exclude_ids), dtype=torch.long
    )

    def hook_fn(activation: Float[Tensor, "batch pos d"], hook: Any = None) -> Tensor:
        del hook
        if factors is None:
            return activation
        batch = running_batch()
        if batch is None or decoding_step():
            raise PositionError(
                "pooled_splice needs the whole running batch: run the model through interp "
                "(score, capture, model(batch)); decoding steps of generate have no row mean"
            )
        if tuple(batch.input_ids.shape) != tuple(activation.shape[:2]):
            raise PositionError(
                f"activation {tuple(activation.shape)} does not match the running batch "
                f"{tuple(batch.input_ids.shape)}"
            )
        ids = batch.input_ids.to(activation.device)
        keep = batch.attention_mask.to(activation.device).bool()
        keep &= ~torch.isin(ids, excluded.to(activation.device))
        w = keep.to(torch.float32)[..., None]
        mean = (activation.float() * w).sum(1) / w.sum(1).clamp_min(1.0)
        with torch.no_grad():
            latents = sae.encode((mean / input_scale).to(sae.W_enc.device))
            f = factors.to(latents.values.device)[latents.indices]
            delta = sparse_decode(latents.indices, latents.values * (f - 1.0), sae.W_dec)
        delta = delta.to(activation.device) * input_scale
        return activation + (delta[:, None, :] * w).to(activation.dtype)

    return hook_fn


def matched_features(
    rates: Float[Tensor, " d_sae"],
    tested: Sequence[int],
    *,
    n_bins: int = 5,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Random latents with the firing-rate profile of ``tested``, one per tested latent.

    Candidates are the latents that fire (``rates > 0``) and are not tested; they are cut
    into ``n_bins`` quantile bins of their firing rates, and each tested latent gets a
    candidate of its own bin, drawn without replacement. A bin with too few candidates is
    topped up with the free candidates nearest in rate to the bin's centre, so the result
    always holds ``len(tested)`` distinct latents (in the order of the bins).

    Raises:
        ValueError: fewer candidates than tested latents, or ``n_bins < 1``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    rates = rates.detach().to("cpu", torch.float64).flatten()
    tested_t = torch.as_tensor(list(tested), dtype=torch.long)
    free = rates > 0
    free[tested_t] = False
    pool = free.nonzero().flatten()
    if len(pool) < len(tested_t):
        raise ValueError(
            f"{len(pool)} untested latents fire; cannot match {len(tested_t)} tested ones"
        )
    q = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    edges = torch.quantile(rates[pool], q)
    bins = torch.searchsorted(edges[1:-1].contiguous(), rates, right=True)
    out: list[int] = []
    for b, n in zip(*bins[tested_t].unique(return_counts=True), strict=True):
        cands = pool[(bins[pool] == b) & free[pool]]
        cands = cands[torch.randperm(len(cands), generator=generator)][: int(n)]
        if len(cands) < n:  # a thin bin: the free candidates nearest in rate
            others = pool[(bins[pool] != b) & free[pool]]
            centre = edges[int(b) : int(b) + 2].mean()
            near = others[(rates[others] - centre).abs().argsort(stable=True)]
            cands = torch.cat([cands, near[: int(n) - len(cands)]])
        free[cands] = False
        out += cands.tolist()
    return out


def train_on_rows(
    rows: Float[Tensor, "n d"],
    d_sae: int,
    k: int,
    config: SAETrainConfig,
    *,
    batch_size: int,
    seed: int | None = None,
    hook_name: str | None = None,
    device: torch.device | str | None = None,
    init: str = "sparsify",
) -> tuple[TopKSAE, float, SAETrainResult]:
    """A ``TopKSAE`` fitted to rows held in memory (e.g. one pooled vector per sentence).

    The rows are divided by ``input_scale = max(mean row norm / sqrt(d), 1e-12)`` (so
    their mean norm is sqrt(d), whatever the model's scale); encode other rows as
    ``x / input_scale`` and edit with ``pooled_splice(..., input_scale=input_scale)``.
    ``config.max_steps`` batches of ``batch_size`` rows are drawn with replacement. The
    SAE's initialisation is seeded with ``seed`` (default ``config.seed``), the batch draw
    with ``seed + 1``; the SAE lives on ``device`` (default: the rows' device); ``init`` is
    ``TopKSAE``'s.

    Returns:
        the SAE, ``input_scale`` and ``train_sae``'s result.
    """
    if rows.dim() != 2 or len(rows) == 0:
        raise ValueError(f"train_on_rows needs a non-empty [n, d] matrix, got {tuple(rows.shape)}")
    if config.max_steps is None:
        raise ValueError("train_on_rows needs config.max_steps (the number of batches)")
    device = rows.device if device is None else torch.device(device)
    seed = config.seed if seed is None else seed
    d = rows.shape[1]
    scale = max(float(rows.norm(dim=1).mean() / math.sqrt(d)), 1e-12)
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, d_sae, k, hook_name=hook_name, generator=gen, init=init).to(device)
    x, g = (rows / scale).to(device), torch.Generator().manual_seed(seed + 1)
    batches = (
        x[torch.randint(0, len(x), (batch_size,), generator=g).to(device)]
        for _ in range(config.max_steps)
    )
    return sae, scale, train_sae(sae, batches, config)


def ablation_nll(
    model: Any,
    texts: Sequence[Any],
    hook_name: str,
    sae: TopKSAE,
    feature_sets: Sequence[Sequence[int]],
    input_scale: float = 1.0,
    *,
    baseline: Float[Tensor, " n"] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Float[Tensor, "n sets"]:
    """Δ NLL of every text when each set of latents is removed from its pooled vector.

    Column ``c`` is ``score(model, texts).nll`` with ``pooled_splice(sae, feature_sets[c])``
    hooked at ``hook_name`` (special tokens excluded, as ``capture_dataset`` excludes them)
    minus ``baseline`` (default: the unhooked NLL, computed here). ``progress``: a bar over
    the sets.
    """
    from tqdm.auto import tqdm

    from interp.runs import score, special_ids

    if baseline is None:
        baseline = score(model, texts, batch_size=batch_size, progress=False).nll
    specials = special_ids(model.tokenizer)
    cols = []
    bar = tqdm(feature_sets, desc=f"ablations at {hook_name}", disable=not progress, leave=False)
    for feats in bar:
        fn = pooled_splice(sae, feats, input_scale=input_scale, exclude_ids=specials)
        with model.hooks(fwd=[(hook_name, fn)]):
            cols.append(score(model, texts, batch_size=batch_size, progress=False).nll - baseline)
    return torch.stack(cols, 1)


def matched_ablation_nll(
    model: Any,
    texts: Sequence[Any],
    hook_name: str,
    sae: TopKSAE,
    tested: Sequence[int],
    rates: Float[Tensor, " d_sae"],
    input_scale: float = 1.0,
    *,
    n_random: int,
    n_bins: int = 5,
    generator: torch.Generator | None = None,
    baseline: Float[Tensor, " n"] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[Float[Tensor, "n sets"], list[list[int]]]:
    """``ablation_nll`` of ``tested`` (column 0) and of ``n_random`` sets drawn by
    ``matched_features(rates, tested, n_bins=n_bins, generator=generator)`` (columns 1:);
    returns the Δ NLL matrix and the random sets (the input of
    ``stats.control_contrast``)."""
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    sets = [
        matched_features(rates, tested, n_bins=n_bins, generator=generator) for _ in range(n_random)
    ]
    effects = ablation_nll(
        model,
        texts,
        hook_name,
        sae,
        [list(tested), *sets],
        input_scale,
        baseline=baseline,
        batch_size=batch_size,
        progress=progress,
    )
    return effects, sets

"""Comparing SAE features between two models, and describing features by their top rows.

``dense_codes``: an SAE's dense latents of rows held on any device, returned there.
``paired_feature_tests``: one SAE encodes the same rows (e.g. one pooled vector per
sentence) taken from two models; per latent that varies, Cohen's d, d_z and a paired
sign-flip test, BH-adjusted over the latents, ranked significant first.
``top_rows`` / ``top_row_means``: the rows that activate a latent most, and the mean of
a row embedding over them (a latent's description, e.g. for clustering).
``cluster_features``: k-means over such descriptions, with the enrichment of one kind of
latent (e.g. those of a delta SAE) per cluster and a permutation test of the largest;
it needs scikit-learn (the ``examples`` extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp import stats
from interp.sae.model import TopKSAE

__all__ = [
    "FeatureClusters",
    "FeatureTest",
    "cluster_features",
    "dense_codes",
    "paired_feature_tests",
    "top_row_means",
    "top_rows",
]


def dense_codes(sae: TopKSAE, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d_sae"]:
    """``sae.encode_dense(x)`` without autograd, computed on the SAE's device (e.g. a GPU)
    and returned on ``x``'s (e.g. rows kept on the CPU)."""
    with torch.no_grad():
        return sae.encode_dense(x.to(sae.W_enc.device)).to(x.device)


@dataclasses.dataclass(frozen=True)
class FeatureTest:
    """One latent's paired comparison (:func:`paired_feature_tests`).

    Attributes:
        feature: the latent's index.
        d: Cohen's d of ``a`` against ``b`` (pooled SD; the rows taken as two samples).
        d_z: mean paired difference / its SD (``None`` when every difference is equal).
        p: two-sided paired sign-flip p-value of the mean difference.
        p_bh: ``p`` Benjamini-Hochberg-adjusted over the tested latents.
        ci: paired bootstrap interval of ``d`` (only on the first ``n_ci`` ranked latents).
    """

    feature: int
    d: float
    d_z: float | None
    p: float
    p_bh: float
    ci: stats.Interval | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; ``ci`` (as ``{estimate, low, high}``) only where computed."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "ci"}
        return out if self.ci is None else {**out, "ci": self.ci.as_dict()}


def paired_feature_tests(
    a: Float[Tensor, "n d_sae"],
    b: Float[Tensor, "n d_sae"],
    *,
    n_perm: int = 999,
    seed: int = 0,
    alpha: float = 0.05,
    n_ci: int = 0,
    n_boot: int = 1000,
) -> list[FeatureTest]:
    """Per latent that varies in ``a`` or ``b`` (paired rows: the same inputs under two
    models), Cohen's d, d_z and a paired sign-flip p-value (``n_perm`` flips, the same for
    every latent), BH-adjusted over those latents.

    Ranked BH-significant (``p_bh < alpha``) first, then by ``|d|`` descending: a latent
    firing on one row under one model has a large ``|d|`` but ``p = 1``. The first ``n_ci``
    get a paired bootstrap interval of ``d`` (``n_boot`` resamples of the row pairs).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must be paired [n, d_sae], got {tuple(a.shape)}, {b.shape}")
    if len(a) < 2:
        raise ValueError(f"paired_feature_tests needs >= 2 rows, got {len(a)}")
    diff = a.double() - b.double()
    alive = ((a.std(0) > 0) | (b.std(0) > 0)).nonzero().flatten().tolist()
    p = stats.sign_flip_columns(diff[:, alive], n_perm=n_perm, seed=seed).p_value.tolist()
    p_bh = stats.benjamini_hochberg(p).tolist() if alive else []
    rows = []
    for j, pj, qj in zip(alive, p, p_bh, strict=True):
        sd = float(diff[:, j].std())
        d_z = float(diff[:, j].mean()) / sd if sd > 0 else None
        rows.append(FeatureTest(j, stats.cohens_d(a[:, j], b[:, j]), d_z, pj, qj))
    rows.sort(key=lambda r: (r.p_bh >= alpha, -abs(r.d)))
    for i, r in enumerate(rows[:n_ci]):
        ci = stats.paired_bootstrap_ci(
            stats.cohens_d, a[:, r.feature], b[:, r.feature], n_boot=n_boot, seed=seed
        )
        rows[i] = dataclasses.replace(r, ci=ci)
    return rows


def top_rows(values: Float[Tensor, " n"], k: int) -> list[int]:
    """Indices of the ``k`` largest values, largest first, keeping only values > 0 (the
    rows on which a latent fires most)."""
    order = values.argsort(descending=True)[:k].tolist()
    return [i for i in order if values[i] > 0]


def top_row_means(
    z: Float[Tensor, "n d_sae"], emb: Float[Tensor, "n e"], k: int
) -> Float[Tensor, "d_sae e"]:
    """Per latent, the mean of ``emb`` over the (at most ``k``) rows with the largest
    positive activations in ``z``; a latent that never fires gets zeros."""
    if len(z) != len(emb):
        raise ValueError(f"z has {len(z)} rows, emb {len(emb)}")
    val, idx = z.topk(min(k, len(z)), dim=0)  # [k, d_sae]
    w = (val > 0).to(emb.dtype)[..., None]
    return (emb[idx] * w).sum(0) / w.sum(0).clamp_min(1.0)


@dataclasses.dataclass(frozen=True)
class FeatureClusters:
    """:func:`cluster_features`' result.

    Attributes:
        labels: each feature's cluster.
        centers: the k-means centres, ``[k, e]``.
        enrichment: per cluster, (share of ``member`` features in it) / (overall share).
        test: one-sided permutation test of the largest enrichment (kinds shuffled).
        silhouette: the silhouette score (``None`` when k is 1 or every point is a cluster).
    """

    labels: Int[Tensor, " n"]
    centers: Float[Tensor, "k e"]
    enrichment: Float[Tensor, " k"]
    test: stats.PermutationTest
    silhouette: float | None

    @property
    def k(self) -> int:
        return len(self.centers)


def cluster_features(
    vectors: Float[Tensor, "n e"],
    kinds: Sequence[str],
    member: str,
    n_clusters: int,
    *,
    n_perm: int = 999,
    seed: int = 0,
) -> FeatureClusters:
    """k-means (scikit-learn, ``n_init=10``, ``random_state=seed``) over feature vectors
    (e.g. :func:`top_row_means`, normalised), with ``k = max(1, min(n_clusters, n - 1))``,
    and ``stats.enrichment_test`` of the features whose kind is ``member``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if len(kinds) != len(vectors) or n_clusters < 1:
        raise ValueError(f"{len(kinds)} kinds for {len(vectors)} vectors; n_clusters >= 1")
    X = vectors.numpy()
    k = max(1, min(n_clusters, len(X) - 1))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(X)
    labels = torch.as_tensor(km.labels_, dtype=torch.long)
    is_member = torch.tensor([kd == member for kd in kinds])
    enrichment, test = stats.enrichment_test(labels, is_member, k, n_perm=n_perm, seed=seed)
    sil = float(silhouette_score(X, km.labels_)) if 1 < k < len(X) else None
    centers = torch.as_tensor(km.cluster_centers_, dtype=vectors.dtype)
    return FeatureClusters(labels, centers, enrichment, test, sil)

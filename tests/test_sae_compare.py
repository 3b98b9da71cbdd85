"""interp.sae.compare (paired per-feature tests between two models' codes, top rows and
their mean embeddings, k-means of features with an enrichment test, dense codes across
devices) and interp.sae.pooled.matched_ablation_nll, each against a naive reference or
planted data."""

from __future__ import annotations

import pytest
import torch
from jaxtyping import TypeCheckError

import interp
from interp import stats
from interp.runs import capture_dataset
from interp.sae import TopKSAE
from interp.sae.compare import (
    FeatureTest,
    cluster_features,
    dense_codes,
    paired_feature_tests,
    top_row_means,
    top_rows,
)
from interp.sae.pooled import ablation_nll, matched_ablation_nll, matched_features


def _codes(n: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired codes: column 0 shifted consistently, 1 noise only, 2 constant (dead), 3 a
    large shift, 4 fires on one row under one model only."""
    g = torch.Generator().manual_seed(seed)
    b = torch.rand(n, 5, generator=g) * 10
    b[:, 2], b[:, 4] = 0.0, 0.0
    a = b.clone()
    a[:, 0] += 0.3 + 0.1 * torch.randn(n, generator=g)
    a[:, 1] += 0.3 * torch.randn(n, generator=g)
    a[:, 3] += 8.0
    a[0, 4] = 5.0
    return a, b


def _bh(p: list[float]) -> list[float]:
    """Benjamini-Hochberg written out: q_(i) = min over j >= i of p_(j) m / j, capped at 1."""
    m, order = len(p), sorted(range(len(p)), key=lambda i: p[i])
    q = [0.0] * m
    for pos, i in enumerate(order):
        q[i] = min(1.0, min(p[order[j]] * m / (j + 1) for j in range(pos, m)))
    return q


def test_paired_feature_tests_match_a_naive_reference():
    a, b = _codes()
    rows = paired_feature_tests(a, b, n_perm=199, seed=3)
    assert sorted(r.feature for r in rows) == [0, 1, 3, 4]  # the dead column is not tested
    by = {r.feature: r for r in rows}
    p = []
    for j in (0, 1, 3, 4):
        diff = a[:, j].double() - b[:, j].double()
        na = nb = len(a)
        pooled = ((na - 1) * a[:, j].double().var() + (nb - 1) * b[:, j].double().var()) / (
            na + nb - 2
        )
        want_d = float((a[:, j].double().mean() - b[:, j].double().mean()) / pooled.sqrt())
        assert by[j].d == pytest.approx(want_d, rel=1e-9)
        want_dz = float(diff.mean() / diff.std()) if diff.std() > 0 else None
        assert by[j].d_z == (pytest.approx(want_dz, rel=1e-9) if want_dz is not None else None)
        flip = stats.sign_flip_test(a[:, j].double(), b[:, j].double(), n_perm=199, seed=3)
        assert by[j].p == pytest.approx(flip.p_value)  # the same flips for every column
        p.append(by[j].p)
    assert [by[j].p_bh for j in (0, 1, 3, 4)] == pytest.approx(_bh(p))
    assert all(r.ci is None for r in rows)


def test_paired_feature_tests_are_paired_and_ranked():
    """A small shift shared by every row under large between-row variation: the sign-flip
    test finds it though Cohen's d is small; ranked BH-significant first, then by |d|."""
    a, b = _codes(n=40)
    rows = paired_feature_tests(a, b, n_perm=999, seed=0)
    by = {r.feature: r for r in rows}
    assert abs(by[0].d) < 0.2 and by[0].p < 0.01 and by[0].d_z > 1
    assert by[1].p > 0.05 and by[4].p == 1  # one row under one model: large |d| but p = 1
    significant = [r.p_bh < 0.05 for r in rows]
    assert significant == sorted(significant, reverse=True)
    for group in (True, False):
        ds = [abs(r.d) for r, s in zip(rows, significant, strict=True) if s == group]
        assert ds == sorted(ds, reverse=True)
    assert [r.feature for r in rows][:2] == [3, 0]


def test_paired_feature_tests_intervals_on_the_first_n_ci():
    a, b = _codes()
    rows = paired_feature_tests(a, b, n_perm=99, seed=1, n_ci=2, n_boot=50)
    assert [r.ci is not None for r in rows] == [True, True, False, False]
    for r in rows[:2]:
        j = r.feature
        want = stats.paired_bootstrap_ci(stats.cohens_d, a[:, j], b[:, j], n_boot=50, seed=1)
        assert r.ci == want and r.ci.estimate == pytest.approx(r.d)
        assert r.as_dict()["ci"] == want.as_dict()
    assert "ci" not in rows[2].as_dict()
    assert list(FeatureTest(1, 0.5, None, 0.2, 0.4).as_dict()) == [
        "feature",
        "d",
        "d_z",
        "p",
        "p_bh",
    ]
    with pytest.raises(ValueError, match=">= 2 rows"):
        paired_feature_tests(a[:1], b[:1])


def test_top_rows_and_their_mean_embedding():
    z = torch.tensor([[0.0, 3.0, 0.0], [2.0, 1.0, 0.0], [5.0, 0.0, 0.0], [1.0, 4.0, 0.0]])
    emb = torch.arange(8.0).reshape(4, 2)
    assert top_rows(z[:, 0], 2) == [2, 1] and top_rows(z[:, 1], 5) == [3, 0, 1]
    assert top_rows(z[:, 2], 3) == []
    got = top_row_means(z, emb, 2)
    for j in range(3):  # naive: mean embedding over the top rows that fire
        rows = top_rows(z[:, j], 2)
        want = emb[rows].mean(0) if rows else torch.zeros(2)
        torch.testing.assert_close(got[j], want)
    torch.testing.assert_close(top_row_means(z, emb, 10)[0], emb[[1, 2, 3]].mean(0))
    with pytest.raises((ValueError, TypeCheckError)):  # beartype in tests, else ours
        top_row_means(z, emb[:3], 2)


def test_cluster_features_finds_planted_clusters_and_their_enrichment():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    truth = torch.arange(3).repeat_interleave(10)
    x = centres[truth] + 0.1 * torch.randn(30, 2, generator=g)
    kinds = ["delta" if t == 0 else "base" for t in truth.tolist()]
    km = cluster_features(x, kinds, "delta", 3, n_perm=199, seed=0)
    assert km.k == 3 and km.silhouette > 0.9
    for t in range(3):  # each planted cluster is one k-means cluster
        assert len(set(km.labels[truth == t].tolist())) == 1
    delta_cluster = int(km.labels[0])
    assert km.enrichment[delta_cluster] == pytest.approx(3.0)  # share 1 / overall 1/3
    assert km.enrichment.sum() == pytest.approx(3.0)  # the other two hold no delta feature
    assert km.test.statistic == pytest.approx(3.0) and km.test.p_value < 0.05
    torch.testing.assert_close(km.centers[delta_cluster], x[truth == 0].mean(0))
    tiny = cluster_features(
        x[[0, 10]], ["delta", "base"], "delta", 5, n_perm=9
    )  # k clamped to n - 1
    assert tiny.k == 1 and tiny.silhouette is None
    with pytest.raises(ValueError, match="kinds"):
        cluster_features(x, kinds[:5], "delta", 3)
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_features(x, kinds, "delta", 0)


def test_dense_codes_equal_encode_dense_without_autograd():
    sae = TopKSAE(8, 32, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    z = dense_codes(sae, x)
    assert not z.requires_grad and z.device == x.device and z.shape == (5, 32)
    torch.testing.assert_close(z, sae.encode_dense(x).detach())
    assert int((z != 0).sum(1).max()) <= 4


def test_matched_ablation_nll_is_the_tested_set_then_matched_random_sets():
    model = interp.tiny("llama", seed=0)
    texts = ["a short text", "another, longer text here", "and a third one", "a fourth"]
    hook = "blocks.1.hook_resid_post"
    rows = capture_dataset(model, texts, hook, pool="mean", progress=False)[hook]
    sae = TopKSAE(int(model.cfg.d_model), 64, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-zero biases: the input scale 2.0 does not cancel out
        sae.b_enc.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    z = sae.encode_dense(rows / 2.0).detach()
    rates = (z > 0).float().mean(0)
    tested = rates.nonzero().flatten()[:2].tolist()
    g = torch.Generator().manual_seed(5)
    e, sets = matched_ablation_nll(
        model,
        texts,
        hook,
        sae,
        tested,
        rates,
        2.0,
        n_random=3,
        n_bins=2,
        generator=g,
        progress=False,
    )
    g = torch.Generator().manual_seed(5)  # the same draws again
    want_sets = [matched_features(rates, tested, n_bins=2, generator=g) for _ in range(3)]
    assert sets == want_sets and e.shape == (4, 4)
    want = ablation_nll(model, texts, hook, sae, [tested, *want_sets], 2.0, progress=False)
    torch.testing.assert_close(e, want)
    assert e[:, 0].abs().max() > 0
    with pytest.raises(ValueError, match="n_random"):
        matched_ablation_nll(model, texts, hook, sae, tested, rates, n_random=0)

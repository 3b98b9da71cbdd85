"""Pure TopK SAE math: sparse kernels against dense references, losses, geometric median."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from interp.sae import functional as SF
from interp.sae.functional import (
    TopKActivations,
    auxk_loss,
    dense_decode,
    fvu,
    geometric_median,
    sparse_decode,
    topk_encode,
    topk_encode_dense,
)

pytestmark = pytest.mark.usefixtures("one_thread")


sizes = st.tuples(
    st.integers(1, 12),  # rows
    st.integers(2, 10),  # d_in
    st.integers(2, 24),  # d_sae
    st.integers(0, 2**16),  # seed
)


def _params(d_in: int, d_sae: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g, dtype=dtype)
    b_enc = torch.randn(d_sae, generator=g, dtype=dtype) * 0.5
    b_dec = torch.randn(d_in, generator=g, dtype=dtype)
    W_dec = torch.randn(d_sae, d_in, generator=g, dtype=dtype)
    return g, W_enc, b_enc, b_dec, W_dec


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@given(sizes, st.integers(1, 24))
def test_sparse_decode_matches_dense_values_and_grads(size, k):
    n, d_in, d_sae, seed = size
    k = min(k, d_sae)
    g, _, _, b_dec, W_dec = _params(d_in, d_sae, seed)
    # Distinct indices per row, as TopK produces.
    indices = torch.rand(n, d_sae, generator=g).argsort(dim=1)[:, :k]
    values = torch.randn(n, k, generator=g, dtype=torch.float64)
    upstream = torch.randn(n, d_in, generator=g, dtype=torch.float64)

    v1, W1, b1 = _leaves(values, W_dec, b_dec)
    out_sparse = sparse_decode(indices, v1, W1, b1)
    (out_sparse * upstream).sum().backward()

    v2, W2, b2 = _leaves(values, W_dec, b_dec)
    dense = torch.zeros(n, d_sae, dtype=torch.float64).scatter(1, indices, v2)
    out_dense = dense_decode(dense, W2, b2)
    (out_dense * upstream).sum().backward()

    torch.testing.assert_close(out_sparse, out_dense)
    torch.testing.assert_close(v1.grad, v2.grad)
    torch.testing.assert_close(W1.grad, W2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


def test_sparse_decode_backward_touches_only_selected_rows():
    _, _, _, _, W_dec = _params(5, 20, 0)
    W = W_dec.clone().requires_grad_(True)
    indices = torch.tensor([[1, 7], [7, 3]])
    values = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    sparse_decode(indices, values, W).pow(2).sum().backward()
    touched = W.grad.abs().sum(dim=1) != 0
    assert touched.nonzero().squeeze(1).tolist() == [1, 3, 7]


def test_sparse_decode_chunks_agree_with_single_chunk(monkeypatch):
    g, _, _, _, W_dec = _params(6, 30, 1)
    indices = torch.rand(50, 30, generator=g).argsort(dim=1)[:, :4]
    values = torch.rand(50, 4, generator=g, dtype=torch.float64)
    upstream = torch.randn(50, 6, generator=g, dtype=torch.float64)

    def run():
        v, W = _leaves(values, W_dec)
        (sparse_decode(indices, v, W) * upstream).sum().backward()
        return v.grad, W.grad

    full = run()
    monkeypatch.setattr(SF, "_CHUNK_ELEMENTS", 7 * 4 * 6)  # 7 rows per chunk, last one short
    chunked = run()
    torch.testing.assert_close(full, chunked)
    # The fallback for ATen's private gather-dot kernel gives the same gradients.
    monkeypatch.setattr(SF, "_rows_dot", SF._rows_dot_reference)
    torch.testing.assert_close(full, run())


@given(sizes, st.integers(1, 24))
def test_topk_encode_matches_dense_reference_values_and_grads(size, k):
    n, d_in, d_sae, seed = size
    k = min(k, d_sae)
    g, W_enc, b_enc, b_dec, W_dec = _params(d_in, d_sae, seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    upstream = torch.randn(n, d_in, generator=g, dtype=torch.float64)

    p1 = _leaves(x, W_enc, b_enc, b_dec, W_dec)
    acts = topk_encode(p1[0], p1[1], p1[2], p1[3], k)
    out1 = sparse_decode(acts.indices, acts.values, p1[4], p1[3])
    (out1 * upstream).sum().backward()

    p2 = _leaves(x, W_enc, b_enc, b_dec, W_dec)
    z = topk_encode_dense(p2[0], p2[1], p2[2], p2[3], k)
    out2 = dense_decode(z, p2[4], p2[3])
    (out2 * upstream).sum().backward()

    torch.testing.assert_close(acts.to_dense(d_sae), z)
    torch.testing.assert_close(out1, out2)
    for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec", "W_dec"), p1, p2, strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, name=name: f"grad {name}: {m}")


def test_encoder_backward_touches_only_selected_columns():
    g, W_enc, b_enc, b_dec, _ = _params(4, 16, 3)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    W = W_enc.clone().requires_grad_(True)
    acts = topk_encode(x, W, b_enc, b_dec, 2)
    acts.values.sum().backward()
    live = acts.indices[acts.values > 0].unique()
    touched = (W.grad.abs().sum(dim=0) != 0).nonzero().squeeze(1)
    assert touched.tolist() == sorted(live.tolist())


@given(sizes, st.integers(1, 24))
def test_topk_keeps_exactly_k_pairs_and_min_k_positive_nonzeros(size, k):
    n, d_in, d_sae, seed = size
    k = min(k, d_sae)
    g, W_enc, b_enc, b_dec, _ = _params(d_in, d_sae, seed, dtype=torch.float32)
    x = torch.randn(2, n, d_in, generator=g)  # leading [batch, pos] dims
    acts = topk_encode(x, W_enc, b_enc, b_dec, k)
    assert acts.indices.shape == acts.values.shape == (2, n, k)
    assert bool((acts.values >= 0).all())
    # Indices are distinct within a row.
    assert bool((acts.indices.sort(-1).values.diff(dim=-1) > 0).all())
    pre = SF.pre_activations(x, W_enc, b_enc, b_dec)
    expected = (pre > 0).sum(-1).clamp(max=k)
    assert torch.equal((acts.to_dense(d_sae) != 0).sum(-1), expected)


def test_topk_encode_rejects_bad_k():
    _, W_enc, b_enc, b_dec, _ = _params(3, 5, 0)
    with pytest.raises(ValueError, match="k must be in"):
        topk_encode(torch.zeros(1, 3, dtype=torch.float64), W_enc, b_enc, b_dec, 6)


def test_fvu_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64) * 3 + 5
    assert float(fvu(x, x)) == 0.0
    mean_pred = x.mean(0).expand_as(x)
    assert float(fvu(x, mean_pred)) == pytest.approx(1.0)
    x_hat = x + 0.1 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    ref = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert float(fvu(x, x_hat)) == pytest.approx(float(ref))


def test_fvu_all_reduce_shares_sum_to_global_fvu():
    # Two "ranks" hold halves of the batch; a fake all-reduce sums their contributions.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) + 2
    x_hat = x + 0.3 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    halves = [(x[:25], x_hat[:25]), (x[25:], x_hat[25:])]
    calls: list[int] = []

    def make_reduce(rank):
        def reduce(t):
            # The same quantity for both ranks, in the order fvu asks for them.
            i = calls.count(rank)
            calls.append(rank)
            if i == 0:
                return torch.tensor(40.0, dtype=t.dtype)
            if i == 1:
                return x.sum(0)
            return ((x - x.mean(0)) ** 2).sum()

        return reduce

    shares = [fvu(a, b, all_reduce=make_reduce(r)) for r, (a, b) in enumerate(halves)]
    assert float(sum(shares)) == pytest.approx(float(fvu(x, x_hat)))


def _auxk_reference(x, x_hat, pre, dead_mask, W_dec, k_aux):
    """Dense AuxK: top-k_aux of dead pre-activations, ReLU, decode without b_dec."""
    e = (x - x_hat).detach()
    masked = torch.where(dead_mask, pre, torch.tensor(-torch.inf, dtype=pre.dtype))
    k_sel = min(k_aux, int(dead_mask.sum()))
    top = masked.topk(k_sel, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    e_hat = z @ W_dec
    return ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()


@given(sizes, st.integers(1, 8), st.integers(1, 30))
def test_auxk_matches_dense_reference_and_is_zero_without_dead(size, k, k_aux):
    n, d_in, d_sae, seed = size
    n = max(n, 2)
    k = min(k, d_sae)
    g, W_enc, b_enc, b_dec, W_dec = _params(d_in, d_sae, seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    dead = torch.rand(d_sae, generator=g) < 0.5

    # No dead latents: exactly zero whatever the residual.
    acts, aux = SF._topk_encode_with_aux(
        x, W_enc, b_enc, b_dec, k, torch.zeros(d_sae, dtype=torch.bool), k_aux
    )
    x_hat = sparse_decode(acts.indices, acts.values, W_dec, b_dec)
    assert aux is None
    assert float(auxk_loss(x, x_hat, aux, W_dec)) == 0.0

    if not bool(dead.any()):
        return
    p1 = _leaves(W_enc, b_enc, W_dec)
    acts, aux = SF._topk_encode_with_aux(x, p1[0], p1[1], b_dec, k, dead, k_aux)
    assert aux is not None and aux.indices.shape[-1] == min(k_aux, int(dead.sum()))
    assert bool(dead[aux.indices].all())
    x_hat = sparse_decode(acts.indices, acts.values, p1[2], b_dec)
    loss1 = auxk_loss(x, x_hat, aux, p1[2])
    loss1.backward()

    p2 = _leaves(W_enc, b_enc, W_dec)
    pre = SF.pre_activations(x, p2[0], p2[1], b_dec)
    z = topk_encode_dense(x, p2[0], p2[1], b_dec, k)
    loss2 = _auxk_reference(x, dense_decode(z, p2[2], b_dec), pre, dead, p2[2], k_aux)
    loss2.backward()

    torch.testing.assert_close(loss1, loss2)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_geometric_median_is_optimal_and_robust():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(200, 5, generator=g, dtype=torch.float64)
    points[:10] += 100.0  # outliers drag the mean, not the median
    median = geometric_median(points, max_iter=500, tol=1e-12)
    # Optimality: the sum of unit vectors towards the points vanishes at the median.
    diff = points - median
    grad = (diff / diff.norm(dim=1, keepdim=True)).sum(0)
    assert float(grad.norm()) < 1e-4
    assert float(median.norm()) < 1.0 < float(points.mean(0).norm())
    # Collinear symmetric points: the median is the middle one.
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    torch.testing.assert_close(geometric_median(line), torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)


def test_topk_activations_to_dense():
    acts = TopKActivations(torch.tensor([[2, 0]]), torch.tensor([[3.0, 1.0]]))
    assert acts.to_dense(4).tolist() == [[1.0, 0.0, 3.0, 0.0]]


# ---- the fused encoder (_TopKEncode) on its own: values and all four input gradients ----


def _encode_chunk_rows(rows: int, d_sae: int):
    """Force the fused encoder to process ``rows`` rows per chunk (several chunks per batch)."""
    return patch.object(SF, "_ENCODE_CHUNK_ELEMENTS", rows * d_sae)


def _encoder_grads(leaves, loss):
    loss.backward()
    return [t.grad for t in leaves]


@given(sizes, st.integers(1, 24), st.integers(1, 5))
def test_fused_encoder_matches_dense_reference_values_and_grads(size, k, rows_per_chunk):
    n, d_in, d_sae, seed = size
    k = min(k, d_sae)
    g, W_enc, b_enc, b_dec, _ = _params(d_in, d_sae, seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    # Upstream gradient on the dense latents: the loss sees only the kept entries.
    upstream = torch.randn(n, d_sae, generator=g, dtype=torch.float64)

    p1 = _leaves(x, W_enc, b_enc, b_dec)
    with _encode_chunk_rows(rows_per_chunk, d_sae):
        acts = topk_encode(p1[0], p1[1], p1[2], p1[3], k)
    grads1 = _encoder_grads(p1, (acts.to_dense(d_sae) * upstream).sum())

    p2 = _leaves(x, W_enc, b_enc, b_dec)
    z = topk_encode_dense(p2[0], p2[1], p2[2], p2[3], k)
    grads2 = _encoder_grads(p2, (z * upstream).sum())

    torch.testing.assert_close(acts.to_dense(d_sae), z)
    for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec"), grads1, grads2, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad {name}: {m}")


def _check_against_same_selection(x, W_enc, b_enc, b_dec, k, upstream, rows_per_chunk=2):
    """Ours vs plain autograd through the *same* selected indices (robust to tie-breaking),
    plus: the selection is a valid top-k of the dense pre-activations."""
    d_sae = W_enc.shape[1]
    p1 = _leaves(x, W_enc, b_enc, b_dec)
    with _encode_chunk_rows(rows_per_chunk, d_sae):
        acts = topk_encode(p1[0], p1[1], p1[2], p1[3], k)
    grads1 = _encoder_grads(p1, (acts.values * upstream).sum())

    p2 = _leaves(x, W_enc, b_enc, b_dec)
    pre = SF.pre_activations(p2[0], p2[1], p2[2], p2[3])
    values_ref = pre.gather(1, acts.indices).relu()
    grads2 = _encoder_grads(p2, (values_ref * upstream).sum())

    torch.testing.assert_close(acts.values, values_ref.detach())
    # Valid top-k: every kept pre-activation ≥ every dropped one, row by row.
    pre = pre.detach()
    kept = torch.zeros_like(pre, dtype=torch.bool).scatter(1, acts.indices, True)
    if k < d_sae:
        lowest_kept = torch.where(kept, pre, torch.inf).amin(1)
        highest_dropped = torch.where(kept, -torch.inf, pre).amax(1)
        assert bool((lowest_kept >= highest_dropped).all())
    # Same multiset of values as the dense reference.
    torch.testing.assert_close(
        acts.values.sort(1).values, pre.topk(k, dim=1).values.relu().sort(1).values
    )
    for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec"), grads1, grads2, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad {name}: {m}")
    return acts, grads1


def test_fused_encoder_exact_ties():
    # Rows with x == b_dec have pre-activations exactly b_enc, which has tied values; the
    # other rows are generic. k = 2 must pick two of the three tied maxima.
    g, W_enc, _, b_dec, _ = _params(5, 12, 7)
    b_enc = torch.tensor([0.5, 2.0, 2.0, -1.0, 2.0, 1.0, 1.0, 0.0, 0.0, -3.0, 1.0, 0.5])
    b_enc = b_enc.double()
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    x[[0, 3, 4]] = b_dec
    upstream = torch.randn(7, 4, generator=g, dtype=torch.float64)
    for k in (2, 3, 4):
        acts, _ = _check_against_same_selection(x, W_enc, b_enc, b_dec, k, upstream[:, :k])
        top = min(k, 3)
        assert set(acts.indices[[0, 3, 4], :top].flatten().tolist()) <= {1, 2, 4}
        assert bool((acts.values[[0, 3, 4], :top] == 2.0).all())


def test_fused_encoder_zeros_and_fewer_than_k_positive():
    g, W_enc, _, b_dec, _ = _params(6, 10, 11)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    upstream = torch.randn(9, 4, generator=g, dtype=torch.float64)
    # All pre-activations negative: every kept value is 0 and no gradient flows anywhere.
    b_enc = torch.full((10,), -100.0, dtype=torch.float64)
    acts, grads = _check_against_same_selection(x, W_enc, b_enc, b_dec, 4, upstream)
    assert bool((acts.values == 0).all())
    assert all(bool((gr == 0).all()) for gr in grads)
    # Exactly zero pre-activations (x == b_dec, b_enc == 0): ReLU'(0) = 0 on both paths.
    zeros = b_dec.expand(9, 6).clone()
    acts, grads = _check_against_same_selection(
        zeros, W_enc, torch.zeros(10, dtype=torch.float64), b_dec, 4, upstream
    )
    assert bool((acts.values == 0).all())
    # Only one or two positive pre-activations per row: the rest of the k slots are 0.
    b_enc = torch.full((10,), -100.0, dtype=torch.float64)
    b_enc[[2, 7]] = 200.0
    acts, _ = _check_against_same_selection(x, W_enc, b_enc, b_dec, 4, upstream)
    assert bool(((acts.values > 0).sum(1) == 2).all())
    assert bool((acts.indices[:, :2].sort(1).values == torch.tensor([2, 7])).all())


def test_fused_encoder_k_equals_d_sae_and_empty_batch():
    g, W_enc, b_enc, b_dec, _ = _params(4, 6, 2)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    upstream = torch.randn(5, 6, generator=g, dtype=torch.float64)
    _check_against_same_selection(x, W_enc, b_enc, b_dec, 6, upstream)
    empty = topk_encode(x[:0], W_enc, b_enc, b_dec, 3)
    assert empty.indices.shape == empty.values.shape == (0, 3)


@given(sizes, st.integers(1, 8), st.integers(1, 30), st.integers(1, 4))
def test_fused_encoder_chunks_give_same_topk_and_auxk(size, k, k_aux, rows_per_chunk):
    n, d_in, d_sae, seed = size
    k = min(k, d_sae)
    g, W_enc, b_enc, b_dec, _ = _params(d_in, d_sae, seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    dead = torch.rand(d_sae, generator=g) < 0.5
    # Upstream gradient per (row, latent), so AuxK's unsorted column order does not matter.
    upstream = torch.randn(n, d_sae, generator=g, dtype=torch.float64)

    def run(chunk_rows):
        p = _leaves(x, W_enc, b_enc, b_dec)
        with _encode_chunk_rows(chunk_rows, d_sae):
            acts, aux = SF._topk_encode_with_aux(p[0], p[1], p[2], p[3], k, dead, k_aux)
        pairs = [acts] if aux is None else [acts, aux]
        loss = sum((a.values * upstream.gather(1, a.indices)).sum() for a in pairs)
        grads = _encoder_grads(p, loss)
        return acts, aux, grads

    one = run(max(n, 1))
    many = run(rows_per_chunk)
    assert torch.equal(one[0].indices, many[0].indices)
    # A one-row GEMM may round differently from a many-row one: equal up to rounding.
    torch.testing.assert_close(one[0].values, many[0].values)
    if one[1] is None:
        assert many[1] is None and not bool(dead.any())
    else:
        assert torch.equal(one[1].indices.sort(1).values, many[1].indices.sort(1).values)
        assert bool(dead[many[1].indices].all())
    for a, b in zip(one[2], many[2], strict=True):
        torch.testing.assert_close(a, b)


@given(
    st.integers(0, 12), st.integers(0, 6), st.integers(1, 9), st.integers(1, 20), st.integers(0, 99)
)
def test_scatter_rows_matches_one_hot_matmul(n, m, d, n_rows, seed):
    # Repeated indices within a row and never-selected output rows included.
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n_rows, (n, m), generator=g)
    weights = torch.randn(n, m, generator=g, dtype=torch.float64)
    vecs = torch.randn(n, d, generator=g, dtype=torch.float64)
    one_hot = torch.zeros(n, m, n_rows, dtype=torch.float64)
    one_hot.scatter_(2, indices[..., None], weights[..., None])
    expected = one_hot.sum(1).t() @ vecs
    torch.testing.assert_close(SF._scatter_rows(indices, weights, vecs, n_rows), expected)


@given(
    st.integers(1, 6),  # rows
    st.integers(1, 5),  # k
    st.integers(2, 4),  # group size
    st.integers(0, 6),  # extra groups
    st.booleans(),  # many exact ties
    st.integers(0, 999),
)
def test_two_stage_topk_matches_torch_topk(rows, k, group, extra, ties, seed):
    d = group * (4 * k + extra)
    g = torch.Generator().manual_seed(seed)
    if ties:
        pre = torch.randint(-2, 3, (rows, d), generator=g).double()
    else:
        pre = torch.randn(rows, d, generator=g, dtype=torch.float64)
    with patch.object(SF, "_TOPK_GROUP", group):
        values, indices = SF._topk_rows(pre, k)
    expected = pre.topk(k, dim=-1, sorted=True).values
    assert torch.equal(values, expected)  # same numbers, sorted descending
    assert torch.equal(pre.gather(1, indices), values)  # indices point at them
    assert bool((indices.sort(1).values.diff(dim=1) > 0).all())  # distinct per row


def test_fused_encoder_two_stage_topk_matches_dense_reference():
    # Wide enough for the two-stage TopK (d_sae ≥ 4·k·G) with a small group; generic
    # values, then exact ties (rows with x == b_dec, tied b_enc).
    g, W_enc, _, b_dec, _ = _params(6, 48, 5)
    b_enc = torch.randn(48, generator=g, dtype=torch.float64)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    upstream = torch.randn(10, 48, generator=g, dtype=torch.float64)
    with patch.object(SF, "_TOPK_GROUP", 2):
        p1 = _leaves(x, W_enc, b_enc, b_dec)
        with _encode_chunk_rows(3, 48):
            acts = topk_encode(p1[0], p1[1], p1[2], p1[3], 5)
        grads1 = _encoder_grads(p1, (acts.to_dense(48) * upstream).sum())
        p2 = _leaves(x, W_enc, b_enc, b_dec)
        z = topk_encode_dense(p2[0], p2[1], p2[2], p2[3], 5)
        grads2 = _encoder_grads(p2, (z * upstream).sum())
        torch.testing.assert_close(acts.to_dense(48), z)
        for a, b in zip(grads1, grads2, strict=True):
            torch.testing.assert_close(a, b)

        tied = torch.tensor([3.0, 1.0, 3.0, 0.0] * 12, dtype=torch.float64)
        x[[1, 4]] = b_dec
        acts, _ = _check_against_same_selection(x, W_enc, tied, b_dec, 5, upstream[:, :5])
        assert bool((acts.values[[1, 4]] == 3.0).all())

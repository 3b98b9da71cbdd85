"""interp.stats additions for many-feature studies: ``sign_flip_columns`` (the per-column
sign-flip test, vectorised), ``control_contrast`` (a tested column against matched
controls on two row groups) and ``enrichment_test`` (over-representation in groups, with a
test of the largest)."""

from __future__ import annotations

import pytest
import torch

from interp import stats


def _codes(n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, m, generator=g) * (torch.rand(n, m, generator=g) < 0.3)
    b = torch.rand(n, m, generator=g) * (torch.rand(n, m, generator=g) < 0.3)
    b[:, :3] = a[:, :3]  # unchanged columns: p = 1
    b[:, 3:6] = a[:, 3:6] - 0.2  # a constant shift: every flip ties or falls below
    return a, b


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_sign_flip_columns_equals_sign_flip_test_on_every_column(alternative):
    a, b = _codes(24, 40, seed=0)
    got = stats.sign_flip_columns(
        a, b, n_perm=1500, alternative=alternative, seed=7, max_elements=5000
    )  # two permutation chunks, many column chunks
    for j in range(a.shape[1]):
        want = stats.sign_flip_test(a[:, j], b[:, j], n_perm=1500, alternative=alternative, seed=7)
        assert got.p_value[j].item() == want.p_value and got.n_extreme[j].item() == want.n_extreme
        assert got.statistic[j].item() == want.statistic
    assert got.resolution == 1 / 1501 and got.n_perm == 1500


def test_sign_flip_columns_finds_a_consistent_shift_and_no_shift():
    a, b = _codes(30, 8, seed=1)
    t = stats.sign_flip_columns(a, b, n_perm=999, seed=0)
    assert torch.all(t.p_value[:3] == 1.0)  # identical columns
    assert torch.all(t.p_value[3:6] == 1 / 1000)  # the shift on every row
    diff = stats.sign_flip_columns(a - b, n_perm=999, seed=0)  # b=None: a holds differences
    assert torch.equal(diff.p_value, t.p_value)


def test_sign_flip_columns_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        stats.sign_flip_columns(torch.tensor([[float("nan")], [1.0]]))
    with pytest.raises(ValueError, match="n_perm"):
        stats.sign_flip_columns(torch.zeros(5, 2), n_perm=0)


def _gap(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.mean(0) - y.mean(0)


def test_control_contrast_by_hand():
    g = torch.Generator().manual_seed(0)
    effects = torch.randn(40, 11, generator=g) * 0.1
    a, b = list(range(20)), list(range(20, 40))
    effects[a, 0] += 1.0  # only the tested column separates the groups
    r = stats.control_contrast(effects, a, b, _gap, n_boot=200, n_perm=199, seed=0)
    per = effects[a].mean(0) - effects[b].mean(0)
    torch.testing.assert_close(r.per_column, per)
    assert r.contrast.estimate == pytest.approx(float(per[0] - per[1:].mean()))
    assert 0 < r.contrast.low < r.contrast.estimate < r.contrast.high
    assert r.p_permutation == 1 / 200 and r.p_rank == 1 / 11  # the best possible of each

    null = stats.control_contrast(effects[:, 1:], a, b, _gap, n_boot=50, n_perm=199, seed=0)
    assert null.p_permutation > 0.05 and null.contrast.low < 0 < null.contrast.high
    with pytest.raises(ValueError, match="1 \\+ n_controls"):
        stats.control_contrast(effects[:, :1], a, b, _gap)
    with pytest.raises(ValueError, match="non-empty"):
        stats.control_contrast(effects, a, [], _gap)


def test_enrichment_test_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2] * 3)
    member = torch.tensor([True, True, True, True] + [False] * 8).repeat(3)
    enrichment, test = stats.enrichment_test(labels, member, 4, n_perm=499, seed=0)
    # members: a third of all items, all of cluster 0 -> 3x; none elsewhere; cluster 3 empty
    torch.testing.assert_close(enrichment, torch.tensor([3.0, 0.0, 0.0, 0.0]))
    assert test.statistic == pytest.approx(3.0) and test.p_value < 0.01
    spread = torch.tensor([True, False, False, False] * 9)  # one member per 4 items: no cluster
    enrichment, test = stats.enrichment_test(labels, spread, n_perm=499, seed=0)
    assert enrichment.shape == (3,) and test.p_value > 0.05
    with pytest.raises(ValueError, match="both"):
        stats.enrichment_test(labels, torch.ones_like(member))

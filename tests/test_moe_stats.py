"""interp.moe.stats and RoutingTrace bookkeeping, on synthetic traces with planted routing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interp.moe import (
    RoutingTrace,
    expert_interval,
    gate_mass,
    length_match,
    rank_experts,
    risk_difference,
    selection_frequency,
)

pytestmark = pytest.mark.usefixtures("one_thread")


L, E, K = 3, 6, 2
LAYERS = (1, 2, 3)  # decoder indices of the MoE layers (layer 0 dense, as in DeepSeek)


def make_trace(
    lengths,
    seed=0,
    force=(),
    forbid=(),
    late_force=None,
):
    """Random distinct top-k routing; ``force``/``forbid`` (layer_row, expert) planted on every
    token; ``late_force=(row, expert, start)`` plants only from position ``start`` on."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths)
    n = int(lengths.sum())
    idx = torch.stack([torch.rand(n, E, generator=gen).argsort(-1)[:, :K] for _ in range(L)])
    positions = torch.cat([torch.arange(int(m)) for m in lengths]) if n else torch.zeros(0).long()
    for row, e in forbid:
        for slot in range(K):
            bad = idx[row, :, slot] == e
            # Replace by the smallest expert id not already selected and not e.
            for t in bad.nonzero().flatten().tolist():
                free = [j for j in range(E) if j != e and j not in idx[row, t].tolist()]
                idx[row, t, slot] = free[0]
    planted = list(force)
    if late_force is not None:
        planted.append(late_force)
    for item in planted:
        row, e = item[0], item[1]
        start = item[2] if len(item) == 3 else 0
        for t in range(n):
            if positions[t] >= start and e not in idx[row, t].tolist():
                idx[row, t, 0] = e
    weights = torch.rand(L, n, K, generator=gen)
    weights = weights / weights.sum(-1, keepdim=True)
    return RoutingTrace(
        layers=LAYERS,
        n_experts=E,
        indices=idx.to(torch.int8),
        weights=weights.half(),
        lengths=lengths,
        positions=positions,
        logits=torch.randn(L, n, E, generator=gen).half(),
    )


def naive_rates(trace: RoutingTrace, mass: bool = False) -> torch.Tensor:
    out = torch.zeros(L, E, dtype=torch.float64)
    for r in range(L):
        for t in range(trace.n_tokens):
            for s in range(K):
                e = int(trace.indices[r, t, s])
                out[r, e] += float(trace.weights[r, t, s]) if mass else 1.0
    return out / trace.n_tokens


# --- RoutingTrace bookkeeping --------------------------------------------------


def test_trace_validates_its_fields():
    t = make_trace([3, 2])
    with pytest.raises(ValueError, match="lengths sum"):
        RoutingTrace(LAYERS, E, t.indices, t.weights, torch.tensor([3, 3]), t.positions)
    with pytest.raises(ValueError, match="layers"):
        RoutingTrace((1, 2), E, t.indices, t.weights, t.lengths, t.positions)


def test_frequency_and_mass_match_naive_loops():
    t = make_trace([5, 1, 7, 3], seed=1)
    freq, mass = selection_frequency(t), gate_mass(t)
    torch.testing.assert_close(freq, naive_rates(t))
    torch.testing.assert_close(mass, naive_rates(t, mass=True))
    torch.testing.assert_close(freq.sum(-1), torch.full((L,), float(K), dtype=torch.float64))
    torch.testing.assert_close(mass.sum(-1), torch.ones(L, dtype=torch.float64), atol=1e-3, rtol=0)


def test_counts_are_per_example():
    t = make_trace([4, 0, 2], seed=2)
    counts = t.counts()
    assert counts.shape == (3, L, E)
    assert counts[1].sum() == 0  # empty example
    assert torch.equal(counts[0].sum(-1), torch.full((L,), 4.0 * K, dtype=torch.float64))
    sel = t.selected()
    assert torch.equal(counts[2], sel[:, 4:6].sum(1).double())


def test_select_and_truncate_keep_example_slices():
    t = make_trace([4, 2, 5], seed=3)
    s = t.select([2, 0, 2])
    assert s.lengths.tolist() == [5, 4, 5]
    assert torch.equal(s.indices[:, :5], t.indices[:, 6:11])
    assert torch.equal(s.indices[:, 5:9], t.indices[:, 0:4])
    assert torch.equal(s.logits[:, 9:], t.logits[:, 6:11])
    tr = t.truncate([3, 9, 0])
    assert tr.lengths.tolist() == [3, 2, 0]
    assert torch.equal(tr.indices, torch.cat([t.indices[:, 0:3], t.indices[:, 4:6]], 1))
    assert tr.positions.tolist() == [0, 1, 2, 0, 1]
    assert t.truncate(1).lengths.tolist() == [1, 1, 1]


def test_length_match_uses_pairwise_minimum():
    a, b = make_trace([4, 2, 5], seed=4), make_trace([3, 6, 5], seed=5)
    a2, b2 = length_match(a, b)
    assert a2.lengths.tolist() == b2.lengths.tolist() == [3, 2, 5]
    with pytest.raises(ValueError, match="pairs examples"):
        length_match(a, make_trace([1, 1], seed=0))


def test_save_load_roundtrip(tmp_path):
    t = make_trace([3, 4], seed=6)
    path = t.save(tmp_path / "trace.safetensors")
    u = RoutingTrace.load(path)
    assert u.layers == t.layers and u.n_experts == t.n_experts
    for f in ("indices", "weights", "lengths", "positions", "logits"):
        assert torch.equal(getattr(u, f), getattr(t, f)), f


# --- risk difference -----------------------------------------------------------


def test_planted_expert_ranks_first():
    # Condition 1 always routes layer-row 1 to expert 4; condition 2 never does.
    t1 = make_trace([6] * 12, seed=10, force=[(1, 4)])
    t2 = make_trace([6] * 12, seed=11, forbid=[(1, 4)])
    rd = risk_difference(t1, t2, n_boot=200)
    top = rd.rank("positive", top=1)[0]
    assert (top.layer, top.expert) == (LAYERS[1], 4)
    assert top.rd == 1.0 and top.p1 == 1.0 and top.p2 == 0.0
    assert top.low == top.high == 1.0  # no example-to-example variation
    assert rd.rank("abs")[0][:2] == (LAYERS[1], 4)
    # Reversed conditions: the same expert now tops the negative ranking.
    rev = risk_difference(t2, t1, n_boot=0)
    assert rev.rank("negative", top=1)[0][:2] == (LAYERS[1], 4)
    assert rev.low is None and math.isnan(rev.rank()[0].low)


def test_noisy_planted_expert_has_interval_above_zero_and_others_cover_zero():
    # Planted on 80% of condition-1 examples only; everything else is random.
    forced = [make_trace([5], seed=100 + i, force=[(0, 2)]) for i in range(16)]
    free = [make_trace([5], seed=200 + i, forbid=[(0, 2)]) for i in range(4)]
    t1 = _concat(forced[:12] + free[:4])
    t2 = _concat([make_trace([5], seed=300 + i, forbid=[(0, 2)]) for i in range(16)])
    rd = risk_difference(t1, t2, n_boot=500, seed=0)
    iv = rd.interval(LAYERS[0], 2)
    assert iv.low > 0.4 and iv.high <= 1.0
    assert rd.rank("abs", top=1)[0][:2] == (LAYERS[0], 2)
    # Layers without planting are pure noise: the interval contains 0 for almost all
    # experts (the planted layer's other experts absorb the displaced selections).
    others = [rd.interval(layer, e) for layer in LAYERS[1:] for e in range(E)]
    covered = sum(o.low <= 0 <= o.high for o in others)
    assert covered >= len(others) - 2


def _concat(traces):
    return RoutingTrace(
        layers=traces[0].layers,
        n_experts=traces[0].n_experts,
        indices=torch.cat([t.indices for t in traces], 1),
        weights=torch.cat([t.weights for t in traces], 1),
        lengths=torch.cat([t.lengths for t in traces]),
        positions=torch.cat([t.positions for t in traces]),
        logits=torch.cat([t.logits for t in traces], 1),
    )


def test_length_matching_removes_a_length_confound():
    # Expert 5 (row 2) is used from position 4 on in both conditions, but condition-1
    # completions are longer: without matching it looks condition-1 specific.
    t1 = make_trace([9] * 10, seed=20, forbid=[(2, 5)], late_force=(2, 5, 4))
    t2 = make_trace([4] * 10, seed=21, forbid=[(2, 5)], late_force=(2, 5, 4))
    raw = risk_difference(t1, t2, n_boot=0)
    matched = risk_difference(t1, t2, n_boot=0, length_matched=True)
    assert raw.interval(LAYERS[2], 5).estimate > 0.5
    assert matched.interval(LAYERS[2], 5).estimate == 0.0
    assert matched.n_tokens == (40, 40)


def test_mass_variant_uses_gate_weights():
    t1 = make_trace([5] * 6, seed=30)
    t2 = make_trace([5] * 6, seed=31)
    rd = risk_difference(t1, t2, measure="mass", n_boot=0)
    torch.testing.assert_close(rd.rd, naive_rates(t1, True) - naive_rates(t2, True))
    with pytest.raises((ValueError, TypeError), match="measure"):
        risk_difference(t1, t2, measure="odds", n_boot=0)


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("measure", ["selection", "mass"])
def test_vectorised_bootstrap_matches_interp_stats_reference(paired, measure):
    t1 = make_trace([3, 7, 2, 5, 6, 4, 1, 8], seed=40)
    t2 = make_trace([5, 2, 6, 3, 4, 4, 2, 7] if paired else [4, 4, 6, 2, 9], seed=41)
    rd = risk_difference(t1, t2, measure=measure, paired=paired, n_boot=300, seed=7)
    for layer, e in [(1, 0), (2, 3), (3, 5)]:
        ref = expert_interval(t1, t2, layer, e, measure=measure, paired=paired, n_boot=300, seed=7)
        got = rd.interval(layer, e)
        assert got.estimate == pytest.approx(ref.estimate, abs=1e-12)
        assert got.low == pytest.approx(ref.low, abs=1e-9)
        assert got.high == pytest.approx(ref.high, abs=1e-9)


def test_paired_requires_equal_example_counts():
    with pytest.raises(ValueError, match="paired=False"):
        risk_difference(make_trace([2, 2]), make_trace([2]), n_boot=10)
    rd = risk_difference(make_trace([2, 2]), make_trace([2]), paired=False, n_boot=10)
    assert rd.n_examples == (2, 1) and not rd.paired


def test_incompatible_traces_raise():
    a = make_trace([2])
    b = RoutingTrace((1, 2, 4), E, a.indices, a.weights, a.lengths, a.positions)
    with pytest.raises(ValueError, match="traces differ"):
        risk_difference(a, b, n_boot=0)


@settings(max_examples=15)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=2, max_size=6),
    seed=st.integers(0, 10_000),
)
def test_risk_difference_properties(lengths, seed):
    a = make_trace(lengths, seed=seed)
    b = make_trace(lengths, seed=seed + 1)
    ab = risk_difference(a, b, n_boot=50, seed=seed)
    ba = risk_difference(b, a, n_boot=50, seed=seed)
    torch.testing.assert_close(ab.rd, -ba.rd)
    torch.testing.assert_close(ab.low, -ba.high)  # same paired draws, mirrored
    assert (ab.rd.abs() <= 1).all()
    aa = risk_difference(a, a, n_boot=20)
    assert (aa.rd == 0).all() and (aa.low == 0).all() and (aa.high == 0).all()
    ranked = rank_experts(ab)
    assert len(ranked) == L * E
    assert [abs(s.rd) for s in ranked] == sorted((abs(s.rd) for s in ranked), reverse=True)

"""interp.moe.effects: report fields of a risk difference, random control sets with their match,
and steering × metric effects against baseline and controls with Holm / BH over the family."""

from __future__ import annotations

import random

import pytest
import torch
from jaxtyping import TypeCheckError

from interp import moe, stats


def _trace(gen, n, tokens, n_layers=2, E=6, k=2):
    lengths = torch.randint(1, tokens, (n,), generator=gen)
    T = int(lengths.sum())
    idx = torch.rand(n_layers, T, E, generator=gen).argsort(-1)[..., :k]
    weights = torch.rand(n_layers, T, k, generator=gen).half()
    return moe.RoutingTrace((1, 3), E, idx.to(torch.int8), weights, lengths, torch.zeros(T).long())


@pytest.fixture(scope="module")
def traces():
    gen = torch.Generator().manual_seed(0)
    return _trace(gen, 12, 8), _trace(gen, 12, 8)


def test_rd_summary(traces):
    t1, t2 = traces
    rd = moe.risk_difference(t1, t2, n_boot=50, seed=0)
    null = moe.max_abs_rd_test(t1, t2, n_perm=40, seed=1)
    out = moe.rd_summary(rd, null, top=3)
    naive = sum(
        1
        for r in range(rd.rd.shape[0])
        for e in range(rd.rd.shape[1])
        if rd.low[r, e] > 0 or rd.high[r, e] < 0
    )
    assert out["n_intervals_excluding_0_uncorrected"] == naive
    assert out["layers"] == (1, 3) and out["measure"] == "selection" and out["rd"] is rd.rd
    flat = sorted(rd.rd.flatten().tolist())
    assert [x.rd for x in out["top_positive"]] == pytest.approx(flat[::-1][:3])
    assert [x.rd for x in out["top_negative"]] == pytest.approx(flat[:3])
    sorted_null = sorted(null.null.tolist())  # linear interpolation at the 95th percentile
    pos = 0.95 * (len(sorted_null) - 1)
    lo = int(pos)
    q95 = sorted_null[lo] + (pos - lo) * (sorted_null[lo + 1] - sorted_null[lo])
    assert float(out["max_abs_rd_sign_flip"]["null_q95"]) == pytest.approx(q95)
    assert out["max_abs_rd_sign_flip"]["p_value"] == null.p_value
    bare = moe.rd_summary(moe.risk_difference(t1, t2, n_boot=0))
    assert bare["n_intervals_excluding_0_uncorrected"] is None
    assert "max_abs_rd_sign_flip" not in bare and len(bare["top_positive"]) <= 10
    with pytest.raises(ValueError, match="top"):
        moe.rd_summary(rd, top=0)


def test_control_sets_match_direct_draws(traces):
    t1, t2 = traces
    rd = moe.risk_difference(t1, t2, n_boot=0)
    freq = (moe.selection_frequency(t1) + moe.selection_frequency(t2)) / 2
    chosen = moe.top_experts(rd, "positive", 3, 4)
    sets = moe.control_sets(rd, chosen, freq, 6, random.Random(5), exclude_top=4)
    # The reference: the exclusion set by hand (top 4 by |Δ|, ties in (layer, expert) order).
    pairs = sorted(
        ((layer, e) for r, layer in enumerate(rd.layers) for e in range(rd.rd.shape[1])),
        key=lambda x: -abs(float(rd.rd[rd.layers.index(x[0]), x[1]])),
    )
    excluded = set(pairs[:4]) | set(chosen)
    rng = random.Random(5)
    ref = [moe.frequency_matched_experts(chosen, freq, rd.layers, excluded, rng) for _ in range(6)]
    assert sets.controls == ref and sets.experts == chosen
    for c in sets.controls:
        assert sorted(x[0] for x in c) == sorted(x[0] for x in chosen) and not set(c) & excluded
    f = {(layer, e): float(freq[r, e]) for r, layer in enumerate(rd.layers) for e in range(6)}
    flat = [x for c in ref for x in c]
    assert sets.freq_experts == pytest.approx(sum(f[x] for x in chosen) / len(chosen))
    assert sets.freq_controls == pytest.approx(sum(f[x] for x in flat) / len(flat))
    d = sets.as_dict()
    assert d["distinct_random_sets"] == len(set(map(tuple, ref)))
    assert d["controls_overlapping_targets"] == 0
    assert d["experts"] == chosen and d["random_controls"] == ref
    with pytest.raises(ValueError, match="at least one"):
        moe.control_sets(rd, [], freq, 2, random.Random(0), exclude_top=2)
    with pytest.raises(ValueError, match="n_random"):
        moe.control_sets(rd, chosen, freq, 0, random.Random(0), exclude_top=2)
    with pytest.raises(ValueError, match="shape"):
        moe.control_sets(rd, chosen, freq[:1], 2, random.Random(0), exclude_top=2)


def _naive_holm(p):
    m, order = len(p), sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _naive_bh(p):
    m, order = len(p), sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * m, 1.0
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        running = min(running, min(1.0, m * p[i] / (rank + 1)))
        out[i] = running
    return out


def test_effects_vs_controls_against_a_naive_reference():
    gen = torch.Generator().manual_seed(0)
    n = 40
    base = {
        "x": torch.randn(n, generator=gen).double(),
        "y": torch.randn(n, generator=gen).double(),
    }

    def noisy(shift_x=0.0):
        return {k: v + 0.1 * torch.randn(n, generator=gen).double() for k, v in base.items()} | {
            "x": base["x"] + shift_x + 0.1 * torch.randn(n, generator=gen).double()
        }

    steered = {"planted": noisy(1.0), "null": noisy()}
    controls = {"planted": [noisy() for _ in range(4)], "null": [noisy() for _ in range(3)]}
    out = moe.effects_vs_controls(base, steered, controls, n_boot=200, n_perm=300, seed=7)

    def diff(a, b):
        return float((a - b).mean())

    pvalues, family = [], []
    for i, name in enumerate(steered):
        for metric in base:
            st = steered[name][metric]
            ctrl = torch.stack([c[metric] for c in controls[name]])
            e = out[name][metric]
            ref_base = stats.paired_bootstrap_ci(diff, st, base[metric], n_boot=200, seed=7)
            ref_ctrl = stats.paired_bootstrap_ci(diff, st, ctrl.mean(0), n_boot=200, seed=7)
            assert e["steered_minus_baseline"] == ref_base.as_dict()
            assert e["steered_minus_controls"] == ref_ctrl.as_dict()
            effects = [float((c - base[metric]).mean()) for c in ctrl]
            assert e["control_effects"].tolist() == pytest.approx(effects)
            test = stats.sign_flip_test(st, ctrl.mean(0), n_perm=300, seed=7 + i)
            assert e["p_sign_flip"] == test.p_value
            beyond = sum(abs(x) >= abs(ref_base.estimate) - 1e-12 for x in effects)
            assert e["p_rank_among_random"] == pytest.approx((1 + beyond) / (len(effects) + 1))
            pvalues.append(test.p_value)
            family.append(e)
    for method, naive in (("holm", _naive_holm), ("bh", _naive_bh)):
        for e, p in zip(family, naive(pvalues), strict=True):
            assert e[f"p_{method}"] == pytest.approx(p)
            assert e[f"reject_{method}"] == (p <= 0.05)
    planted = out["planted"]["x"]  # a shift of 1 on every item, none in the controls
    assert planted["steered_minus_controls"]["estimate"] == pytest.approx(1.0, abs=0.1)
    assert planted["p_rank_among_random"] == pytest.approx(1 / 5) and planted["reject_holm"]
    assert not out["null"]["x"]["reject_holm"] and not out["planted"]["y"]["reject_holm"]


def test_effects_vs_controls_errors():
    base = {"x": torch.zeros(4, dtype=torch.float64)}
    one = {"x": torch.ones(4, dtype=torch.float64)}
    with pytest.raises(ValueError, match="controls for"):
        moe.effects_vs_controls(base, {"a": one}, {"b": [one]}, n_boot=10, n_perm=10)
    with pytest.raises(ValueError, match="no control sets"):
        moe.effects_vs_controls(base, {"a": one}, {"a": []}, n_boot=10, n_perm=10)
    short = {"x": torch.ones(3, dtype=torch.float64)}
    # beartype (on in the test run) may see the mismatch first; the function checks it too
    with pytest.raises((ValueError, TypeCheckError)):
        moe.effects_vs_controls(base, {"a": short}, {"a": [short]}, n_boot=10, n_perm=10)

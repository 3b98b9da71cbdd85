"""interp.moe.controls: batched routing traces, the max-|Δ| sign-flip null, the top experts
of one sign, and frequency-matched random expert sets."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import interp
from interp import moe


def _trace(gen, n, tokens, n_layers=2, E=4, k=2):
    lengths = torch.randint(1, tokens, (n,), generator=gen)
    T = int(lengths.sum())
    idx = torch.stack([torch.rand(n_layers, T, E, generator=gen).argsort(-1)[..., :k]]).squeeze(0)
    weights = torch.rand(n_layers, T, k, generator=gen).half()
    return moe.RoutingTrace((1, 3), E, idx.to(torch.int8), weights, lengths, torch.zeros(T).long())


@pytest.mark.parametrize("measure", ["selection", "mass"])
def test_max_abs_rd_null(measure):
    gen = torch.Generator().manual_seed(0)
    t1, t2 = _trace(gen, 8, 6), _trace(gen, 8, 6)
    test = moe.max_abs_rd_test(t1, t2, measure, n_perm=200, seed=0)
    rd = moe.risk_difference(t1, t2, measure=measure, n_boot=0)
    assert test.statistic == pytest.approx(float(rd.rd.abs().max()))
    assert test.null.min() >= 0 and 0 < test.p_value <= 1
    # Every null value is max |Δ| with some pairs' conditions swapped (all 2^3 patterns).
    a3, b3 = t1.select([0, 1, 2]), t2.select([0, 1, 2])
    small = moe.max_abs_rd_test(a3, b3, measure, n_perm=100, seed=0)
    ref = set()
    for flips in itertools.product([False, True], repeat=3):
        x = moe.concat([(b3 if f else a3).select([i]) for i, f in enumerate(flips)])
        y = moe.concat([(a3 if f else b3).select([i]) for i, f in enumerate(flips)])
        ref.add(
            round(float(moe.risk_difference(x, y, measure=measure, n_boot=0).rd.abs().max()), 5)
        )
    assert {round(float(v), 5) for v in small.null} <= ref and small.null.std() > 0
    # Swapping the conditions of every pair leaves max |Δ| unchanged.
    swapped = moe.max_abs_rd_test(t2, t1, measure, n_perm=10, seed=0)
    assert swapped.statistic == pytest.approx(test.statistic)


def test_frequency_matched_experts():
    freq = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.85, 0.15], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    chosen = [(3, 0)]
    excluded = {(3, 0), (3, 1)}
    seen = set()
    rng = random.Random(0)
    for _ in range(50):
        control = moe.frequency_matched_experts(chosen, freq, (3, 7), excluded, rng)
        assert len(control) == 1 and control[0][0] == 3 and control[0] not in excluded
        seen.add(control[0][1])
    # Candidates 2..5; the nearer half in frequency to expert 0 (0.9) are 4 (0.85) and 2 (0.8).
    assert seen == {2, 4}
    # A layer with nothing left outside `excluded` falls back to the other experts.
    two = moe.frequency_matched_experts(
        [(7, 0), (7, 1)], freq, (3, 7), {(7, e) for e in range(6)}, rng
    )
    assert len({e for _, e in two}) == 2 and all(e not in (0, 1) for _, e in two)


def test_max_abs_rd_null_needs_paired_traces():
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match="paired"):
        moe.max_abs_rd_test(_trace(gen, 4, 5), _trace(gen, 3, 5))


def _rd(values):
    rd = torch.tensor(values, dtype=torch.float64)
    nan = torch.full_like(rd, float("nan"))
    return moe.RiskDifference(
        layers=(1, 3),
        measure="selection",
        p1=rd.clamp(min=0),
        p2=(-rd).clamp(min=0),
        rd=rd,
        low=nan,
        high=nan,
        level=0.95,
        n_examples=(5, 5),
        n_tokens=(10, 10),
        paired=True,
    )


def test_top_experts_sign_count_and_cap():
    rd = _rd([[0.5, 0.4, -0.3, 0.0], [0.45, -0.2, 0.1, -0.6]])
    assert moe.top_experts(rd, "positive", 3, max_per_layer=2) == [(1, 0), (3, 0), (1, 1)]
    # At most one per layer: the rest of layers 1 and 3 is skipped, so fewer than n.
    assert moe.top_experts(rd, "positive", 3, max_per_layer=1) == [(1, 0), (3, 0)]
    # Strictly of that sign: a zero or the other sign is never picked, so fewer than n.
    assert moe.top_experts(rd, "negative", 10, max_per_layer=4) == [(3, 3), (1, 2), (3, 1)]


def test_trace_batches_equals_one_batch():
    model = interp.tiny("olmoe", seed=0)
    chats = [
        [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} now"}]
        for w in ("yes", "no thanks", "maybe later", "fine")
    ]
    whole = moe.trace(model, interp.chat.encode(model.tokenizer, chats), "assistant")
    parts = moe.trace_batches(model, chats, batch_size=3)
    assert parts.n_examples == 4 and torch.equal(parts.lengths, whole.lengths)
    assert torch.equal(parts.indices, whole.indices)
    with pytest.raises(ValueError, match="batch_size"):
        moe.trace_batches(model, chats, batch_size=0)

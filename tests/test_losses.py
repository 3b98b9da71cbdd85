"""KL span alignment and SFT cross-entropy against naive per-example references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from interp.losses import (
    kl_span_alignment,
    predicting_positions,
    sft_loss,
    span_log_distribution,
    span_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- references


def naive_kl_span(logits, mask_s, mask_o, *, direction="forward", temperature=1.0):
    """One example at a time, in float64, straight from the definition."""
    out = []
    for b in range(logits.shape[0]):
        lg = logits[b].double() / temperature
        p_s = torch.softmax(lg[mask_s[b]], dim=-1).mean(0)
        p_o = torch.softmax(lg[mask_o[b]], dim=-1).mean(0)
        p, q = (p_s, p_o) if direction == "forward" else (p_o, p_s)
        pairs = zip(p.tolist(), q.tolist(), strict=True)
        out.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in pairs if pi > 0))
    return torch.tensor(out, dtype=torch.float64)


def naive_sft(logits, input_ids, loss_mask):
    total, n = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            if loss_mask[b, t]:
                logp = torch.log_softmax(logits[b, t - 1].double(), -1)
                total -= logp[input_ids[b, t]].item()
                n += 1
    return total / n


# ---------------------------------------------------------------- strategies


@st.composite
def problems(draw, disjoint=False):
    """Random logits plus two non-empty span masks (optionally disjoint)."""
    batch = draw(st.integers(1, 3))
    pos = draw(st.integers(2, 7))
    vocab = draw(st.integers(2, 9))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, pos, vocab, generator=g) * scale
    mask_s = torch.zeros(batch, pos, dtype=torch.bool)
    mask_o = torch.zeros(batch, pos, dtype=torch.bool)
    for b in range(batch):
        i_s, i_o = draw(st.lists(st.integers(0, pos - 1), min_size=2, max_size=2, unique=True))
        mask_s[b, i_s] = True
        mask_o[b, i_o] = True
        for t in range(pos):
            label = draw(
                st.sampled_from(["s", "o", "none"] if disjoint else ["s", "o", "both", "none"])
            )
            if t in (i_s, i_o):
                continue
            mask_s[b, t] |= label in ("s", "both")
            mask_o[b, t] |= label in ("o", "both")
    return logits, mask_s, mask_o


temperatures = st.sampled_from([0.5, 1.0, 2.0])


# ---------------------------------------------------------------- properties


@given(problems(), temperatures, st.sampled_from(["forward", "reverse"]))
def test_matches_naive_per_example_loop(problem, temperature, direction):
    logits, mask_s, mask_o = problem
    got = kl_span_alignment(
        logits, mask_s, mask_o, direction=direction, temperature=temperature, reduction="none"
    )
    want = naive_kl_span(logits, mask_s, mask_o, direction=direction, temperature=temperature)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert (got >= 0).all()
    mean = kl_span_alignment(logits, mask_s, mask_o, direction=direction, temperature=temperature)
    torch.testing.assert_close(mean, got.mean())


@given(problems())
def test_reverse_is_forward_with_spans_swapped(problem):
    logits, mask_s, mask_o = problem
    rev = kl_span_alignment(logits, mask_s, mask_o, direction="reverse", reduction="none")
    fwd = kl_span_alignment(logits, mask_o, mask_s, reduction="none")
    torch.testing.assert_close(rev, fwd)


@given(problems())
def test_zero_when_span_distributions_are_equal(problem):
    logits, mask_s, _ = problem
    # Same span on both sides: exactly the same distribution.
    same = kl_span_alignment(logits, mask_s, mask_s, reduction="none")
    assert (same.abs() < 1e-6).all()
    # Different positions holding the same logits (in a different order).
    doubled = torch.cat([logits, logits.flip(1)], dim=1)
    mask_o = torch.cat([torch.zeros_like(mask_s), mask_s.flip(1)], dim=1)
    mask_s2 = torch.cat([mask_s, torch.zeros_like(mask_s)], dim=1)
    moved = kl_span_alignment(doubled, mask_s2, mask_o, reduction="none")
    assert (moved.abs() < 1e-5).all()


@given(problems(disjoint=True), st.sampled_from(["forward", "reverse"]))
def test_detached_anchor_gets_exactly_zero_gradient(problem, direction):
    logits, mask_s, mask_o = problem
    logits = logits.clone().requires_grad_(True)
    kl_span_alignment(logits, mask_s, mask_o, direction=direction).backward()
    grad = logits.grad
    assert (grad[~mask_s] == 0).all(), "gradient leaked outside the s span"
    # The gradient is not vacuous: s positions move unless the spans already agree.
    if kl_span_alignment(logits.detach(), mask_s, mask_o) > 1e-4:
        assert grad[mask_s].abs().sum() > 0


@given(problems(disjoint=True))
def test_without_detach_the_anchor_gets_gradient(problem):
    logits, mask_s, mask_o = problem
    logits = logits.clone().requires_grad_(True)
    loss = kl_span_alignment(logits, mask_s, mask_o, detach_o=False)
    loss.backward()
    if loss > 1e-3:
        assert logits.grad[mask_o].abs().sum() > 0
    assert (logits.grad[~(mask_s | mask_o)] == 0).all()


@given(problems())
def test_index_pairs_equal_their_masks(problem):
    logits, _, _ = problem
    batch, pos, _ = logits.shape
    g = torch.Generator().manual_seed(pos * 7 + batch)
    start = torch.randint(0, pos - 1, (batch,), generator=g)
    end = start + 1 + torch.randint(0, pos, (batch,), generator=g) % (pos - start)
    pairs_s = torch.stack([start, end], 1)
    pairs_o = torch.stack([torch.zeros_like(end), torch.full_like(end, pos)], 1)
    by_pairs = kl_span_alignment(logits, pairs_s, pairs_o, reduction="none")
    by_masks = kl_span_alignment(
        logits, span_mask(pairs_s, pos), span_mask(pairs_o, pos), reduction="none"
    )
    torch.testing.assert_close(by_pairs, by_masks)


def test_aggregation_is_mean_of_probabilities_not_of_logits():
    # Two one-hot-ish positions: the mixture puts half its mass on each token.
    logits = torch.tensor([[[20.0, -20.0], [-20.0, 20.0]]])
    log_p = span_log_distribution(logits, torch.tensor([[True, True]]))
    torch.testing.assert_close(log_p.exp(), torch.tensor([[0.5, 0.5]]))


def test_stable_with_extreme_and_masked_logits():
    logits = torch.tensor([[[1e4, -1e4, float("-inf")], [-1e4, 1e4, float("-inf")]]])
    logits.requires_grad_(True)
    loss = kl_span_alignment(logits, torch.tensor([[True, False]]), torch.tensor([[False, True]]))
    loss.backward()
    assert torch.isfinite(loss) and loss > 10
    assert torch.isfinite(logits.grad).all()
    half = kl_span_alignment(logits.detach().half(), torch.tensor([[0, 1]]), torch.tensor([[1, 2]]))
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_empty_span_names_the_example():
    logits = torch.zeros(3, 4, 5)
    s = torch.ones(3, 4, dtype=torch.bool)
    o = s.clone()
    o[1] = False
    with pytest.raises(ValueError, match=r"span_o is empty for example\(s\) \[1\]"):
        kl_span_alignment(logits, s, o)
    pairs = torch.tensor([[0, 2], [3, 3], [1, 4]])
    with pytest.raises(ValueError, match=r"span_s is empty for example\(s\) \[1\]"):
        kl_span_alignment(logits, pairs, o.fill_(True))
    with pytest.raises(ValueError, match=r"out of range"):
        kl_span_alignment(logits, torch.tensor([[0, 2], [0, 9], [0, 1]]), s)


def test_bad_arguments_are_rejected():
    logits = torch.zeros(1, 3, 4)
    m = torch.ones(1, 3, dtype=torch.bool)
    # Under the test-time type checker a bad Literal is a TypeError before our ValueError.
    with pytest.raises((ValueError, TypeError), match="direction"):
        kl_span_alignment(logits, m, m, direction="backward")
    with pytest.raises(ValueError, match="temperature"):
        kl_span_alignment(logits, m, m, temperature=0.0)
    with pytest.raises((ValueError, TypeError), match="reduction"):
        kl_span_alignment(logits, m, m, reduction="max")


def test_predicting_positions_shifts_left():
    mask = torch.tensor([[False, False, True, True], [True, False, False, True]])
    want = torch.tensor([[False, True, True, False], [False, False, True, False]])
    assert torch.equal(predicting_positions(mask), want)


# ---------------------------------------------------------------- SFT


@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(2, 7))
def test_sft_loss_matches_naive(seed, batch, pos):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, pos, 11, generator=g) * 3
    ids = torch.randint(0, 11, (batch, pos), generator=g)
    mask = torch.rand(batch, pos, generator=g) > 0.4
    mask[0, -1] = True
    got = sft_loss(logits, ids, mask)
    assert abs(got.item() - naive_sft(logits, ids, mask)) < 1e-4


def test_sft_loss_ignores_unmasked_tokens_and_position_zero():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 50.0  # predicts token 1 perfectly
    logits[0, 1, :] = float("nan")  # would poison the loss if it were not masked out
    ids = torch.tensor([[3, 2, 0]])
    loss = sft_loss(logits, ids, torch.tensor([[1, 1, 0]]))
    assert loss.item() < 1e-6
    with pytest.raises(ValueError, match="no target tokens"):
        sft_loss(logits, ids, torch.tensor([[1, 0, 0]]))

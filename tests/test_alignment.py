"""Gradient alignment and its random-direction and loss-matched controls."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from interp.alignment import (
    Alignment,
    compare_conditions,
    gradient_alignment,
    random_direction_null,
    select_loss_matched,
    select_loss_matched_prompt,
)
from interp.directions import Direction, random_directions


def unit_direction(n_layers: int, d_model: int, seed: int = 0, layers=None) -> Direction:
    v = random_directions(1, d_model, n_layers, seed)[0]
    return Direction.from_vectors(v, layers=layers)


# --- gradient_alignment -------------------------------------------------------------


def test_planted_aligned_opposite_and_orthogonal_gradients():
    d = unit_direction(2, 32)
    v = d.vectors
    ortho = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    ortho = ortho - (ortho * v).sum(-1, keepdim=True) * v  # remove the v component
    grads = torch.stack([3.0 * v, -0.5 * v, ortho])
    al = gradient_alignment(grads, torch.tensor([1.0, 2.0, 3.0]), d)
    assert al.cos[0].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert al.cos[1].tolist() == pytest.approx([-1.0, -1.0], abs=1e-6)
    assert al.cos[2].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert al.grad_norm[0].tolist() == pytest.approx([3.0, 3.0], abs=1e-5)
    assert al.dot[1].tolist() == pytest.approx([-0.5, -0.5], abs=1e-6)
    assert al.n == 3 and al.layers == (0, 1)


def test_alignment_matches_naive_reference():
    g = torch.Generator().manual_seed(2)
    grads = torch.randn(9, 3, 16, generator=g)
    d = unit_direction(3, 16, seed=3, layers=[1, 4, 7])
    al = gradient_alignment(grads, torch.rand(9, generator=g), d)
    for i in range(9):
        for col in range(3):
            gi, vi = grads[i, col].double(), d.vectors[col].double()
            assert math.isclose(al.grad_norm[i, col], gi.norm(), rel_tol=1e-9)
            assert math.isclose(al.dot[i, col], gi @ vi, rel_tol=1e-6, abs_tol=1e-9)
            assert math.isclose(al.cos[i, col], F.cosine_similarity(gi, vi, dim=0), abs_tol=1e-6)
    mean_unit = (grads.double() / grads.double().norm(dim=-1, keepdim=True)).mean(0)
    assert torch.allclose(al.mean_unit_grad, mean_unit)
    summary = al.summary()
    assert summary["layers"] == [1, 4, 7] and summary["n"] == 9
    assert summary["cos"] == pytest.approx(al.cos.mean(0).tolist())
    json.dumps(summary)  # JSON-ready


@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_cosine_is_invariant_to_gradient_scale(scale, seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(4, 2, 8, generator=g, dtype=torch.float64)
    d = unit_direction(2, 8, seed=seed)
    a = gradient_alignment(grads, torch.zeros(4, dtype=torch.float64), d)
    b = gradient_alignment(scale * grads, torch.zeros(4, dtype=torch.float64), d)
    assert torch.allclose(a.cos, b.cos, atol=1e-9)
    assert torch.allclose(b.dot, scale * a.dot, rtol=1e-9, atol=1e-12)
    assert torch.allclose(b.grad_norm, scale * a.grad_norm, rtol=1e-9)


def test_zero_gradient_has_cosine_zero_and_dicts_are_accepted():
    d = unit_direction(2, 8, layers=[3, 5])
    grads = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))
    grads[1] = 0
    al = gradient_alignment(grads, torch.zeros(3), d)
    assert torch.all(al.cos[1] == 0) and torch.all(al.grad_norm[1] == 0)
    from_dict = gradient_alignment(
        {"blocks.5.hook_resid_pre": grads[:, 1], "blocks.3.hook_resid_pre": grads[:, 0]},
        torch.zeros(3),
        d,
    )
    assert torch.allclose(from_dict.cos, al.cos)
    with pytest.raises(ValueError, match="3 gradients but 2 losses"):  # dicts skip jaxtyping
        gradient_alignment({3: grads[:, 0], 5: grads[:, 1]}, torch.zeros(2), d)
    with pytest.raises(ValueError, match="direction is"):
        gradient_alignment(grads[:, :1], torch.zeros(3), d)


# --- random-direction null -----------------------------------------------------------


def test_null_for_a_fixed_gradient_is_centred_with_inverse_sqrt_d_spread():
    d_model = 256
    g = torch.randn(1, 1, d_model, generator=torch.Generator().manual_seed(0))
    null = random_direction_null(g, n_directions=2000, generator=torch.Generator().manual_seed(1))
    assert null.n_directions == 2000 and null.mean_cos.shape == (2000, 1)
    assert abs(float(null.mean[0])) < 0.005  # sampling sd of the mean is 0.0014
    assert abs(float(null.std[0]) * math.sqrt(d_model) - 1) < 0.15
    # The 95% band of N(0, 1/d) is ±1.96/√d.
    assert float(null.low[0]) == pytest.approx(-1.96 / 16, rel=0.15)
    assert float(null.high[0]) == pytest.approx(1.96 / 16, rel=0.15)


def test_null_mean_cos_equals_explicit_cosines_with_regenerated_directions():
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(6, 2, 12, generator=gen)
    al = gradient_alignment(grads, torch.zeros(6), unit_direction(2, 12))
    null = random_direction_null(al, n_directions=100, generator=torch.Generator().manual_seed(9))
    dirs = null.directions()
    explicit = F.cosine_similarity(grads[None].double(), dirs[:, None].double(), dim=-1).mean(1)
    assert torch.allclose(null.mean_cos, explicit, atol=1e-5)
    # Same generator state, same band; an int seed is the same as a seeded generator.
    again = random_direction_null(al, n_directions=100, generator=9)
    assert torch.equal(again.mean_cos, null.mean_cos)
    other = random_direction_null(al, n_directions=100, generator=10)
    assert not torch.equal(other.mean_cos, null.mean_cos)
    summary = null.summary()
    assert summary["n_directions"] == 100 and len(summary["low"]) == 2
    json.dumps(summary)


def test_null_needs_enough_directions():
    with pytest.raises(ValueError, match="≥ 100"):
        random_direction_null(torch.randn(2, 1, 4), n_directions=50)


# --- compare_conditions ---------------------------------------------------------------


def conditions(n: int = 64, d_model: int = 64, seed: int = 0):
    """Condition a: gradients with a strong component along v. b: that component removed."""
    gen = torch.Generator().manual_seed(seed)
    d = unit_direction(2, d_model, seed=seed + 100, layers=[2, 6])
    noise = torch.randn(n, 2, d_model, generator=gen)
    noise = noise - (noise * d.vectors).sum(-1, keepdim=True) * d.vectors
    coeff = 4.0 + torch.rand(n, 2, 1, generator=gen)
    grads_a = noise + coeff * d.vectors
    loss_a = 2.0 + torch.rand(n, generator=gen)
    return d, grads_a, noise, loss_a


def test_rotation_away_from_the_direction_is_detected_and_outside_null():
    d, grads_a, grads_b, loss = conditions()
    a = gradient_alignment(grads_a, loss, d)
    b = gradient_alignment(grads_b, loss - 0.1, d)
    null = random_direction_null(a, n_directions=200, generator=0)
    cmp = compare_conditions(a, b, null, n_boot=200)
    assert cmp.layers == (2, 6) and cmp.paired
    for ci, outside, low, high, p in zip(
        cmp.delta_cos, cmp.outside_null, cmp.null_low, cmp.null_high, cmp.p_null, strict=True
    ):
        assert ci.high < -0.4  # mean cos fell from ~0.5 to 0
        assert ci.low <= ci.estimate <= ci.high
        assert outside and low < 0.2 and high > -0.2
        assert p == pytest.approx(1 / 201)
    assert cmp.delta_loss.estimate == pytest.approx(-0.1)
    json.dumps(cmp.summary())


def test_pure_gradient_shrinkage_is_not_a_rotation():
    """The trivial alternative: smaller gradients, same angles -> no cosine change."""
    d, grads_a, _, loss = conditions(seed=1)
    a = gradient_alignment(grads_a, loss, d)
    b = gradient_alignment(0.3 * grads_a, 0.5 * loss, d)
    cmp = compare_conditions(a, b, random_direction_null(a, generator=1), n_boot=100)
    for ci, outside, dot, norm in zip(
        cmp.delta_cos, cmp.outside_null, cmp.delta_dot, cmp.delta_grad_norm, strict=True
    ):
        assert abs(ci.estimate) < 1e-6 and abs(ci.low) < 1e-6 and abs(ci.high) < 1e-6
        assert not outside
        assert dot < -1.0 and norm < -1.0  # projections and norms shrank
    assert torch.allclose(cmp.null_delta, torch.zeros_like(cmp.null_delta), atol=1e-6)


def test_a_change_shared_by_random_directions_is_not_special():
    """If gradients rotate in a direction unrelated to v, v's small change is not outside the band."""
    gen = torch.Generator().manual_seed(5)
    d_model, n = 32, 80
    d = unit_direction(1, d_model, seed=6)
    base = torch.randn(n, 1, d_model, generator=gen)
    a = gradient_alignment(base, torch.zeros(n), d)
    b = gradient_alignment(
        base + 0.3 * torch.randn(n, 1, d_model, generator=gen), torch.zeros(n), d
    )
    cmp = compare_conditions(a, b, random_direction_null(a, generator=7), n_boot=100)
    assert not cmp.outside_null[0]
    assert cmp.p_null[0] > 0.05


def test_compare_checks_its_inputs():
    d, grads_a, grads_b, loss = conditions(n=10)
    a = gradient_alignment(grads_a, loss, d)
    b = gradient_alignment(grads_b[:8], loss[:8], d)
    null = random_direction_null(a)
    with pytest.raises(ValueError, match="paired=False"):
        compare_conditions(a, b, null)
    unpaired = compare_conditions(a, b, null, paired=False, n_boot=50)
    assert not unpaired.paired and unpaired.delta_cos[0].estimate < 0
    other_layers = random_direction_null(grads_a)  # raw gradients label layers 0..n-1
    with pytest.raises(ValueError, match="layers differ"):
        compare_conditions(a, a, other_layers)
    assert random_direction_null(grads_a, layers=[2, 6]).layers == (2, 6)


def test_alignment_result_is_validated():
    with pytest.raises(ValueError, match="layers"):
        Alignment(
            layers=(0,),
            loss=torch.zeros(2),
            grad_norm=torch.zeros(2, 2),
            dot=torch.zeros(2, 2),
            cos=torch.zeros(2, 2),
            mean_unit_grad=torch.zeros(2, 4),
        )


# --- loss-matched control ---------------------------------------------------------------


def test_select_loss_matched_picks_the_closest_mean():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(40, generator=gen) * 0.1
    candidates = {"far": noise + 3.0, "close": noise + 2.05, "near": noise + 1.8}
    best, table = select_loss_matched(candidates, float((noise + 2.0).mean()), n_boot=200)
    assert best == "close"
    assert [row.name for row in table] == ["close", "near", "far"]
    assert table[0].abs_diff == pytest.approx(0.05, abs=1e-6)
    for row in table:
        assert row.n == 40
        assert row.mean_loss.low <= row.mean_loss.estimate <= row.mean_loss.high
        assert row.diff.low <= row.diff.estimate <= row.diff.high
        assert row.abs_diff == pytest.approx(abs(row.diff.estimate))
    json.dumps([row.as_dict() for row in table])


def test_select_loss_matched_with_per_example_target_is_paired():
    gen = torch.Generator().manual_seed(1)
    per_example = torch.rand(50, generator=gen) * 4  # large between-example spread
    target = per_example + 0.01
    best, table = select_loss_matched(
        {"shifted": per_example + 0.5, "same": per_example}, target, n_boot=200
    )
    assert best == "same"
    row = table[0]
    # Paired: the difference is a constant -0.01, so its interval is (nearly) a point.
    assert row.diff.high - row.diff.low < 1e-6
    assert row.diff.estimate == pytest.approx(-0.01)
    # Unequal lengths fall back to an independent (wider) interval.
    _, loose = select_loss_matched({"same": per_example[:40]}, target, n_boot=200)
    assert loose[0].diff.high - loose[0].diff.low > 0.1
    with pytest.raises(ValueError, match="no candidates"):
        select_loss_matched({}, 1.0)


def test_select_loss_matched_prompt_uses_the_loss_callable():
    losses = {
        "INOCULATE": torch.tensor([1.0, 1.2, 1.4]),
        "be concise": torch.tensor([1.5, 1.6, 1.7]),
        "step by step": torch.tensor([1.1, 1.2, 1.3]),
    }
    calls: list[str] = []

    def loss_of(prompt: str) -> torch.Tensor:
        calls.append(prompt)
        return losses[prompt]

    best, table = select_loss_matched_prompt(
        loss_of, ["be concise", "step by step"], "INOCULATE", n_boot=50
    )
    assert best == "step by step" and len(table) == 2
    assert sorted(calls) == ["INOCULATE", "be concise", "step by step"]
    best, _ = select_loss_matched_prompt(
        loss_of, {"A": "be concise", "B": "step by step"}, 1.6, n_boot=50
    )
    assert best == "A"
    with pytest.raises(TypeError, match="not one string"):
        select_loss_matched_prompt(loss_of, "be concise", 1.0)

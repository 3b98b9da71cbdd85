"""Directions: planted recovery, invariances, projection, persistence, separation."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from interp.directions import (
    Direction,
    cosine,
    mean_difference,
    mean_over_tokens,
    project,
    random_directions,
    separation,
    stack_layers,
)

N_LAYERS, D_MODEL = 3, 64


def planted(n: int = 500, shift: float = 5.0, seed: int = 0):
    """Two classes that differ by ``shift`` along a known unit vector per layer."""
    g = torch.Generator().manual_seed(seed)
    v = random_directions(1, D_MODEL, N_LAYERS, g)[0]
    base = torch.randn(D_MODEL, generator=g) * 3  # a shared offset the difference must cancel
    a = base + torch.randn(n, N_LAYERS, D_MODEL, generator=g) + shift * v
    b = base + torch.randn(n, N_LAYERS, D_MODEL, generator=g)
    return a, b, v


def test_planted_direction_is_recovered():
    a, b, v = planted()
    d = mean_difference(a, b)
    assert d.layers == (0, 1, 2)
    assert d.hook_names == tuple(f"blocks.{i}.hook_resid_post" for i in range(N_LAYERS))
    assert torch.all(cosine(d.vectors, v) >= 0.99)
    # The raw norm is the size of the planted shift (up to sampling noise).
    assert torch.allclose(d.norms, torch.full((N_LAYERS,), 5.0), atol=0.3)
    assert torch.allclose(d.vectors.norm(dim=-1), torch.ones(N_LAYERS), atol=1e-5)
    assert d.meta == {"method": "mean_difference", "n_a": 500, "n_b": 500}


def test_recovery_fails_without_signal():
    """The recovery test can fail: with no planted shift the direction is noise."""
    a, b, v = planted(n=50, shift=0.0)
    assert torch.all(cosine(mean_difference(a, b).vectors, v).abs() < 0.6)


small_floats = st.floats(0.01, 100.0, allow_nan=False)


@given(scale=small_floats, offset=st.floats(-50, 50), seed=st.integers(0, 2**16))
def test_direction_invariant_to_scaling_and_shared_offset(scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(7, 2, 16, generator=g, dtype=torch.float64)
    b = torch.randn(5, 2, 16, generator=g, dtype=torch.float64) + 0.5
    ref = mean_difference(a, b)
    scaled = mean_difference(scale * a + offset, scale * b + offset)
    assert torch.allclose(scaled.vectors, ref.vectors, atol=1e-5)
    assert torch.allclose(scaled.norms, scale * ref.norms, rtol=1e-4)
    flipped = mean_difference(b, a)
    assert torch.allclose(flipped.vectors, -ref.vectors, atol=1e-6)


def test_dict_inputs_match_stacked_tensor():
    a, b, _ = planted(n=20)
    ref = mean_difference(a, b, layers=[4, 7, 9])
    by_layer = mean_difference(
        {layer: a[:, i] for i, layer in enumerate((4, 7, 9))},
        {layer: b[:, i] for i, layer in enumerate((4, 7, 9))},
    )
    names = [f"blocks.{layer}.hook_resid_pre" for layer in (9, 4, 7)]  # unsorted on purpose
    by_name = mean_difference(
        {name: a[:, i] for name, i in zip(names, (2, 0, 1), strict=True)},
        {name: b[:, i] for name, i in zip(names, (2, 0, 1), strict=True)},
    )
    for d in (by_layer, by_name):
        assert d.layers == (4, 7, 9)
        assert torch.allclose(d.vectors, ref.vectors)
    assert by_name.hook_names == (
        "blocks.4.hook_resid_pre",
        "blocks.7.hook_resid_pre",
        "blocks.9.hook_resid_pre",
    )
    subset = mean_difference(
        {i: a[:, i] for i in range(3)}, {i: b[:, i] for i in range(3)}, layers=[2, 0]
    )
    assert subset.layers == (2, 0)
    assert torch.allclose(subset.vectors, mean_difference(a, b).vectors[[2, 0]])


def test_bad_inputs_raise_clear_errors():
    a, b, _ = planted(n=4)
    with pytest.raises(ValueError, match="layer labels"):
        mean_difference(a, b, layers=[0, 1])
    with pytest.raises(KeyError, match="not in activations"):
        mean_difference({0: a[:, 0]}, {0: b[:, 0]}, layers=[0, 5])
    with pytest.raises(ValueError, match="layers"):
        mean_difference({0: a[:, 0]}, {1: b[:, 0]})
    with pytest.raises(KeyError, match="layer index"):
        stack_layers({"ln_final.hook_normalized": a[:, 0]})
    with pytest.raises(ValueError, match="at least one"):
        mean_difference(a[:0], b)
    with pytest.raises(ValueError, match="one hook per layer"):
        stack_layers({"blocks.1.hook_resid_pre": a[:, 0], "blocks.1.hook_resid_post": a[:, 1]})


def test_zero_difference_layer_stays_zero():
    a, b, _ = planted(n=10)
    b[:, 0] = a[:, 0]  # e.g. the embedding of the same token in both conditions
    d = mean_difference(a, b)
    assert float(d.norms[0]) == 0.0 and torch.all(d.vectors[0] == 0)
    assert torch.all(project(a, d)[:, 0] == 0)


def test_direction_validates_and_selects():
    raw = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    d = Direction.from_vectors(raw, layers=[5, 8])
    assert torch.allclose(d.vectors, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert torch.allclose(d.norms, torch.tensor([5.0, 2.0]))
    assert torch.allclose(d.raw, raw)
    assert torch.equal(d.vector(8), torch.tensor([0.0, 1.0]))
    sub = d.select([8])
    assert sub.layers == (8,) and sub.hook_names == ("blocks.8.hook_resid_post",)
    assert d.to(dtype=torch.float64).vectors.dtype == torch.float64
    assert "layers=[5, 8]" in repr(d)
    with pytest.raises(KeyError, match="layer 3"):
        d.vector(3)
    with pytest.raises(ValueError, match="unit length"):
        Direction(raw, torch.ones(2), (0, 1), ("a", "b"))
    with pytest.raises(ValueError, match="2 vectors but 1 layers"):
        Direction(d.vectors, d.norms, (0,), ("a", "b"))
    with pytest.raises(ValueError, match="unique"):
        Direction(d.vectors, d.norms, (1, 1), ("a", "b"))


def test_save_load_round_trip(tmp_path):
    a, b, _ = planted(n=30)
    d = mean_difference(a, b, layers=[2, 5, 11], hook="blocks.{layer}.hook_resid_pre")
    path = tmp_path / "trait.safetensors"
    d.save(str(path))
    Direction.from_vectors(torch.ones(1, 4)).save(tmp_path / "new" / "dir.safetensors")
    assert Direction.load(tmp_path / "new" / "dir.safetensors").d_model == 4
    loaded = Direction.load(path)
    assert torch.equal(loaded.vectors, d.vectors) and torch.equal(loaded.norms, d.norms)
    assert loaded.layers == d.layers and loaded.hook_names == d.hook_names
    assert loaded.meta == d.meta
    # Overwriting works and leaves no temporary files behind.
    Direction.from_vectors(torch.ones(1, 4)).save(path)
    assert Direction.load(path).layers == (0,)
    assert sorted(os.listdir(tmp_path)) == ["new", "trait.safetensors"]


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "d.safetensors"
    good = Direction.from_vectors(torch.ones(2, 4))
    good.save(path)
    bad = Direction.from_vectors(torch.ones(1, 4), meta={"oops": object()})
    with pytest.raises(TypeError, match="JSON"):
        bad.save(path)
    assert Direction.load(path).n_layers == 2
    assert os.listdir(tmp_path) == ["d.safetensors"]


def test_load_rejects_other_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an interp Direction"):
        Direction.load(path)


def test_mean_over_tokens_matches_loop():
    g = torch.Generator().manual_seed(3)
    acts = torch.randn(4, 6, 2, 5, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.5
    mask[:, 0] = True
    out = mean_over_tokens(acts, mask)
    expected = torch.stack([acts[i][mask[i]].mean(0) for i in range(4)])
    assert out.shape == (4, 2, 5)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(mean_over_tokens(acts, mask.long()), expected, atol=1e-6)
    mask[2] = False
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        mean_over_tokens(acts, mask)
    with pytest.raises(ValueError, match="0/1"):
        mean_over_tokens(acts, torch.full((4, 6), 2))


def test_project_matches_dot_products_and_accepts_dicts():
    a, b, _ = planted(n=8)
    d = mean_difference(a, b, layers=[3, 6, 9])
    p = project(a, d)
    assert p.shape == (8, 3)
    for i in range(3):
        assert torch.allclose(p[:, i], a[:, i] @ d.vectors[i], atol=1e-5)
    as_dict = {layer: a[:, i] for i, layer in enumerate(d.layers)} | {12: a[:, 0]}
    assert torch.allclose(project(as_dict, d), p)
    batched = project(a.reshape(2, 4, 3, D_MODEL), d)
    assert torch.allclose(batched.reshape(8, 3), p)
    with pytest.raises(ValueError, match="direction is"):
        project(a[:, :2], d)


@given(scale=small_floats, seed=st.integers(0, 2**16))
def test_cosine_bounded_and_scale_invariant(scale, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    c = cosine(x, y)
    assert torch.all(c.abs() <= 1 + 1e-6)
    assert torch.allclose(cosine(scale * x, y), c, atol=1e-5)
    assert torch.allclose(cosine(x, x), torch.ones(5), atol=1e-6)
    assert torch.allclose(cosine(x, -x), -torch.ones(5), atol=1e-6)


def test_cosine_known_values_broadcast_and_zero():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    c = cosine(x, torch.tensor([1.0, 0.0]))
    assert torch.allclose(c, torch.tensor([1.0, 1 / math.sqrt(2), 0.0]))


def test_random_directions_seeded_unit_and_spread():
    r = random_directions(500, 256, 2, torch.Generator().manual_seed(0))
    assert r.shape == (500, 2, 256)
    assert torch.allclose(r.norm(dim=-1), torch.ones(500, 2), atol=1e-5)
    assert torch.equal(r, random_directions(500, 256, 2, 0))
    assert not torch.equal(r, random_directions(500, 256, 2, 1))
    # Independent random unit vectors are nearly orthogonal: cos ~ N(0, 1/d).
    c = cosine(r[:, 0], r[:, 1])
    assert abs(float(c.mean())) < 0.01
    assert abs(float(c.std()) * 16 - 1) < 0.15
    with pytest.raises(ValueError):
        random_directions(0, 4, 1, 0)


def test_separation_on_separable_and_null_data():
    a, b, _ = planted(n=300, shift=5.0, seed=1)
    d = mean_difference(a[:150], b[:150])  # fit on one half …
    sep = separation(a[150:], b[150:], d, n_boot=200)  # … score the held-out half
    assert sep.layers == (0, 1, 2) and sep.n_pos == 150 and sep.n_neg == 150
    for ci in sep.auroc:
        assert ci.estimate > 0.99 and ci.low > 0.98
    for ci in sep.cohens_d:
        assert ci.low > 3.0 and ci.low <= ci.estimate <= ci.high
    summary = sep.summary()
    assert summary["auroc"][0]["estimate"] == sep.auroc[0].estimate

    x, y, _ = planted(n=300, shift=0.0, seed=2)
    null = separation(x[150:], y[150:], mean_difference(x[:150], y[:150]), n_boot=200)
    for ci in null.auroc:
        assert abs(ci.estimate - 0.5) < 0.1 and ci.low < 0.5 < ci.high
    for ci in null.cohens_d:
        assert ci.low < 0 < ci.high


def test_paired_separation_and_reproducibility():
    a, b, _ = planted(n=60, shift=1.0, seed=4)
    d = mean_difference(a[:30], b[:30])
    s1 = separation(a[30:], b[30:], d, paired=True, n_boot=100, seed=5)
    s2 = separation(
        a[30:, [2, 0]], b[30:, [2, 0]], d.select([2, 0]), paired=True, n_boot=100, seed=5
    )
    assert s1.paired
    assert s1.auroc[0] == s2.auroc[1] and s1.cohens_d[2] == s2.cohens_d[0]
    with pytest.raises(ValueError, match="paired"):
        separation(a[30:], b[31:], d, paired=True, n_boot=10)

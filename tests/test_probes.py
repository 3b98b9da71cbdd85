"""interp.probes: planted-direction recovery, per-layer sweep, folds, save/load, classify."""

from __future__ import annotations

import pytest
import torch

from interp.probes import (
    LinearProbe,
    classify,
    cross_val_proba,
    fit_probe,
    fit_probes,
    group_folds,
    probe_layers,
)
from interp.stats import auroc


def planted(n: int, d: int = 48, seed: int = 0, noise: float = 0.1):
    """Gaussian rows with a few huge-variance nuisance dims; label = sign(x·u + noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :3] *= 50.0  # residual-stream-like outlier dimensions, unrelated to the label
    u = torch.randn(d, generator=g)
    u[:3] = 0.0
    u = u / u.norm()
    y = (x @ u + noise * torch.randn(n, generator=g)) > 0
    return x, y, u


def test_recovers_planted_direction_on_held_out_data():
    x, y, u = planted(600)
    probe = fit_probe(x[:400], y[:400])
    p = probe.predict_proba(x[400:])
    test = y[400:]
    assert auroc(p[test], p[~test]) >= 0.95
    # The decision direction in raw space points along the planted one.
    assert float(probe.direction @ u) >= 0.9
    assert probe.meta["n_pos"] + probe.meta["n_neg"] == 400


def test_probe_layers_finds_the_informative_layer_and_keeps_groups_whole():
    x, y, _ = planted(240, seed=1)
    g = torch.Generator().manual_seed(2)
    noise_layer = torch.randn(240, 48, generator=g)
    acts = torch.stack([noise_layer, x, noise_layer * 3 + 1])
    groups = [i // 2 for i in range(240)]  # pairs, like two candidates per prompt
    scores = probe_layers(acts, y, groups, layers=[4, 7, 9], k=4, n_boot=100)
    by_layer = {s.layer: s for s in scores}
    assert by_layer[7].auroc.estimate >= 0.9
    assert by_layer[7].auroc.low <= by_layer[7].auroc.estimate <= by_layer[7].auroc.high
    assert abs(by_layer[4].auroc.estimate - 0.5) < 0.15
    assert by_layer[7].n_scored == 240 and by_layer[7].balanced_accuracy > 0.8

    folds = group_folds(groups, y, k=4, seed=0)
    seen = torch.cat(folds)
    assert sorted(seen.tolist()) == list(range(240))  # a partition
    for fold in folds:
        members = set(fold.tolist())
        assert all((2 * (i // 2)) in members and (2 * (i // 2) + 1) in members for i in members)


def test_save_load_round_trip_and_classify(tmp_path):
    x, y, _ = planted(200, seed=3)
    probe = fit_probes(x[None], y, layers=[5], meta={"positive": "safe"})[0]
    assert probe.meta["hook"] == "blocks.5.hook_resid_post" and probe.meta["positive"] == "safe"
    path = probe.save(tmp_path / "probe.safetensors")
    loaded = LinearProbe.load(path)
    assert loaded.meta == probe.meta
    assert loaded.bias == pytest.approx(probe.bias)
    torch.testing.assert_close(loaded.predict_proba(x), probe.predict_proba(x))

    result = classify(loaded, x[:20], threshold=0.3)
    assert result.proba.shape == (20,)
    assert torch.equal(result.label, result.proba >= 0.3)
    with pytest.raises(ValueError, match="threshold"):
        classify(loaded, x[:2], threshold=1.0)
    with pytest.raises(ValueError, match="features"):
        loaded.predict_proba(x[:2, :10])


def test_single_class_is_a_clear_error_and_cv_marks_unscorable_rows():
    x, _, _ = planted(20, seed=4)
    with pytest.raises(ValueError, match="both classes"):
        fit_probe(x, torch.ones(20, dtype=torch.bool))
    with pytest.raises(ValueError, match="0/1"):
        fit_probe(x, torch.full((20,), 2))
    # A fold whose training part is single-class leaves its rows unscored (NaN), no crash.
    y = torch.zeros(20, dtype=torch.long)
    y[[0, 1, 10, 11]] = 1
    folds = [torch.tensor([0, 1, 10, 11]), torch.arange(2, 10), torch.arange(12, 20)]
    proba = cross_val_proba(x, y, folds)
    assert proba[folds[0]].isnan().all()  # trained on negatives only
    assert not proba[2:10].isnan().any() and not proba[12:].isnan().any()


def test_fit_is_deterministic_and_int_labels_match_bool():
    x, y, _ = planted(120, seed=5)
    a = fit_probe(x, y)
    b = fit_probe(x, y.long())
    torch.testing.assert_close(a.weight, b.weight)
    assert a.bias == b.bias

"""interp.sae.pooled helpers for sentence-level SAEs: ``train_on_rows`` (a TopK SAE fitted
to rows held in memory, with the input scale pooled_splice takes) and ``ablation_nll``
(Δ NLL per text for each ablated latent set)."""

from __future__ import annotations

import math

import pytest
import torch

import interp
from interp.runs import capture_dataset, score
from interp.sae import SAETrainConfig, TopKSAE, evaluate, pooled_splice, train_on_rows
from interp.sae.pooled import ablation_nll


def test_train_on_rows_scales_rows_and_learns_them():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 16, generator=g)
    rows = (torch.rand(200, 6, generator=g) * (torch.rand(200, 6, generator=g) < 0.4)) @ basis
    rows = 50.0 * rows  # a model-sized scale
    cfg = SAETrainConfig(lr=3e-3, max_steps=300, warmup_steps=10, seed=3, progress=False)
    sae, scale, res = train_on_rows(rows, 24, 4, cfg, batch_size=32, hook_name="h")
    assert scale == pytest.approx(float(rows.norm(dim=1).mean()) / math.sqrt(16))
    assert isinstance(sae, TopKSAE) and sae.cfg.hook_name == "h" and res.steps == 300
    assert evaluate(sae, [rows / scale]).fvu < 0.2  # it learned the (scaled) rows
    again, _, _ = train_on_rows(rows, 24, 4, cfg, batch_size=32, seed=3)  # seed: config.seed
    assert torch.equal(again.W_enc, sae.W_enc)
    other, _, _ = train_on_rows(rows, 24, 4, cfg, batch_size=32, seed=4)
    assert not torch.equal(other.W_enc, sae.W_enc)
    with pytest.raises(ValueError, match="max_steps"):
        train_on_rows(rows, 24, 4, SAETrainConfig(), batch_size=8)


def test_ablation_nll_columns_are_the_hooked_scores_minus_the_clean_ones():
    model = interp.tiny("llama", seed=0)
    texts = ["a short text", "another, longer text here", "and a third one"]
    hook = "blocks.1.hook_resid_post"
    rows = capture_dataset(model, texts, hook, pool="mean", progress=False)[hook]
    sae = TopKSAE(int(model.cfg.d_model), 64, 4, generator=torch.Generator().manual_seed(0))
    fired = sae.encode(rows).indices
    sets = [[int(fired[0, 0])], [int(fired[1, 0]), int(fired[2, 1])], []]
    e = ablation_nll(model, texts, hook, sae, sets, progress=False)
    clean = score(model, texts, progress=False).nll
    specials = interp.runs.special_ids(model.tokenizer)
    for c, feats in enumerate(sets):
        with model.hooks(fwd=[(hook, pooled_splice(sae, feats, exclude_ids=specials))]):
            want = score(model, texts, progress=False).nll - clean
        torch.testing.assert_close(e[:, c], want)
    assert e.shape == (3, 3) and e[:, :2].abs().max() > 0 and torch.all(e[:, 2] == 0)
    torch.testing.assert_close(ablation_nll(model, texts, hook, sae, sets, baseline=clean), e)

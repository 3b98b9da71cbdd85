"""``interp.sae.splice`` inside a real forward pass (``interp.tiny("llama")``)."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.sae import TopKSAE, splice

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return interp.tiny("llama", seed=0)


@pytest.fixture(scope="module")
def batch(model):
    enc = model.tokenizer(["hello world", "a b c d e f"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def sae(model):
    d = int(model.cfg.d_model)
    sae = TopKSAE(d, 4 * d, 4, hook_name=HOOK, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.fill_(0.1)  # every token gets k positive latents
    return sae


def _logits(model, batch, fn=None):
    ids, mask = batch
    with torch.no_grad():
        if fn is None:
            return model(ids, mask)
        return model.run_with_hooks(ids, mask, fwd_hooks=[(HOOK, fn)])


def _activation(model, batch, fn=None):
    """The activation at HOOK as the next module sees it (after ``fn`` when given)."""
    seen = {}

    def record(x, hook=None):
        seen["x"] = x.detach().clone()
        return None

    ids, mask = batch
    hooks = [(HOOK, fn)] if fn is not None else []
    with torch.no_grad(), model.hooks(fwd=[*hooks, (HOOK, record)]):
        model(ids, mask)
    return seen["x"]


def test_keep_error_leaves_logits_unchanged(model, batch, sae):
    clean = _logits(model, batch)
    spliced = _logits(model, batch, splice(sae, keep_error=True))
    torch.testing.assert_close(spliced, clean)


def test_reconstruction_without_error_changes_logits(model, batch, sae):
    clean = _logits(model, batch)
    spliced = _logits(model, batch, splice(sae, keep_error=False))
    assert not torch.allclose(spliced, clean, atol=1e-4)


def test_ablation_subtracts_exactly_the_feature_decoder_contribution(model, batch, sae):
    x = _activation(model, batch)
    with torch.no_grad():
        latents = sae.encode(x)
        feature = int(latents.indices[0, 0, 0])  # a latent active on the first token
        dense = sae.encode_dense(x)[..., feature]  # [batch, pos] activation of that feature
    assert float(dense[0, 0]) > 0
    edited = _activation(model, batch, splice(sae, keep_error=True, ablate=[feature]))
    expected = x - dense[..., None] * sae.W_dec[feature].detach()
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    # Tokens where the feature is inactive are untouched, bit for bit.
    off = dense == 0
    assert bool(off.any())
    assert torch.equal(edited[off], x[off])
    # And the logits move.
    assert not torch.allclose(
        _logits(model, batch, splice(sae, keep_error=True, ablate=[feature])),
        _logits(model, batch),
        atol=1e-6,
    )

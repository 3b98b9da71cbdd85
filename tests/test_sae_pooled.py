"""interp.sae.pooled: editing through an SAE trained on pooled rows (the row mean becomes
exactly the SAE's keep-error edit of it; excluded tokens and padding untouched), and
firing-rate-matched control latents."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.positions import Batch, PositionError, running
from interp.sae import TopKSAE, matched_features, pooled_splice, splice


def _sae(d: int = 8, d_sae: int = 32, k: int = 4) -> TopKSAE:
    return TopKSAE(d, d_sae, k, generator=torch.Generator().manual_seed(0))


def _batch() -> Batch:
    ids = torch.tensor([[1, 5, 6, 7, 0], [1, 8, 9, 0, 0]])  # id 1 = BOS, 0 = padding
    return Batch(input_ids=ids, attention_mask=(torch.arange(5) < torch.tensor([[4], [3]])).long())


@pytest.mark.parametrize("input_scale", [1.0, 3.0])
def test_row_mean_becomes_the_keep_error_edit_of_the_pooled_vector(input_scale):
    sae, batch = _sae(), _batch()
    act = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)) * input_scale
    pooled = torch.stack([act[0, 1:4].mean(0), act[1, 1:3].mean(0)])  # BOS and padding out
    fired = sae.encode(pooled / input_scale).indices
    ablate = sorted({int(fired[0, 0]), int(fired[1, 1])})
    with running(batch):
        out = pooled_splice(sae, ablate, input_scale=input_scale, exclude_ids=[1])(act)
    want = splice(sae, keep_error=True, ablate=ablate)(pooled / input_scale) * input_scale
    got = torch.stack([out[0, 1:4].mean(0), out[1, 1:3].mean(0)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, pooled)  # the edit did something
    # one uniform shift per row over its pooled tokens
    torch.testing.assert_close(out[0, 1:4] - act[0, 1:4], (want - pooled)[0].expand(3, 8))
    for r, c in [(0, 0), (0, 4), (1, 0), (1, 3), (1, 4)]:  # BOS and padding untouched
        assert torch.equal(out[r, c], act[r, c])


def test_no_edit_is_the_identity_and_outside_a_run_it_raises():
    sae, act = _sae(), torch.randn(2, 5, 8)
    assert pooled_splice(sae)(act) is act
    with pytest.raises(PositionError, match="running batch"):
        pooled_splice(sae, [0])(act)
    with running(_batch()), pytest.raises(PositionError, match="does not match"):
        pooled_splice(sae, [0])(torch.randn(2, 4, 8))


def test_on_a_model_latents_that_never_fire_change_nothing():
    model = interp.tiny("llama", seed=0)
    texts = ["a short text", "another, longer text here"]
    hook = "blocks.1.hook_resid_post"
    specials = interp.runs.special_ids(model.tokenizer)
    rows = interp.runs.capture_dataset(model, texts, hook, pool="mean", progress=False)[hook]
    sae = _sae(d=int(model.cfg.d_model), d_sae=64, k=4)
    fired = set(sae.encode(rows).indices.flatten().tolist())
    silent = [j for j in range(64) if j not in fired][:5]
    clean = interp.runs.score(model, texts, progress=False).nll
    for feats, same in ((silent, True), (sorted(fired), False)):
        fn = pooled_splice(sae, feats, exclude_ids=specials)
        with model.hooks(fwd=[(hook, fn)]):
            nll = interp.runs.score(model, texts, progress=False).nll
        assert torch.equal(nll, clean) == same


def test_matched_features_come_from_the_tested_bins():
    rates = torch.cat([torch.full((23,), 0.01), torch.full((21,), 0.5), torch.zeros(10)])
    rates += torch.linspace(0, 1e-3, 54)  # distinct rates
    rates[44:] = 0.0  # dead latents are never drawn
    tested = [0, 1, 2, 23]  # three rare, one frequent: 20 free candidates in each half
    g = torch.Generator().manual_seed(0)
    draws = [matched_features(rates, tested, n_bins=2, generator=g) for _ in range(20)]
    for d in draws:
        assert len(d) == len(set(d)) == 4 and not set(d) & set(tested)
        assert sum(j < 23 for j in d) == 3 and sum(23 <= j < 44 for j in d) == 1
    assert len({tuple(d) for d in draws}) > 1  # random
    again = matched_features(rates, tested, n_bins=2, generator=torch.Generator().manual_seed(0))
    assert again == draws[0]


def test_matched_features_tops_up_a_thin_bin_and_raises_when_too_few():
    rates = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.9, 0.91, 0.92, 0.93])
    out = matched_features(rates, [0, 1, 2], n_bins=2, generator=torch.Generator().manual_seed(0))
    assert len(set(out)) == 3 and 3 in out  # the only free low-rate latent, then the nearest
    with pytest.raises(ValueError, match="cannot match"):
        matched_features(torch.tensor([0.5, 0.5, 0.0, 0.0]), [0, 2])

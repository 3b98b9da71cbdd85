"""Splicing hook: exact identity with the error term, ablation/scaling against a dense reference."""

from __future__ import annotations

import pytest
import torch

from interp.sae import TopKSAE, ce_loss_recovered, splice

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sae() -> TopKSAE:
    sae = TopKSAE(8, 24, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
        sae.b_enc.fill_(0.1)
    return sae


def _x(dtype=torch.float32):
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2)).to(dtype)


def _dense_reference(sae, x, factors, keep_error):
    """Edit dense latents, decode, and optionally add the error term."""
    z = sae.encode_dense(x.float())
    recon = z @ sae.W_dec + sae.b_dec
    edited = (z * factors) @ sae.W_dec + sae.b_dec
    return edited + (x.float() - recon) if keep_error else edited


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_error_without_edits_is_exact_identity(sae, dtype):
    x = _x(dtype)
    out = splice(sae, keep_error=True)(x, None)
    assert out.dtype == dtype and torch.equal(out, x)
    # Edits that change nothing (scale 1, a latent never selected) are exact too.
    unused = sorted(set(range(24)) - set(sae.encode(x).indices.unique().tolist()))
    assert unused, "fixture should leave some latent unused"
    out = splice(sae, keep_error=True, ablate=[unused[0]], scale={1: 1.0})(x, None)
    assert torch.equal(out, x)


def test_replacement_is_the_reconstruction(sae):
    x = _x()
    out = splice(sae)(x, None)
    assert out.shape == x.shape
    torch.testing.assert_close(out, sae(x).x_hat)
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("keep_error", [False, True])
def test_ablate_and_scale_match_dense_reference(sae, keep_error):
    x = _x()
    used = sae.encode(x).indices.flatten().bincount(minlength=24).argsort(descending=True)
    a, s = int(used[0]), int(used[1])
    factors = torch.ones(24)
    factors[a] = 0.0
    factors[s] = 2.5
    out = splice(sae, keep_error=keep_error, ablate=[a], scale={s: 2.5})(x, None)
    ref = _dense_reference(sae, x, factors, keep_error)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, _dense_reference(sae, x, torch.ones(24), keep_error))


def test_ablation_wins_over_scale_and_bad_ids(sae):
    x = _x()
    lat = int(sae.encode(x).indices[0, 0, 0])
    both = splice(sae, ablate=[lat], scale={lat: 3.0})(x, None)
    only = splice(sae, ablate=[lat])(x, None)
    torch.testing.assert_close(both, only)
    with pytest.raises(ValueError, match="out of range"):
        splice(sae, ablate=[24])
    with pytest.raises(TypeError, match="scale"):
        splice(sae, scale={"3": 2.0})


def test_splice_is_differentiable_wrt_activation(sae):
    x = _x().requires_grad_(True)
    lat = int(sae.encode(x).indices[0, 0, 0])
    splice(sae, keep_error=True, ablate=[lat])(x, None).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_ce_loss_recovered():
    assert ce_loss_recovered(2.0, 2.0, 6.0) == 1.0
    assert ce_loss_recovered(2.0, 6.0, 6.0) == 0.0
    assert ce_loss_recovered(
        torch.tensor(2.0), torch.tensor(3.0), torch.tensor(6.0)
    ) == pytest.approx(0.75)
    assert ce_loss_recovered(2.0, 7.0, 6.0) < 0  # worse than zero-ablation
    with pytest.raises(ValueError, match="undefined"):
        ce_loss_recovered(2.0, 3.0, 2.0)

"""SAELens interchange: our directories load in sae_lens and theirs load in ours, same outputs."""

from __future__ import annotations

import pytest
import torch

from interp.sae import TopKSAE, from_saelens, load_saelens, to_saelens

sae_lens = pytest.importorskip("sae_lens")


pytestmark = pytest.mark.usefixtures("one_thread")


def _ours(seed=0) -> TopKSAE:
    sae = TopKSAE(
        12,
        40,
        5,
        hook_name="blocks.0.hook_resid_post",
        generator=torch.Generator().manual_seed(seed),
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(40, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(12, generator=g))
        sae.W_enc.add_(0.2 * torch.randn(12, 40, generator=g))  # untie so W_enc matters
    return sae


def _x(seed=2):
    return torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(seed)) * 2


def _randomize_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_our_directory_loads_in_saelens_with_same_outputs(tmp_path):
    ours = _ours()
    ours.save(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert type(theirs).__name__ == "TopKSAE" and theirs.cfg.k == 5
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    x = _x()
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        torch.testing.assert_close(ours.encode_dense(x), z_theirs)
        torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(z_theirs))
        torch.testing.assert_close(ours(x).x_hat, theirs(x))


def test_saelens_directory_loads_in_ours(tmp_path):
    cfg = sae_lens.TopKSAEConfig(d_in=12, d_sae=40, k=5)
    theirs = sae_lens.TopKSAE(cfg)
    _randomize_(theirs, 3)
    theirs.save_model(tmp_path / "theirs")
    ours = TopKSAE.load(tmp_path / "theirs")
    assert (ours.d_in, ours.d_sae, ours.k) == (12, 40, 5)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_dense(x), theirs.encode(x))
        torch.testing.assert_close(ours(x).x_hat, theirs(x))


def test_saelens_training_sae_with_decoder_norm_rescaling_folds_exactly():
    # SAELens's training default: rescale_acts_by_decoder_norm=True with decoder norm 0.1;
    # also without b_dec applied to the input. Both are folded into our weights.
    cfg = sae_lens.TopKTrainingSAEConfig(d_in=12, d_sae=40, k=5, apply_b_dec_to_input=False)
    assert cfg.rescale_acts_by_decoder_norm
    theirs = sae_lens.TopKTrainingSAE(cfg)
    _randomize_(theirs, 4)
    with torch.no_grad():  # non-uniform decoder norms make the folding matter
        theirs.W_dec.mul_(torch.linspace(0.1, 3.0, 40)[:, None])
    ours = from_saelens(theirs)
    torch.testing.assert_close(ours.W_dec.norm(dim=1), torch.ones(40))
    x = _x(5)
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x).to_dense(40).ne(0), z_theirs.ne(0))
        torch.testing.assert_close(ours(x).x_hat, theirs.decode(z_theirs), atol=1e-5, rtol=1e-5)


def test_to_saelens_roundtrip(tmp_path):
    ours = _ours(6)
    theirs = to_saelens(ours)
    x = _x(7)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x).x_hat)
    theirs.save_model(tmp_path / "back")
    again = load_saelens(tmp_path / "back")
    for name, p in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], p)

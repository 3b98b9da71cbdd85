"""TopKSAE module: config validation, init, encode/decode API, dtype casting, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from interp.sae import SAEOutput, TopKActivations, TopKSAE, TopKSAEConfig
from interp.sae.functional import topk_encode_dense

pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(d_in=8, d_sae=32, k=4, seed=0, **kw) -> TopKSAE:
    sae = TopKSAE(d_in, d_sae, k, generator=torch.Generator().manual_seed(seed), **kw)
    with torch.no_grad():  # non-trivial biases so they are exercised
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(seed + 1))
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(seed + 2))
    return sae


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(d_in=4, d_sae=8, k=9), ValueError, "k must be ≤ d_sae"),
        (dict(d_in=0, d_sae=8, k=2), ValueError, "d_in must be ≥ 1"),
        (dict(d_in=4, d_sae=8, k=0), ValueError, "k must be ≥ 1"),
        # A float is caught by our check, or first by beartype when instrumented.
        (dict(d_in=4, d_sae=8.0, k=2), TypeError, "d_sae"),
        (dict(d_in=True, d_sae=8, k=2), TypeError, "d_in must be an int"),
    ],
)
def test_config_validation_messages(kwargs, error, match):
    with pytest.raises(error, match=match):
        TopKSAEConfig(**kwargs)
    with pytest.raises(error, match=match):
        TopKSAE(**kwargs)


def test_init_unit_norm_decoder_and_tied_encoder():
    sae = TopKSAE(8, 32, 4, generator=torch.Generator().manual_seed(0), init="gao")
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert sae.W_enc.shape == (8, 32) and sae.W_dec.shape == (32, 8)
    assert sae.b_enc.abs().sum() == 0 and sae.b_dec.abs().sum() == 0
    other = TopKSAE(8, 32, 4, generator=torch.Generator().manual_seed(0), init="gao")
    assert torch.equal(sae.W_dec, other.W_dec)  # seeded through the generator
    assert all(p.dtype == torch.float32 for p in sae.parameters())


def test_encode_decode_shapes_and_dense_agreement():
    sae = _sae()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    latents = sae.encode(x)
    assert isinstance(latents, TopKActivations)
    assert latents.indices.shape == latents.values.shape == (2, 5, 4)
    dense = sae.encode_dense(x)
    ref = topk_encode_dense(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k)
    torch.testing.assert_close(dense, ref)
    torch.testing.assert_close(sae.decode(latents), sae.decode(dense))
    out = sae(x)
    assert isinstance(out, SAEOutput)
    assert out.x_hat.shape == x.shape
    torch.testing.assert_close(out.x_hat, sae.decode(latents))
    flat = x.reshape(-1, 8)
    expected = ((flat - out.x_hat.reshape(-1, 8)) ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.fvu, expected)
    assert float(out.auxk_loss.detach()) == 0.0


def test_forward_auxk_with_dead_latents_is_positive():
    sae = _sae()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::2] = True
    out = sae(x, dead_mask=dead, k_aux=3)
    assert float(out.auxk_loss.detach()) > 0
    assert float(sae(x, dead_mask=torch.zeros(32, dtype=torch.bool)).auxk_loss.detach()) == 0.0


def test_bf16_inputs_are_cast_in():
    sae = _sae()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(5)).bfloat16()
    out = sae(x)
    assert out.x_hat.dtype == torch.float32
    torch.testing.assert_close(out.x_hat, sae(x.float()).x_hat)
    assert sae.encode(x).values.dtype == torch.float32


def test_wrong_width_is_a_clear_error():
    with pytest.raises(ValueError, match="last dim d_in=8"):
        _sae().encode(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="last dim d_sae=32"):
        _sae().decode(torch.zeros(3, 31))


def test_decoder_constraints():
    sae = _sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 32)[:, None])
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    sae.W_dec.grad = torch.randn(32, 8, generator=torch.Generator().manual_seed(6))
    sae.project_decoder_grad_()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    torch.testing.assert_close(parallel, torch.zeros(32), atol=1e-6, rtol=0)


def test_save_load_roundtrip(tmp_path):
    sae = _sae(hook_name="blocks.1.hook_resid_post", model_name="tiny-llama")
    path = sae.save(tmp_path / "sae")
    assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_sae"] == 32
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    loaded = TopKSAE.load(path)
    assert loaded.cfg == sae.cfg
    for name, p in sae.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name])
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        TopKSAE.load(tmp_path)
    path = _sae().save(tmp_path / "s")
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(ValueError, match="architecture='jumprelu'"):
        TopKSAE.load(path)
    (path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(ValueError, match="layer_norm"):
        TopKSAE.load(path)

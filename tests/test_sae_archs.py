"""SAELens Standard / JumpReLU / TopK SAEs load into interp with identical encode/decode, splice."""

from __future__ import annotations

import json

import pytest
import torch

import interp
from interp.sae import (
    JumpReLUSAE,
    StandardSAE,
    TopKSAE,
    from_saelens,
    load_saelens,
    save_saelens,
    splice,
    to_saelens,
)

sae_lens = pytest.importorskip("sae_lens")

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_SAE = 64, 96


def _randomize_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name != "threshold" else 0.5))
            if name == "threshold":
                p.abs_()


def _theirs(arch, seed, **cfg):
    config_cls = {
        "standard": sae_lens.StandardSAEConfig,
        "jumprelu": sae_lens.JumpReLUSAEConfig,
        "topk": sae_lens.TopKSAEConfig,
    }[arch]
    cls = {
        "standard": sae_lens.StandardSAE,
        "jumprelu": sae_lens.JumpReLUSAE,
        "topk": sae_lens.TopKSAE,
    }[arch]
    sae = cls(config_cls(d_in=D_IN, d_sae=D_SAE, **cfg))
    _randomize_(sae, seed)
    return sae


def _x(seed=0):
    return torch.randn(2, 9, D_IN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("arch", "cls", "cfg"),
    [
        ("standard", StandardSAE, {}),
        ("standard", StandardSAE, {"apply_b_dec_to_input": False}),
        ("jumprelu", JumpReLUSAE, {}),
        ("jumprelu", JumpReLUSAE, {"apply_b_dec_to_input": False}),
        ("topk", TopKSAE, {"k": 7}),
    ],
)
def test_saelens_directory_and_object_give_identical_encodings(tmp_path, arch, cls, cfg):
    theirs = _theirs(arch, 1, **cfg)
    theirs.save_model(tmp_path / "sae")  # written by sae_lens itself
    x = _x()
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        x_hat_theirs = theirs.decode(z_theirs)
    assert 0 < (z_theirs > 0).float().mean() < 1  # the gate / ReLU actually matters
    for ours in (load_saelens(tmp_path / "sae"), from_saelens(theirs)):
        assert type(ours) is cls
        with torch.no_grad():
            z = ours.encode_dense(x)
            assert (z - z_theirs).abs().max() <= 1e-6
            assert (ours.decode(z) - x_hat_theirs).abs().max() <= 1e-6
            assert (ours.decode(z_theirs) - x_hat_theirs).abs().max() <= 1e-6


def test_jumprelu_gate_is_strict_and_uses_relu():
    ours = JumpReLUSAE(4, 3)
    with torch.no_grad():
        ours.W_enc.copy_(torch.eye(4)[:, :3])
        ours.threshold.copy_(torch.tensor([0.5, 0.0, 0.5]))
    z = ours.encode(torch.tensor([[0.5, -1.0, 0.7, 0.0]]))
    # 0.5 is not > 0.5 (gate closed); -1 is > threshold 0? no; 0.7 > 0.5 passes
    assert z.tolist() == [[0.0, 0.0, pytest.approx(0.7)]]


def test_dense_sae_roundtrips_through_saelens(tmp_path):
    theirs = _theirs("jumprelu", 2)
    ours = from_saelens(theirs)
    save_saelens(ours, tmp_path / "ours")
    again = sae_lens.SAE.load_from_disk(tmp_path / "ours")
    assert type(again).__name__ == "JumpReLUSAE"
    x = _x(3)
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x), ours.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(to_saelens(ours).encode(x), theirs.encode(x), rtol=0, atol=0)
    assert isinstance(load_saelens(tmp_path / "ours"), JumpReLUSAE)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("normalize_activations", "layer_norm"),
        ("normalize_activations", "constant_norm_rescale"),
        ("normalize_activations", "covariance_whitening"),
        ("reshape_activations", "hook_z"),
        ("architecture", "gated"),
        ("finetuning_scaling_factor", True),
    ],
)
def test_unmodelled_config_fields_raise_naming_the_field(tmp_path, field, value):
    theirs = _theirs("standard", 4)
    theirs.save_model(tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field):
        load_saelens(tmp_path / "sae")


def test_wrong_weights_raise_with_names_and_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    theirs = _theirs("jumprelu", 5)
    theirs.save_model(tmp_path / "sae")
    path = tmp_path / "sae" / "sae_weights.safetensors"
    w = load_file(str(path))
    del w["threshold"]
    save_file(w, str(path))
    with pytest.raises(ValueError, match="threshold"):
        load_saelens(tmp_path / "sae")
    w["threshold"] = torch.zeros(D_SAE + 1)
    save_file(w, str(path))
    with pytest.raises(ValueError, match=r"threshold has shape \(97,\)"):
        load_saelens(tmp_path / "sae")
    with pytest.raises(ValueError, match=r"d_in=64, got \(3, 65\)"):
        StandardSAE(D_IN, D_SAE).encode(torch.zeros(3, D_IN + 1))


def test_topk_load_still_refuses_other_architectures(tmp_path):
    _theirs("standard", 6).save_model(tmp_path / "sae")
    with pytest.raises(ValueError, match="architecture='standard'"):
        TopKSAE.load(tmp_path / "sae")


def test_splice_dense_sae_on_a_tiny_model():
    model = interp.tiny("llama", seed=0)
    d = model.cfg.d_model
    hook = "blocks.1.hook_resid_post"
    theirs = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=d, d_sae=48))
    _randomize_(theirs, 7)
    ours = from_saelens(theirs)
    batch = model.tokenize(["the cat sat on the mat", "tea"])
    _, cache = model.run_with_cache(batch, names_filter=hook)
    acts = cache[hook]
    with torch.no_grad():
        expected_hat = theirs.decode(theirs.encode(acts))
        z = theirs.encode(acts)
    seen = {}

    def grab(a, hook=None):
        seen["a"] = a

    with model.hooks(fwd=[(hook, splice(ours)), (hook, grab)]):
        model(batch)
    torch.testing.assert_close(seen["a"], expected_hat, atol=1e-6, rtol=1e-6)

    # keep_error with no edits: bit-for-bit the clean forward pass
    clean = model(batch)
    with model.hooks(fwd=[(hook, splice(ours, keep_error=True))]):
        assert torch.equal(model(batch), clean)

    # ablating a live latent with keep_error removes exactly its decoder contribution
    latent = int((z > 0).sum((0, 1)).argmax())
    with model.hooks(fwd=[(hook, splice(ours, keep_error=True, ablate=[latent])), (hook, grab)]):
        model(batch)
    want = acts - z[..., latent : latent + 1] * theirs.W_dec[latent].detach()
    torch.testing.assert_close(seen["a"], want, atol=1e-5, rtol=1e-5)
    with model.hooks(fwd=[(hook, splice(ours, scale={latent: 2.0})), (hook, grab)]):
        model(batch)
    z2 = z.clone()
    z2[..., latent] *= 2
    torch.testing.assert_close(seen["a"], theirs.decode(z2).detach(), atol=1e-5, rtol=1e-5)


def test_splice_rejects_non_sae():
    with pytest.raises(TypeError, match="SAE"):
        splice(torch.nn.Linear(3, 3))

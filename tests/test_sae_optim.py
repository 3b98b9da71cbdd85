"""Schedule-free SignSGD (interp.sae.optim) and the trainer's sparsify options.

The optimizer is checked against a naive reference that keeps x, y and z explicitly
(planted gradients and a varying lr), and, when ``schedulefree`` is installed, against
``ScheduleFreeWrapper(SignSGD)`` as EleutherAI's sparsify builds it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from interp.sae import SAETrainConfig, TopKSAE, default_lr, evaluate, train_sae
from interp.sae.optim import ScheduleFreeSignSGD
from interp.sae.train import CHECKPOINT_NAME


def _naive(p0, grads, lrs, beta, power=2.0):
    """x, y, z kept explicitly (Defazio et al. 2024 with a SignSGD base step)."""
    x, z = p0.clone(), p0.clone()
    y = p0.clone()
    weight_sum, lr_max = 0.0, 0.0
    ys = []
    for g, lr in zip(grads, lrs, strict=True):
        ys.append(y.clone())  # the gradient g is taken at this y
        z = z - lr * torch.sign(g)
        lr_max = max(lr_max, lr)
        w = lr_max**power
        weight_sum += w
        c = w / weight_sum
        x = (1 - c) * x + c * z
        y = (1 - beta) * z + beta * x
    return x, y, z


def test_step_equals_naive_reference():
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(7)]
    grads[2][0, 0] = 0.0  # sign(0) = 0: no move
    lrs = [0.01, 0.02, 0.03, 0.03, 0.02, 0.01, 0.05]
    p = torch.nn.Parameter(p0.clone())
    opt = ScheduleFreeSignSGD([p], lr=lrs[0], momentum=0.9)
    for g, lr in zip(grads, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = g.clone()
        opt.step()
    x, y, z = _naive(p0, grads, lrs, beta=0.9)
    torch.testing.assert_close(p.data, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["z"], z, rtol=0, atol=1e-12)
    opt.eval()
    torch.testing.assert_close(p.data, x, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    torch.testing.assert_close(p.data, y, rtol=0, atol=1e-12)
    # first step: x_1 = z_1 = p0 − lr·sign(g)
    q = torch.nn.Parameter(p0.clone())
    one = ScheduleFreeSignSGD([q], lr=0.1, momentum=0.5)
    q.grad = grads[0].clone()
    one.step()
    one.eval()
    torch.testing.assert_close(q.data, p0 - 0.1 * grads[0].sign(), rtol=0, atol=1e-12)


def test_equals_sparsify_schedulefree_wrapper():
    schedulefree = pytest.importorskip("schedulefree")
    sign_sgd = pytest.importorskip("sparsify.sign_sgd")
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(4, 6, generator=gen)
    grads = [torch.randn(4, 6, generator=gen) for _ in range(6)]
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    ours = ScheduleFreeSignSGD([a], lr=0.02, momentum=0.95)
    theirs = schedulefree.ScheduleFreeWrapper(sign_sgd.SignSGD([b], lr=0.02), momentum=0.95)
    theirs.train()
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        torch.testing.assert_close(a.data, b.data, rtol=0, atol=1e-6)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(a.data, b.data, rtol=0, atol=1e-6)


def test_state_dict_round_trip_keeps_mode_and_average():
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(3, generator=gen))
    opt = ScheduleFreeSignSGD([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.randn(3, generator=gen)
        opt.step()
    q = torch.nn.Parameter(p.data.clone())
    opt2 = ScheduleFreeSignSGD([q], lr=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as through torch.save/load
    g = torch.randn(3, generator=gen)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p.data, q.data)
    assert opt2.param_groups[0]["weight_sum"] == opt.param_groups[0]["weight_sum"]


def test_bad_arguments_raise():
    p = torch.nn.Parameter(torch.zeros(2))
    for kwargs in ({"lr": 0.0}, {"momentum": 1.0}, {"momentum": 0.0}, {"weight_lr_power": -1.0}):
        with pytest.raises(ValueError):
            ScheduleFreeSignSGD([p], **kwargs)
    with pytest.raises(ValueError, match="closure"):
        ScheduleFreeSignSGD([p]).step(lambda: 0.0)


# ---- the trainer's options -------------------------------------------------------------


def _data(n_batches=12, batch=64, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(48, d, generator=gen)
    out = []
    for _ in range(n_batches):
        idx = torch.randint(0, 48, (batch, 3), generator=gen)
        mags = torch.rand(batch, 3, generator=gen)
        x = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=mags, mode="sum")
        out.append(x + 0.5)
    return out


def _sae(init="gao", seed=0):
    return TopKSAE(16, 48, 4, generator=torch.Generator().manual_seed(seed), init=init)


def test_config_validation():
    assert default_lr(2**14, "signsgd") == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="optimizer"):
        default_lr(2**14, "sgd")
    bad = [
        {"optimizer": "sgd"},
        {"optimizer": "signsgd", "betas": (0.8, 0.999)},
        {"optimizer": "signsgd", "eps": 1e-8},
        {"optimizer": "adam", "momentum": 0.9},  # SignSGD's, with Adam
        {"betas": (0.8, 0.999)},  # Adam's, with the default (SignSGD)
        {"optimizer": "signsgd", "momentum": 1.0},
        {"b_dec_init": "median"},
        {"warmup_steps": -1},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            SAETrainConfig(**kwargs)
    with pytest.raises(ValueError, match="init"):
        TopKSAE(4, 8, 2, init="xavier")


def test_sparsify_init():
    sae = _sae("sparsify")
    enc_rows = sae.W_enc.detach().t()
    # nn.Linear's bound ±1/√d_in; decoder rows = the encoder rows at unit norm
    assert float(enc_rows.abs().max()) <= 1 / math.sqrt(16)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))
    torch.testing.assert_close(
        sae.W_dec.detach(), enc_rows / enc_rows.norm(dim=1, keepdim=True), rtol=1e-6, atol=1e-6
    )
    assert sae.W_enc.stride() == (1, 16)  # transpose of a row-major [d_sae, d_in] buffer
    assert not torch.equal(sae.W_dec, _sae("gao").W_dec)
    # mean b_dec
    x = _data(1)[0]
    sae.init_b_dec(x, method="mean")
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))
    with pytest.raises(ValueError, match="method"):
        sae.init_b_dec(x, method="mode")


def test_signsgd_returns_average_and_checkpoint_holds_iterate(tmp_path):
    data = _data()
    cfg = SAETrainConfig(optimizer="signsgd", lr=1e-2, progress=False, checkpoint_dir=tmp_path)
    sae = _sae()
    out = train_sae(sae, data, cfg)
    # replay by hand: same trainer steps, the optimizer left in train mode → y
    payload = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    y = TopKSAE(16, 48, 4)
    y.load_state_dict(payload["sae"])
    opt = ScheduleFreeSignSGD(list(y.parameters()), lr=1e-2)
    opt.load_state_dict(payload["optimizer"])
    assert opt.train_mode
    opt.eval()  # x from (y, z)
    for name, p in y.named_parameters():
        torch.testing.assert_close(p.data, getattr(out.sae, name).data, rtol=1e-5, atol=1e-6)
    # x and y differ (momentum 0.95 keeps y off the average)
    assert not torch.allclose(payload["sae"]["W_enc"], out.sae.W_enc.data)
    assert out.history[-1].lr == pytest.approx(1e-2)  # no warm-up by default for SignSGD
    assert evaluate(out.sae, data[:2]).fvu < 1.0


def test_signsgd_resume_equals_uninterrupted(tmp_path):
    data = _data()
    kw = dict(optimizer="signsgd", lr=1e-2, progress=False, checkpoint_every=4, dead_tokens=128)
    full = train_sae(_sae("sparsify"), data, b_dec_init="mean", **kw)
    part = tmp_path / "run"
    train_sae(_sae("sparsify"), data, b_dec_init="mean", checkpoint_dir=part, max_steps=5, **kw)
    resumed = train_sae(_sae("sparsify"), data, b_dec_init="mean", checkpoint_dir=part, **kw)
    assert resumed.steps == full.steps == len(data)
    for a, b in zip(full.sae.parameters(), resumed.sae.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_signsgd_resampling_resets_z(tmp_path):
    # resample on the last step: the resampled latents must have z = y (so x = y there)
    data = _data(5)  # 2 of 48 latents are dead after step 5
    kw = dict(optimizer="signsgd", lr=1e-2, progress=False, dead_tokens=64, auxk_alpha=0.0)
    out = train_sae(_sae(), data, resample_every=5, checkpoint_dir=tmp_path, **kw)
    payload = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    y = payload["sae"]["W_dec"]
    z = payload["optimizer"]["state"][0]["z"]  # parameters in order W_dec, W_enc, b_enc, b_dec
    same = (y == z).all(dim=1)
    assert out.history[-1].dead_fraction == 0.0  # every dead latent was resampled
    assert 0 < int(same.sum()) < 48, "resampled rows (and only those) have z = y"
    torch.testing.assert_close(out.sae.W_dec.data[same], y[same], rtol=0, atol=1e-6)
    # without resampling no row has z = y
    plain = train_sae(_sae(), data, checkpoint_dir=tmp_path / "plain", **kw)
    payload = torch.load(tmp_path / "plain" / CHECKPOINT_NAME, weights_only=True)
    assert plain.history[-1].dead_fraction > 0
    assert not (payload["sae"]["W_dec"] == payload["optimizer"]["state"][0]["z"]).all(1).any()


def test_options_change_training():
    data = _data(6)
    base = train_sae(_sae(), data, lr=1e-2, warmup_steps=0, optimizer="adam", progress=False).sae
    for kwargs, init in (
        ({"optimizer": "signsgd"}, "gao"),
        ({"b_dec_init": "mean"}, "gao"),
        ({}, "sparsify"),
        ({"normalize_decoder": False}, "gao"),
    ):
        kwargs = {"optimizer": "adam", **kwargs}
        other = train_sae(_sae(init), data, lr=1e-2, warmup_steps=0, progress=False, **kwargs)
        assert not torch.allclose(other.sae.W_dec, base.W_dec), kwargs
        norms = other.sae.W_dec.norm(dim=1)
        unit = torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        # SignSGD returns the average x of unit-norm iterates: rows a little shorter
        expect = kwargs.get("normalize_decoder", True) and kwargs["optimizer"] == "adam"
        assert unit == expect, kwargs


def test_defaults_are_signsgd_with_sparsify_init():
    data = _data(6)
    gen = torch.Generator().manual_seed(0)
    default = train_sae(TopKSAE(16, 48, 4, generator=gen), data, progress=False).sae
    explicit = train_sae(_sae("sparsify"), data, optimizer="signsgd", progress=False).sae
    adam = train_sae(_sae("sparsify"), data, optimizer="adam", progress=False).sae
    for name, p in default.state_dict().items():
        torch.testing.assert_close(p, explicit.state_dict()[name], atol=0, rtol=0)
    assert not torch.allclose(default.W_dec, adam.W_dec)

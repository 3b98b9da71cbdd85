"""The TopK trainer's fast paths against plain references.

* one sort plan shared by the encoder and decoder backward (``TopKSAE.forward``);
* the fused sum of squared errors inside ``fvu``;
* the pre-activation buffer reused across calls inside ``reuse_encoder_buffer``;
* block-by-block optimizer step, decoder projection and renormalization (``_blocks``);
* the AuxK decode over a small dead set as one dense product (``_auxk_loss``);
* the training loop in sparsify's step order (decoder rows renormalized before the forward,
  not after the step) against a dense re-implementation of sparsify's per-batch step.
"""

from __future__ import annotations

import threading

import pytest
import torch

from interp.sae import TopKSAE, train_sae
from interp.sae import functional as SF
from interp.sae.functional import dense_decode, fvu, reuse_encoder_buffer, topk_encode_dense
from interp.sae.optim import ScheduleFreeSignSGD

pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(d_in=12, d_sae=40, k=5, seed=0, init="sparsify"):
    return TopKSAE(d_in, d_sae, k, generator=torch.Generator().manual_seed(seed), init=init)


def _x(n=64, d_in=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g) * 2 + 0.5


def _grads(sae: TopKSAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(sae.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


# ---- shared sort plan ------------------------------------------------------------------


@pytest.mark.parametrize("with_dead", [False, True])
def test_forward_gradients_equal_dense_reference(with_dead):
    sae, x = _sae(), _x()
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    if with_dead:
        dead[::3] = True  # the AuxK path: the encoder sorts its own, wider index set
    out = sae(x, dead_mask=dead if with_dead else None, k_aux=4)
    got = _grads(sae, out.fvu + 0.5 * out.auxk_loss)

    z = topk_encode_dense(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k)
    x_hat = dense_decode(z, sae.W_dec, sae.b_dec)
    loss = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    if with_dead:
        loss = loss + 0.5 * out.auxk_loss.detach() * 0  # AuxK is checked in test_sae_functional
        got_fvu = _grads(sae, sae(x, dead_mask=dead, k_aux=4).fvu)
        for name, g in _grads(sae, loss).items():
            torch.testing.assert_close(got_fvu[name], g, rtol=1e-4, atol=1e-6)
        return
    for name, g in _grads(sae, loss).items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6)


def test_shared_plan_is_the_plan_of_the_topk_indices(monkeypatch):
    sae, x = _sae(), _x()
    plans = []
    real = SF._sort_plan

    def spy(indices, n_rows):
        plan = real(indices, n_rows)
        plans.append((indices.clone(), plan))
        return plan

    monkeypatch.setattr(SF, "_sort_plan", spy)
    out = sae(x)
    assert len(plans) == 1, "one sort per training forward"
    indices, plan = plans[0]
    assert torch.equal(indices, out.latents.indices)
    flat = indices.reshape(-1)
    assert torch.equal(flat[plan.order], flat.sort(stable=True).values)
    assert torch.equal(plan.rows, plan.order // sae.k)
    out.fvu.backward()  # both backward passes use it without sorting again
    assert len(plans) == 1
    with torch.no_grad():
        sae(x)  # no gradient, no plan
    assert len(plans) == 1


# ---- fused sum of squared errors -----------------------------------------------------------


def test_fvu_values_and_gradients_bit_identical_to_autograd():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        x = (torch.randn(300, 13, generator=g) * 3 + 1).to(dtype).requires_grad_()
        x_hat = torch.randn(300, 13, generator=g).to(dtype).requires_grad_()
        up = torch.rand((), generator=g).to(dtype)
        ref = (x - x_hat).pow(2).sum() / ((x.detach() - x.detach().mean(0)) ** 2).sum()
        got = fvu(x, x_hat)
        assert torch.equal(got, ref)
        for a, b in zip(
            torch.autograd.grad(got * up, (x, x_hat)),
            torch.autograd.grad(ref * up, (x, x_hat)),
            strict=True,
        ):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"x \(4, 3\) and x_hat \(3,\)"):
        SF._sum_squared_error(torch.zeros(4, 3), torch.zeros(3))  # fvu's types catch it first
    a, b = torch.randn(8, 3).bfloat16(), torch.randn(8, 3).bfloat16()
    bf = fvu(a, b.requires_grad_())
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), fvu(a.float(), b.detach().float()), rtol=1e-2, atol=0)
    bf.backward()
    assert b.grad is not None and b.grad.dtype == torch.bfloat16


# ---- reused pre-activation buffer ------------------------------------------------------------


def test_reused_buffer_gives_the_same_encodings_and_is_released(monkeypatch):
    sae = _sae(d_sae=64, k=6)
    batches = [_x(n, seed=n) for n in (37, 64, 5)]  # grows, then shrinks
    fresh = [sae.encode(x) for x in batches]
    with reuse_encoder_buffer():
        with reuse_encoder_buffer():  # nested: the outer scope keeps the buffer
            reused = [sae.encode(x) for x in batches]
        assert SF._ENCODER_BUFFER.tensor is not None
        # chunks of 3 rows through the one buffer
        monkeypatch.setattr(SF, "_REUSED_CHUNK_ELEMENTS", 3 * 64)
        chunked = [sae.encode(x) for x in batches]
    assert SF._ENCODER_BUFFER.tensor is None and not SF._ENCODER_BUFFER.active
    for a, b, c in zip(fresh, reused, chunked, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
        assert torch.equal(a.indices, c.indices)  # smaller GEMMs round differently:
        torch.testing.assert_close(a.values, c.values, rtol=1e-6, atol=1e-6)


def test_reused_buffer_is_per_thread():
    seen = {}

    def other():
        seen["active"] = SF._ENCODER_BUFFER.active

    with reuse_encoder_buffer():
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert SF._ENCODER_BUFFER.active
    assert seen["active"] is False


# ---- block-by-block updates ---------------------------------------------------------------


def _naive_step(y, z, g, lr, beta, c):
    sign = g.sign()
    z_new = z - lr * sign
    return y.lerp(z_new, c) - (1 - c) * (1 - beta) * lr * sign, z_new


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "mixed"])
def test_blocked_optimizer_step_equals_naive(monkeypatch, layout):
    monkeypatch.setattr(SF, "_BLOCK_ELEMENTS", 7)  # blocks that do not divide anything
    g = torch.Generator().manual_seed(4)
    base = torch.randn(9, 5, generator=g)
    data = base if layout == "contiguous" else base.t().contiguous().t()  # W_enc's layout
    p = torch.nn.Parameter(data.clone())
    assert p.stride() == data.stride()
    opt = ScheduleFreeSignSGD([p], lr=0.03, momentum=0.9)
    y, z, weight_sum = data.clone(), data.clone(), 0.0
    for step in range(4):
        grad = torch.randn(9, 5, generator=g)
        if step == 1:
            grad[0, :2] = 0.0
        p.grad = grad.contiguous() if layout == "mixed" else grad.t().contiguous().t()
        if layout == "contiguous":
            p.grad = grad.clone()
        opt.step()
        weight_sum += 0.03**2
        y, z = _naive_step(y, z, grad, 0.03, 0.9, 0.03**2 / weight_sum)
        torch.testing.assert_close(p.data, y, rtol=0, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["z"], z, rtol=0, atol=1e-6)


def test_blocked_decoder_projection_and_renormalization_equal_naive(monkeypatch):
    monkeypatch.setattr(SF, "_BLOCK_ELEMENTS", 25)  # 2 rows of 12 per block, 40 rows
    sae = _sae()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.d_sae, 1, generator=g) + 0.5)
    W = sae.W_dec.detach().clone()
    sae.normalize_decoder_()
    unit = W / W.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.data, unit, rtol=0, atol=1e-7)
    grad = torch.randn(sae.d_sae, sae.d_in, generator=g)
    sae.W_dec.grad = grad.clone()
    sae.project_decoder_grad_()
    expected = grad - (grad * sae.W_dec.data).sum(1, keepdim=True) * sae.W_dec.data
    torch.testing.assert_close(sae.W_dec.grad, expected, rtol=0, atol=1e-6)


# ---- the loop in sparsify's order ------------------------------------------------------------


def _sparsify_reference(sae: TopKSAE, batches, lr: float):
    """sparsify's per-batch step (``Trainer.fit``, loss_fn "fvu", auxk_alpha 0) with dense
    autograd: b_dec = first batch's mean; each step renormalizes the decoder rows, then
    forward, FVU, backward, gradient parallel to the rows removed, schedule-free SignSGD."""
    W_enc = torch.nn.Parameter(sae.W_enc.detach().clone())
    b_enc = torch.nn.Parameter(sae.b_enc.detach().clone())
    W_dec = torch.nn.Parameter(sae.W_dec.detach().clone())
    b_dec = torch.nn.Parameter(sae.b_dec.detach().clone())
    opt = ScheduleFreeSignSGD([W_dec, W_enc, b_enc, b_dec], lr=lr, momentum=0.95)
    for i, x in enumerate(batches):
        with torch.no_grad():
            if i == 0:
                b_dec.copy_(x.mean(0))
            W_dec /= W_dec.norm(dim=1, keepdim=True) + torch.finfo(W_dec.dtype).eps
        pre = torch.relu((x - b_dec) @ W_enc + b_enc)
        top = pre.topk(sae.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        loss = ((x - (z @ W_dec + b_dec)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        opt.zero_grad()
    opt.eval()
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}


def test_signsgd_loop_equals_sparsify_step_order():
    batches = [_x(96, seed=s) for s in range(6)]
    lr = 0.01
    ref = _sparsify_reference(_sae(), batches, lr)
    out = train_sae(_sae(), batches, b_dec_init="mean", lr=lr, progress=False).sae
    for name, want in ref.items():
        torch.testing.assert_close(getattr(out, name).data, want.data, rtol=0, atol=2e-5)


@pytest.mark.parametrize("every", [8, 3, 40])
def test_encoder_gradients_with_auxk_equal_plain_autograd(every):
    """FVU + AuxK through TopKSAE.forward against plain autograd over dense
    pre-activations: gradients of every parameter and of the input. Every 8th latent dead
    (≤ d_sae / 4) takes the dense AuxK backward over the dead columns and shares the TopK
    sort plan with the decoder; every 3rd keeps the sparse backward over both index sets;
    every 40th leaves fewer dead latents (5) than k_aux, so AuxK takes all of them."""
    sae, x = _sae(d_sae=200), _x().requires_grad_(True)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[::every] = True
    k_aux = 6
    out = sae(x, dead_mask=dead, k_aux=k_aux)
    params = [x, *sae.parameters()]
    got = torch.autograd.grad(out.fvu + 0.5 * out.auxk_loss, params)

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    x_hat = z @ sae.W_dec + sae.b_dec
    xd = x.detach()  # fvu's denominator is a constant
    fvu_ref = ((x - x_hat) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    dead_idx = dead.nonzero().squeeze(1)
    aux = pre[:, dead_idx].topk(min(k_aux, dead_idx.numel()), dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, dead_idx[aux.indices], aux.values.relu())
    e = (x - x_hat).detach()
    e_hat = z_aux @ sae.W_dec
    aux_ref = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.auxk_loss, aux_ref, rtol=1e-5, atol=1e-7)
    want = torch.autograd.grad(fvu_ref + 0.5 * aux_ref, params)
    for name, a, b in zip(["x", *dict(sae.named_parameters())], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("every", [8, 3])
def test_auxk_loss_over_a_small_dead_set_is_decoded_densely(monkeypatch, every):
    """TopKSAE.forward passes the dead set to the AuxK loss: while it is at most d_sae / 4
    (every 8th latent) the aux latents are decoded as one dense product over the dead
    columns (no sparse gather: ``sparse_decode`` must not be called), with the loss and
    gradients of the sparse decode; a larger dead set (every 3rd) keeps the sparse one."""
    sae, x = _sae(d_sae=200), _x()
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[::every] = True
    k_aux = 6
    _, aux = SF._topk_encode_with_aux(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k, dead, k_aux)
    x_hat = sae(x).x_hat.detach()
    values = aux.values.detach().requires_grad_(True)
    aux = SF.TopKActivations(aux.indices, values)

    def loss_and_grads(dead_idx):
        loss = SF._auxk_loss(x, x_hat, aux, sae.W_dec, dead=dead_idx)
        return loss, torch.autograd.grad(loss, [values, sae.W_dec])

    want, want_grads = loss_and_grads(None)
    if every == 8:

        def refuse(*a, **kw):
            raise AssertionError("the dense AuxK decode gathered rows")

        monkeypatch.setattr(SF, "sparse_decode", refuse)
    got, got_grads = loss_and_grads(dead.nonzero().squeeze(1))
    assert want > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and TopKSAE.forward gives the same AuxK term either way
    out = sae(x, dead_mask=dead, k_aux=k_aux)
    torch.testing.assert_close(out.auxk_loss, want, rtol=1e-5, atol=1e-7)


def test_max_grad_norm_is_adams_only():
    with pytest.raises(ValueError, match="max_grad_norm clips Adam's gradient"):
        train_sae(_sae(), [_x()], max_grad_norm=0.5, progress=False)
    for value in (None, 1.0):  # the default, or off: nothing to clip either way
        out = train_sae(_sae(), [_x()], max_grad_norm=value, progress=False)
        assert out.history[0].grad_norm > 0
    adam = train_sae(_sae(), [_x()], optimizer="adam", max_grad_norm=0.5, progress=False)
    assert adam.steps == 1

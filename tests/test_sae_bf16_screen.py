"""The TopK encoder's bf16 screen (``functional._screened_topk``) selects exactly what the
fp32 pre-activations select.

The screen is forced on here whatever the CPU (without bf16 arithmetic it is only slower),
and its answers are compared with ``torch.topk`` over the dense fp32 pre-activations:
on random data, where nearly every row is certified, and on planted near-ties that bf16
cannot separate, where the rows must be recomputed in fp32.
"""

from __future__ import annotations

import pytest
import torch

from interp.sae import TopKSAE
from interp.sae import functional as SF
from interp.sae.functional import pre_activations, topk_encode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def screen_on(monkeypatch):
    monkeypatch.setattr(SF, "_BF16_SCREEN", True)
    SF._SCREEN_STATS.reset()
    return SF._SCREEN_STATS


def _sae(d_in=48, d_sae=768, k=8, seed=0):
    sae = TopKSAE(d_in, d_sae, k, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.copy_(0.05 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
    return sae


def _x(n=256, d_in=48, seed=2):
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed)) * 3


def _assert_exact_topk(acts, pre, k):
    """Same index sets as fp32 ``torch.topk`` (rows without ties), values to fp32 rounding."""
    ref = pre.topk(k, dim=-1)
    torch.testing.assert_close(
        acts.indices.sort(-1).values, ref.indices.sort(-1).values, rtol=0, atol=0
    )
    torch.testing.assert_close(acts.values, ref.values.relu(), rtol=1e-5, atol=1e-5)


def test_screen_is_used_and_selects_the_fp32_topk(screen_on):
    sae, x = _sae(), _x()
    assert SF._use_bf16_screen(x, sae.W_enc, sae.k)
    with torch.no_grad():
        acts = sae.encode(x)
        pre = pre_activations(x, sae.W_enc, sae.b_enc, sae.b_dec)
    assert screen_on.rows == x.shape[0]
    assert screen_on.redone < x.shape[0] // 4  # the screen, not the fallback, did the work
    _assert_exact_topk(acts, pre, sae.k)


@pytest.mark.parametrize("planted", [60, 120])
def test_planted_near_ties_widen_the_screen_or_fall_back_to_fp32(screen_on, planted):
    """``planted`` latents whose pre-activations differ by ~1e-4 relative: bf16 (8-bit
    significand) cannot order them, fp32 can. 60 fit in the widest screen (d_sae / 8 = 96
    candidates): those rows are certified after widening. 120 do not: they fall back to
    the fp32 GEMM. Half the rows, shuffled among them, have no ties and are certified at
    once. Every row gets the fp32 top k; without the error bound the screen's candidates
    would be an arbitrary 2k of the planted ones."""
    d_in, d_sae, k = 48, 768, 8
    sae = _sae(d_in, d_sae, k)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(d_in, generator=g)
    tied = base + 0.01 * torch.randn(64, d_in, generator=g)
    clear = 3 * torch.randn(64, d_in, generator=g)  # rows the first screen certifies
    x = torch.cat([tied, clear])[torch.randperm(128, generator=g)]
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.zero_()
        W = sae.W_enc  # [d_in, d_sae], a view of row-major latent rows
        W.mul_(0.01)  # every other latent far below the planted ones
        steps = torch.arange(planted, dtype=torch.float32)[torch.randperm(planted, generator=g)]
        W[:, :planted] = base[:, None] / base.norm() ** 2 * (1 + 1e-4 * steps)
        acts = sae.encode(x)
        pre = pre_activations(x, sae.W_enc, sae.b_enc, sae.b_dec)
    assert screen_on.widened > 0
    assert (screen_on.redone >= len(tied)) == (planted > d_sae // 8)
    _assert_exact_topk(acts, pre, k)


def _bf16_grid(*exponents: int) -> torch.Tensor:
    """Every bf16 number in [2^e, 2^(e+1)) for each e: 128 per binade, exact in bf16."""
    return torch.cat([2.0**e * (1 + torch.arange(128) / 128) for e in exponents])


@pytest.mark.parametrize("source", ["x", "W_enc", "b_enc", "output"])
def test_each_rounding_source_of_the_bound_is_needed(screen_on, source):
    """Planted ties: bf16 computes one value for every latent, while the fp32
    pre-activations are distinct and positive, so the screen's candidates are an arbitrary
    2k. The error comes only from rounding ``source``; the bound's term for it must send
    every row to the fp32 recomputation (without that term the arbitrary candidates are
    certified: the test fails)."""
    d_in, d_sae, k, n = 8, 384, 8, 16
    W = torch.zeros(d_in, d_sae)
    b = torch.zeros(d_sae)
    x = torch.zeros(n, d_in)
    order = torch.randperm(d_sae, generator=torch.Generator().manual_seed(7))
    if source == "x":  # x₀ = 100.2 rounds to 100; w = (a, a), a on the bf16 grid of [1, 8)
        x[:, 0], x[:, 1] = 100.2, -100.0
        a = _bf16_grid(0, 1, 2)[order]
        W[0], W[1] = a, a  # v = 0.2 a
    elif source == "W_enc":  # w₀ = 1 + ε rounds to 1 (ε < 2⁻⁸); x = (100, −100) exact
        x[:, 0], x[:, 1] = 100.0, -100.0
        W[0], W[1] = 1 + (1e-4 + 3.6e-3 * order / d_sae), 1.0  # v = 100 ε
    elif source == "b_enc":  # b = 100 + δ rounds to 100 (δ < 0.25); x · w = −100 exact
        x[:, 0] = -100.0
        W[0] = 1.0
        b = 100 + 0.01 + 0.23 * order / d_sae  # v = δ
    else:  # inputs exact (s on the bf16 grid of [¼, 2)); v = 1000 + s rounds to 1000 in bf16
        x[:, 0], x[:, 1] = 1000.0, 1.0
        W[0], W[1] = 1.0, _bf16_grid(-2, -1, 0)[order]
    expected = 1000.0 if source == "output" else 0.0
    assert (torch.addmm(b.bfloat16(), x.bfloat16(), W.bfloat16()) == expected).all()
    acts = topk_encode(x, W, b, torch.zeros(d_in), k)
    assert screen_on.redone == n
    _assert_exact_topk(acts, pre_activations(x, W, b, torch.zeros(d_in)), k)


def test_plain_contiguous_w_enc_and_chunks(screen_on, monkeypatch):
    """``topk_encode`` with a [d_in, d_sae] row-major W_enc (not TopKSAE's layout), in
    several chunks of rows."""
    d_in, d_sae, k = 48, 768, 8
    g = torch.Generator().manual_seed(3)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    b_enc, b_dec = 0.1 * torch.randn(d_sae, generator=g), torch.randn(d_in, generator=g)
    x = _x(300, d_in)
    monkeypatch.setattr(SF, "_ENCODE_CHUNK_ELEMENTS", 64 * d_sae)
    acts = topk_encode(x, W_enc, b_enc, b_dec, k)
    assert screen_on.rows == 300
    _assert_exact_topk(acts, pre_activations(x, W_enc, b_enc, b_dec), k)


def test_screened_gradients_equal_the_unscreened(monkeypatch):
    sae, x = _sae(), _x()

    def grads(flag):
        monkeypatch.setattr(SF, "_BF16_SCREEN", flag)
        out = sae(x)
        return torch.autograd.grad(out.fvu, list(sae.parameters()))

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "case",
    ["off", "float64", "bfloat16", "k too large for the width"],
)
def test_screen_is_not_used_where_it_cannot_help(monkeypatch, case):
    monkeypatch.setattr(SF, "_BF16_SCREEN", case != "off")
    x, W = torch.randn(4, 48), torch.randn(48, 768)
    k = 8
    if case == "float64":
        x, W = x.double(), W.double()
    elif case == "bfloat16":
        x = x.bfloat16()
    elif case == "k too large for the width":
        k = 49  # k + k > 768 / 8
    assert not SF._use_bf16_screen(x, W, k)


@pytest.mark.parametrize("every", [5, 3])
def test_auxk_with_the_screen_equals_the_fp32_path(monkeypatch, every):
    """With dead latents the screen selects the TopK and an fp32 GEMM over the dead columns
    the AuxK candidates, while the dead are at most d_sae / 4 (every 5th latent); with more
    (every 3rd) the whole encoder runs in fp32. Losses and gradients equal the fp32 path's."""
    sae, x = _sae(), _x()
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[::every] = True

    def run(flag):
        monkeypatch.setattr(SF, "_BF16_SCREEN", flag)
        SF._SCREEN_STATS.reset()
        out = sae(x, dead_mask=dead, k_aux=16)
        loss = out.fvu + out.auxk_loss
        return SF._SCREEN_STATS.rows, out, torch.autograd.grad(loss, list(sae.parameters()))

    screened_rows, got, got_grads = run(True)
    _, want, want_grads = run(False)
    assert screened_rows == (x.shape[0] if every == 5 else 0)
    assert got.auxk_loss > 0
    torch.testing.assert_close(got.auxk_loss, want.auxk_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.fvu, want.fvu, rtol=1e-5, atol=1e-7)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("change", ["in place", "data swapped", "bias in place"])
def test_screen_constants_follow_weight_updates(screen_on, change):
    """The bf16 copy of W_enc and the bound's norms are cached between calls; an in-place
    update (an optimizer step) or a ``.data`` swap must rebuild them, or the screen would
    pick candidates and certify them with the old weights."""
    sae, x = _sae(), _x()
    with torch.no_grad():
        sae.encode(x)  # fills the cache
        perm = torch.randperm(sae.d_sae, generator=torch.Generator().manual_seed(9))
        if change == "in place":
            sae.W_enc.mul_(torch.linspace(0.2, 3.0, sae.d_sae)[perm])
        elif change == "data swapped":
            sae.W_enc.data = (sae.W_enc.t()[perm] * 2.5).t()  # TopKSAE's layout kept
        else:
            sae.b_enc.copy_(3 * torch.randn(sae.d_sae, generator=torch.Generator().manual_seed(4)))
        acts = sae.encode(x)
        pre = pre_activations(x, sae.W_enc, sae.b_enc, sae.b_dec)
    _assert_exact_topk(acts, pre, sae.k)


@pytest.mark.parametrize(
    ("hardware", "d_sae", "expected"),
    [(True, 1024, True), (True, 1016, False), (False, 1024, False)],
)
@pytest.mark.parametrize("rows", [256, 255])
def test_automatic_choice_needs_bf16_hardware_d_sae_of_128_k_and_256_rows(
    monkeypatch, hardware, d_sae, expected, rows
):
    monkeypatch.setattr(SF, "_BF16_SCREEN", None)
    monkeypatch.setattr(SF, "_BF16_SCREEN_HARDWARE", hardware)
    got = SF._use_bf16_screen(torch.randn(rows, 48), torch.randn(48, d_sae), 8)
    assert got is (expected and rows >= 256)

"""TopK sparse-autoencoder math as pure tensor functions.

Design (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", §2–3 and
Appendix A; OpenAI's reference code ``sparse_autoencoder/train.py``):

    z  = TopK(ReLU(W_enc (x − b_dec) + b_enc))      kept as k (index, value) pairs
    x̂  = Σ_j z_j · W_dec[i_j] + b_dec

* ``z`` never exists as a dense ``[n, d_sae]`` matrix on the training path, and the
  pre-activations exist only in a scratch buffer: ``_TopKEncode`` computes them chunk by
  chunk of rows *without* autograd (TopK's selection is not differentiable) — a fresh
  16 MiB chunk per call, or inside ``reuse_encoder_buffer`` (``train_sae``) one buffer of
  up to 128 MiB kept from step to step — picks the top-k indices and their values from
  the chunk, and its backward touches only the selected columns of ``W_enc`` and
  entries of ``b_enc`` (``_scatter_rows``, ``index_add``). Only those k pre-activations
  carry gradient, so this is exact, and it replaces a dense ``[d_in, n] @ [n, d_sae]``
  matmul by n·k·d_in multiply-adds.
* On CPUs with bf16 arithmetic (AVX512-BF16, AMX) the selection is *screened*
  (``_screened_topk``): the GEMM runs in bf16 (half the time of fp32), the 2k largest
  bf16 pre-activations per row are recomputed exactly in fp32, and their top k is kept
  when a bound on bf16's rounding error certifies that no other latent can beat the k-th;
  rows it cannot certify are recomputed with the fp32 GEMM. The selection and values are
  the fp32 ones (up to fp32 rounding), not a bf16 approximation.
* Decoding goes through ``_SparseDecode``: the forward is ``embedding_bag`` (gather and
  weighted sum of k decoder rows without materializing them); the backward computes
  ``dW_dec`` with ``_scatter_rows`` (the (row, latent) pairs sorted by latent, then one
  weighted ``embedding_bag`` per latent — the same trick gives ``dW_enc``) and ``dz``
  with ATen's ``embedding_bag`` per-sample-weight kernel (a gather-dot, nothing
  materialized).
* Dense references (``topk_encode_dense``, ``dense_decode``) use plain autograd; the
  tests compare values and gradients of both paths.
* Losses: ``fvu`` (normalized MSE) and ``auxk_loss`` normalized the same way. Both take
  an optional ``all_reduce`` (sum over data-parallel ranks) so that each rank's loss is
  its share of the *global* batch's loss: summing gradients over ranks then gives
  exactly the single-process gradient.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "AllReduce",
    "TopKActivations",
    "auxk_loss",
    "dead_topk",
    "dense_decode",
    "fvu",
    "geometric_median",
    "pre_activations",
    "reuse_encoder_buffer",
    "sparse_decode",
    "topk_encode",
    "topk_encode_dense",
]

AllReduce = Callable[[Tensor], Tensor]
"""Sums a tensor over data-parallel ranks (returns a new tensor); identity when single."""

# Rows per chunk of the fallback gather-dot: a [chunk, k, d_in] fp32 temporary of ~2 MiB,
# so it stays in cache (measured fastest between 2**18 and 2**20 elements on 2 cores).
_CHUNK_ELEMENTS = 2**19
# Elements of the [rows, d_sae] pre-activation buffer of the fused encoder. A fresh buffer
# is 16 MiB in fp32: enough rows for an efficient GEMM, small enough for the allocator to
# reuse instead of mapping and page-faulting it afresh every call. Inside
# ``reuse_encoder_buffer`` (``train_sae``) one buffer of up to 128 MiB is kept and reused:
# a whole 4,096 × 4,608 batch in one GEMM and one TopK, ~10 ms (5 %) faster per step
# than five 16 MiB chunks (measured with steps of both interleaved in one run).
_ENCODE_CHUNK_ELEMENTS = 2**22
_REUSED_CHUNK_ELEMENTS = 2**25
# Strided column groups of the two-stage TopK (``_topk_rows``); measured best at 16.
_TOPK_GROUP = 16


class TopKActivations(NamedTuple):
    """Sparse latents: for each row, k latent ``indices`` and their (≥ 0) ``values``.

    Shapes are ``[*batch, k]``. ``values`` are post-ReLU, so a row has fewer than k
    non-zeros when fewer than k pre-activations are positive.
    """

    indices: Tensor
    values: Tensor

    def to_dense(self, d_sae: int) -> Tensor:
        """Scatter into a dense ``[*batch, d_sae]`` tensor."""
        dense = self.values.new_zeros((*self.values.shape[:-1], d_sae))
        return dense.scatter(-1, self.indices, self.values)


class _EncoderBuffer(threading.local):
    active: bool = False
    tensor: Tensor | None = None


_ENCODER_BUFFER = _EncoderBuffer()


@contextmanager
def reuse_encoder_buffer() -> Iterator[None]:
    """Within this block (per thread), the TopK encoder keeps its pre-activation buffer
    (up to ``_REUSED_CHUNK_ELEMENTS``, 128 MiB in fp32) from call to call instead of
    allocating one per call; it is released on exit. ``train_sae`` runs inside one."""
    buf = _ENCODER_BUFFER
    if buf.active:
        yield
        return
    buf.active = True
    try:
        yield
    finally:
        buf.active = False
        buf.tensor = None


def _encoder_buffer(rows: int, d: int, like: Tensor) -> Tensor:
    """A ``[rows, d]`` scratch tensor of ``like``'s dtype and device: fresh, or the reused
    one inside ``reuse_encoder_buffer``."""
    buf = _ENCODER_BUFFER
    if not buf.active:
        return like.new_empty(rows, d)
    t = buf.tensor
    if t is None or t.dtype != like.dtype or t.device != like.device or t.numel() < rows * d:
        buf.tensor = t = None  # free the old one first
        buf.tensor = t = like.new_empty(rows * d)
    return t[: rows * d].view(rows, d)


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Run a loop of many small, memory-bound ops on one intra-op thread.

    Each parallel op is a fork/join of the thread pool; with a few hundred chunk ops per
    backward that synchronization dominates, and on a machine whose cores are shared it
    costs up to a scheduler time slice per op (measured: 10× slower steps with 2 threads
    under load). One thread loses little on these memory-bound loops. The setting is
    restored on exit.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Elements per block of ``_blocks`` (4 MiB in fp32): the optimizer step, the decoder
# projection and its renormalization each make several passes over a block while it is in
# cache instead of several passes over the whole matrix through memory. Measured on the
# benchmark shape with steps of each size interleaved in one run: 2**20–2**22 equal, whole
# matrices 2–5 ms slower per step, 2**18 slower still with sleeping OpenMP threads
# (OMP_WAIT_POLICY=PASSIVE: every extra parallel op wakes them).
_BLOCK_ELEMENTS = 2**20


def _blocks(*tensors: Tensor, rows: bool = False) -> Iterator[tuple[Tensor, ...]]:
    """Matching blocks of same-shaped tensors that share one dense layout (row-major, or
    the transpose of a row-major matrix as ``TopKSAE.W_enc``): views into runs of
    ``_BLOCK_ELEMENTS`` elements of memory. ``rows=True`` keeps whole rows of row-major matrices together (for per-row
    operations); otherwise the blocks are flat runs (for elementwise ones). Tensors that
    do not share such a layout come back whole, as one block."""
    first = tensors[0]
    same = all(t.shape == first.shape and t.stride() == first.stride() for t in tensors)
    if rows:
        if not (same and first.dim() == 2 and first.is_contiguous()):
            yield tensors
            return
        step = max(1, _BLOCK_ELEMENTS // max(1, first.shape[1]))
        for s in range(0, first.shape[0], step):
            yield tuple(t[s : s + step] for t in tensors)
        return
    if same and first.is_contiguous():
        flat = [t.view(-1) for t in tensors]
    elif same and first.dim() == 2 and first.t().is_contiguous():
        flat = [t.t().view(-1) for t in tensors]
    else:
        yield tensors
        return
    for s in range(0, flat[0].numel(), _BLOCK_ELEMENTS):
        yield tuple(f[s : s + _BLOCK_ELEMENTS] for f in flat)


def _chunk_rows(k: int, d: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, k * d))


def _rows_dot(W: Tensor, indices: Tensor, vecs: Tensor) -> Tensor:
    """out[n, j] = W[indices[n, j]] · vecs[n], without materializing the gathered rows.

    This is exactly the per-sample-weight gradient of ``embedding_bag(mode="sum")``, so
    ATen's kernel for it is used (≈ 3× faster than a gather + multiply + sum on CPU);
    a chunked gather is the fallback if that private op is unavailable.
    """
    n, k = indices.shape
    flat = indices.reshape(-1)
    try:
        offsets = torch.arange(0, n * k, k, device=flat.device)
        offset2bag = torch.arange(n, device=flat.device).repeat_interleave(k)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            vecs.contiguous(), W, flat, offsets, offset2bag, 0, -1
        )
        return out.view(n, k)
    except (AttributeError, NotImplementedError, RuntimeError):
        return _rows_dot_reference(W, indices, vecs)


def _rows_dot_reference(W: Tensor, indices: Tensor, vecs: Tensor) -> Tensor:
    n, k = indices.shape
    d = W.shape[1]
    out = vecs.new_empty(n, k)
    step = _chunk_rows(k, d)
    with _one_intra_op_thread():
        for s in range(0, n, step):
            rows = W.index_select(0, indices[s : s + step].reshape(-1)).view(-1, k, d)
            out[s : s + step] = (rows * vecs[s : s + step, None, :]).sum(-1)
    return out


class _SortPlan(NamedTuple):
    """The (n, j) pairs of an ``[n, m]`` index matrix grouped by index value s: what
    ``_scatter_rows`` needs. The encoder and decoder backward of one TopK step scatter
    over the same indices, so ``TopKSAE.forward`` sorts once and both use the plan."""

    order: Tensor  # [n·m] flat positions, stably sorted by index value
    offsets: Tensor  # [n_rows + 1] start of each value's run in ``order``
    rows: Tensor  # [n·m] the row n of each sorted position (order // m)


def _sort_plan(indices: Tensor, n_rows: int) -> _SortPlan:
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    offsets = flat.new_zeros(n_rows + 1)
    torch.cumsum(torch.bincount(flat, minlength=n_rows), 0, out=offsets[1:])
    return _SortPlan(order, offsets, order // indices.shape[1])


def _scatter_rows(
    indices: Tensor, weights: Tensor, vecs: Tensor, n_rows: int, plan: _SortPlan | None = None
) -> Tensor:
    """out[s] = Σ_{(n,j): indices[n, j] = s} weights[n, j] · vecs[n], as ``[n_rows, d]``.

    The (n, j) pairs are sorted by row s once (a stable sort of n·k integers, or the
    given ``plan`` of the same ``indices``), and each output row is then one bag of
    ``embedding_bag(mode="sum")`` over ``vecs`` with per-sample weights: a gather and
    weighted sum per output row, written once. This is the transpose of the sparse
    decode, and measured ~5× faster on CPU than scattering with ``index_add`` (which
    writes every output row k·n/n_rows times). The summation order is fixed (ascending
    n), so the result is deterministic.
    """
    n, m = indices.shape
    d = vecs.shape[1]
    if n * m == 0:
        return vecs.new_zeros(n_rows, d)
    if plan is None:
        plan = _sort_plan(indices, n_rows)
    return F.embedding_bag(
        plan.rows,
        vecs,
        plan.offsets,
        mode="sum",
        per_sample_weights=weights.reshape(-1)[plan.order].to(vecs.dtype),
        include_last_offset=True,
    )


def _topk_rows(pre: Tensor, k: int, group: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-row top-k of a contiguous ``[rows, d]`` matrix: (values sorted descending, indices).

    Two stages when k ≪ d: split the columns into ``d / G`` strided groups of G
    (column c + j·d/G, j < G), take each group's maximum (a vectorized max over G rows of
    the ``[rows, G, d/G]`` view), keep the k groups with the largest maxima, and take the
    top k of their k·G members. Exact: those k group maxima are k distinct entries ≥ the
    k-th largest group maximum m, and every entry outside the kept groups is ≤ its
    group's maximum ≤ m, so the kept members hold a top-k multiset (ties may pick other,
    equal-valued indices than ``torch.topk``). ~20 % faster than ``torch.topk`` at
    d = 4608, k = 32; small or indivisible widths use ``torch.topk`` directly.
    """
    rows, d = pre.shape
    G = _TOPK_GROUP if group is None else group
    if G < 2 or d % G or d < 4 * k * G:
        top = pre.topk(k, dim=-1, sorted=True)
        return top.values, top.indices
    n_groups = d // G
    view = pre.view(rows, G, n_groups)
    groups = view.amax(1).topk(k, dim=-1, sorted=False).indices  # [rows, k]
    members = view.gather(2, groups[:, None, :].expand(rows, G, k))  # [rows, G, k]
    top = members.view(rows, G * k).topk(k, dim=-1, sorted=True)
    member, slot = top.indices // k, top.indices % k
    return top.values, member * n_groups + groups.gather(1, slot)


def _bf16_screen_hardware() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): a bf16 GEMM there
    takes about half the time of an fp32 one; elsewhere oneDNN emulates it, slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


# ``None``: screen wherever the CPU has bf16 arithmetic, d_sae ≥ 128 k and a call encodes
# ≥ 256 rows; True/False force it on or off (tests; the benchmark's ``--interp-encoder``).
_BF16_SCREEN: bool | None = None
_BF16_SCREEN_HARDWARE = _bf16_screen_hardware()
# The screen saves half the GEMM (∝ d_sae) and adds sparse work per row (∝ k). Measured on
# 2 cores: at d_sae = 144 k (the benchmark's 4,608 latents, k 32) a training step takes
# 157 ms screened against 191 ms; at d_sae = 72 k (the pipeline's --quick, 2,304 latents)
# the 64 training steps took 3.7 s against 3.1 s (half its rows needed a wider screen).
_SCREEN_MIN_WIDTH_PER_K = 128
# Rows per call: below this the screen saves a few ms at most, and after each weight update
# (training) rebuilding its constants costs 3–13 ms (a dozen small passes, each waking the
# sleeping OpenMP threads). Inference reuses them (``_bf16_screen``'s cache).
_SCREEN_MIN_ROWS = 256
# Candidates per row of the screen: k + k (the screen's error bound certified 96–100 % of
# the benchmark's rows in the first 60 training steps with 2k; with 1.5k, 51–91 %).
_SCREEN_EXTRA = 1.0
# Column groups of the screen's two-stage TopK over bf16 (measured best at 8 for 2k = 64).
_SCREEN_GROUP = 8
_BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8-bit significand)


def _use_bf16_screen(x: Tensor, W_enc: Tensor, k: int) -> bool:
    d_sae = W_enc.shape[1]
    if _BF16_SCREEN is None:
        enabled = (
            _BF16_SCREEN_HARDWARE
            and d_sae >= _SCREEN_MIN_WIDTH_PER_K * k
            and x.shape[0] >= _SCREEN_MIN_ROWS
        )
    else:
        enabled = _BF16_SCREEN
    return (
        enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and W_enc.dtype == torch.float32
        and k + math.ceil(_SCREEN_EXTRA * k) <= d_sae // 8
    )


class _Bf16Screen(NamedTuple):
    """Constants of ``_screened_topk`` for one state of the weights (``_bf16_screen``
    caches them): W_enc and b_enc in bf16 and the column terms of the error bound."""

    W: Tensor  # [d_in, d_sae] bf16
    b: Tensor  # [d_sae] bf16
    w_max: float  # max_j ‖W_enc[:, j]‖
    dw_max: float  # max_j ‖W_enc[:, j] − bf16(W_enc[:, j])‖
    b_max: float  # max_j |b_enc[j]|


class _ScreenCache(threading.local):
    key: tuple | None = None
    refs: tuple | None = None
    screen: _Bf16Screen | None = None


_SCREEN_CACHE = _ScreenCache()


def _state(t: Tensor) -> tuple:
    """What identifies a tensor's current values: its storage, layout and in-place version
    (``_version`` counts in-place writes; ``.data =`` changes the storage)."""
    return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)


def _bf16_screen(W_enc: Tensor, b_enc: Tensor) -> _Bf16Screen:
    """The screen's constants for these weights: computed once per weight update (an
    encoder used at inference, e.g. spliced into generation, reuses them call after call;
    building them costs a dozen small passes over W_enc)."""
    cache = _SCREEN_CACHE
    plain = (torch.Tensor, torch.nn.Parameter)
    if type(W_enc) not in plain or type(b_enc) not in plain:  # fake, traced, wrapped: no cache
        return _build_bf16_screen(W_enc, b_enc)
    key = (_state(W_enc), _state(b_enc))
    if (
        cache.key == key
        and cache.refs is not None
        and cache.refs[0]() is W_enc
        and cache.refs[1]() is b_enc
    ):
        assert cache.screen is not None
        return cache.screen
    screen = _build_bf16_screen(W_enc, b_enc)
    cache.key, cache.refs, cache.screen = key, (weakref.ref(W_enc), weakref.ref(b_enc)), screen
    return screen


def _build_bf16_screen(W_enc: Tensor, b_enc: Tensor) -> _Bf16Screen:
    W = W_enc.bfloat16()
    rows = W_enc.t()  # one latent per row (contiguous for TopKSAE's storage)
    dw = (rows - W.t().float()).norm(dim=1)
    return _Bf16Screen(
        W,
        b_enc.bfloat16(),
        float(rows.norm(dim=1).max()),
        float(dw.max()),
        float(b_enc.abs().max()),
    )


def _screened_topk(
    xc: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, screen: _Bf16Screen, buf: Tensor
) -> tuple[Tensor, Tensor]:
    """Exact fp32 TopK of ``xc @ W_enc + b_enc`` per row, with the dense GEMM in bf16.

    1. c = bf16(xc) @ bf16(W_enc) + bf16(b_enc) in bf16 (``buf``): half an fp32 GEMM's time
       on CPUs with bf16 arithmetic;
    2. the k + m largest c per row are the candidates, and T is the smallest of them: every
       other latent j has c_j ≤ T;
    3. the candidates' pre-activations v = xc · W_enc[:, j] + b_enc[j] are computed in fp32
       (``_rows_dot``), and the row's top k of them is the answer when it is *certified*:
       the k-th largest v exceeds the largest value any non-candidate can have,
           T + 2.05 u |T| + ‖Δx‖ max‖w_j‖ + ‖x̃‖ max‖Δw_j‖ + 2.05 u max|b_j| + γ ‖x̃‖ max‖w̃_j‖,
       a bound on |c_j − v_j| for every j (u = 2⁻⁸; Δx = x − bf16(x) and Δw likewise,
       the products' rounding by Cauchy–Schwarz; u |T| for rounding the output, twice if
       the bias is added after rounding; u |b| for rounding the bias; γ = 3.1 (d_in + 2)
       2⁻²⁴ for the fp32 accumulation of the bf16 GEMM, of the candidates' dot products
       and of the fp32 GEMM this replaces, in any summation order);
    4. the rows not certified (near-ties the bf16 screen cannot separate) go through
       steps 2–3 again with twice as many candidates (a lower T), as long as that is at
       most d_sae / 8 of them; the rest are recomputed with the fp32 GEMM.
    The selection is that of the fp32 pre-activations (up to the fp32 rounding any GEMM
    has) and the values are fp32 dot products. Returns (values sorted descending, indices).
    """
    rows, d_sae = xc.shape[0], W_enc.shape[1]
    u = _BF16_UNIT
    xb = xc.bfloat16()
    c = torch.addmm(screen.b, xb, screen.W, out=buf)
    x_norm = xb.float().norm(dim=1)
    dx_norm = (xc - xb.float()).norm(dim=1)
    accumulation = 3.1 * (xc.shape[1] + 2) * 2.0**-24  # three fp32 dot products' γ_d
    slack = (  # the bound's terms that do not depend on T
        dx_norm * screen.w_max
        + x_norm * (screen.dw_max + accumulation * (screen.w_max + screen.dw_max))
        + 2.05 * u * screen.b_max
    )
    W_rows = W_enc.t().contiguous()  # one latent per row (a view for TopKSAE's storage)
    values = xc.new_empty(rows, k)
    indices = torch.empty(rows, k, dtype=torch.long, device=xc.device)
    todo: Tensor | None = None  # rows still to certify; None: all of them
    width = k + math.ceil(_SCREEN_EXTRA * k)
    while True:
        cand_c, cand = _topk_rows(_take(c, todo), width, group=_SCREEN_GROUP)
        exact = _rows_dot(W_rows, cand, _take(xc, todo)).add_(b_enc[cand])
        top = exact.topk(k, dim=-1, sorted=True)
        T = cand_c[:, -1].float()
        certified = T + 2.05 * u * T.abs() + _take(slack, todo) < top.values[:, -1]
        done = certified.nonzero().squeeze(1)
        at = done if todo is None else todo[done]
        values.index_copy_(0, at, top.values.index_select(0, done))
        indices.index_copy_(0, at, cand.gather(1, top.indices).index_select(0, done))
        left = (~certified).nonzero().squeeze(1)
        todo = left if todo is None else todo[left]
        width *= 2
        if todo.numel() == 0 or width > d_sae // 8:
            break
        _SCREEN_STATS.widened += int(todo.numel())
    if todo.numel():
        pre = torch.addmm(b_enc, xc.index_select(0, todo), W_enc)
        values[todo], indices[todo] = _topk_rows(pre, k)
    _SCREEN_STATS.rows += rows
    _SCREEN_STATS.redone += int(todo.numel())
    return values, indices


def _take(t: Tensor, rows: Tensor | None) -> Tensor:
    return t if rows is None else t.index_select(0, rows)


class _ScreenStats(threading.local):
    rows: int = 0  # rows screened
    widened: int = 0  # rows screened again with more candidates (counted per widening)
    redone: int = 0  # rows recomputed with the fp32 GEMM

    def reset(self) -> None:
        self.rows = self.widened = self.redone = 0


_SCREEN_STATS = _ScreenStats()


def _small_dead_set(dead: Tensor | None, d_sae: int) -> bool:
    """Whether the AuxK work over these dead latents is done densely over their columns
    (at most d_sae / 4 of them) rather than by sparse gathers per token."""
    return dead is not None and 4 * dead.numel() <= d_sae


def _dead_positions(dead: Tensor, d_sae: int) -> Tensor:
    """``[d_sae]`` map from a latent to its column among ``dead`` (−1 for the others)."""
    where = torch.full((d_sae,), -1, dtype=torch.long, device=dead.device)
    where[dead] = torch.arange(dead.numel(), device=dead.device)
    return where


def _dead_indices(dead_mask: Tensor | None, k_aux: int) -> Tensor | None:
    """The dead latents' indices, or None when there is no AuxK set (no mask, none dead,
    or ``k_aux`` 0)."""
    if dead_mask is None or k_aux <= 0:
        return None
    dead = dead_mask.nonzero().squeeze(1)
    return dead if dead.numel() else None


class _TopKEncode(torch.autograd.Function):
    """Fused encode + TopK: pre-activation values at the selected latents, sparse backward.

    Forward (no autograd inside): for each chunk of rows, pre = (x − b_dec) W_enc + b_enc
    into a ``[chunk, d_sae]`` scratch buffer, then TopK (and the AuxK candidates among
    ``dead`` latents) on it. A fresh buffer is 16 MiB at most: a fresh 75 MB output for
    the benchmark shape (n 4096, d_sae 4608) once cost ~110 ms per step in page faults
    and memory traffic. Inside ``reuse_encoder_buffer`` (``train_sae``) one buffer of up
    to 128 MiB is kept instead, and the whole benchmark batch is one GEMM and one TopK
    (fewer, larger calls: ~10 ms faster per step than five chunks). Where
    ``_use_bf16_screen`` allows, the buffer holds bf16 pre-activations and the TopK is
    ``_screened_topk`` (exact), and the AuxK candidates come from an fp32 GEMM over the
    dead columns alone (while at most d_sae / 4 are dead).
    Returns the pre-ReLU ``values`` ``[n, k + k_sel]`` and their ``indices``. With
    ``plan_out`` (a list) the sort plan of the indices for the backward is made here and
    appended to it, for the decoder's backward to reuse.

    Backward uses only the selected positions: with g = ∂L/∂values,
        ∂L/∂W_enc[:, s] = Σ_{(n,j): i_nj = s} g_nj (x_n − b_dec)     (``_scatter_rows``)
        ∂L/∂b_enc[s]    = Σ_{(n,j): i_nj = s} g_nj                    (index_add)
        ∂L/∂b_dec       = −W_enc ∂L/∂b_enc                            (OpenAI's trick)
        ∂L/∂x_n         = Σ_j g_nj W_enc[:, i_nj]                     (embedding_bag)
    With at most d_sae / 4 dead latents the AuxK columns' share is taken densely instead:
    their g scattered into ``[n, #dead]``, then small GEMMs with the dead columns.
    """

    @staticmethod
    def forward(ctx: Any, x, b_dec, W_enc, b_enc, k, dead, k_aux, plan_out=None):
        n = x.shape[0]
        d_sae = W_enc.shape[1]
        k_sel = 0 if dead is None else min(k_aux, int(dead.numel()))
        width = k + k_sel
        values = x.new_empty(n, width)
        indices = torch.empty(n, width, dtype=torch.long, device=x.device)
        elements = _REUSED_CHUNK_ELEMENTS if _ENCODER_BUFFER.active else _ENCODE_CHUNK_ELEMENTS
        max_rows = max(1, elements // d_sae)
        rows = max(1, -(-n // -(-n // max_rows))) if n else 1  # equal chunks ≤ max_rows
        # The bf16 screen selects the TopK; the AuxK candidates (dead latents only) then
        # come from an fp32 GEMM over the dead columns, which pays while they are ≤ 1/4.
        screened = _use_bf16_screen(x, W_enc, k) and (not k_sel or _small_dead_set(dead, d_sae))
        screen = _bf16_screen(W_enc, b_enc) if screened else None
        if screen is not None and k_sel:
            W_dead, b_dead = W_enc.index_select(1, dead), b_enc.index_select(0, dead)
        buf_dtype = torch.bfloat16 if screen is not None else x.dtype
        buf = _encoder_buffer(rows, d_sae, x.new_empty(0, dtype=buf_dtype))
        centered = x - b_dec  # once: every chunk's GEMM and the W_enc gradient read it
        for s in range(0, n, rows):
            xc = centered[s : s + rows]
            if screen is not None:
                values[s : s + rows, :k], indices[s : s + rows, :k] = _screened_topk(
                    xc, W_enc, b_enc, k, screen, buf[: xc.shape[0]]
                )
                pre_dead = torch.addmm(b_dead, xc, W_dead) if k_sel else None
            else:
                pre = torch.addmm(b_enc, xc, W_enc, out=buf[: xc.shape[0]])
                values[s : s + rows, :k], indices[s : s + rows, :k] = _topk_rows(pre, k)
                pre_dead = pre.index_select(1, dead) if k_sel else None
            if pre_dead is not None and k_sel == dead.numel():  # every dead latent
                values[s : s + rows, k:] = pre_dead
                indices[s : s + rows, k:] = dead
            elif pre_dead is not None:
                aux = pre_dead.topk(k_sel, dim=-1, sorted=False)
                values[s : s + rows, k:] = aux.values
                indices[s : s + rows, k:] = dead[aux.indices]
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(centered, W_enc, indices)
        # A small dead set (≤ d_sae / 4): the backward takes the AuxK columns densely over
        # the dead latents, and the sparse part (and its sort plan, shared with the
        # decoder) covers the k TopK columns only.
        ctx.k = k
        ctx.dead = dead if k_sel and _small_dead_set(dead, d_sae) else None
        ctx.plan = None
        if plan_out is not None:
            ctx.plan = _sort_plan(indices if ctx.dead is None else indices[:, :k], d_sae)
            plan_out.append(ctx.plan)
        return values, indices

    @staticmethod
    def backward(ctx: Any, grad, _grad_indices):
        centered, W_enc, indices = ctx.saved_tensors
        need_x, need_b_dec, need_W, need_b_enc = ctx.needs_input_grad[:4]
        grad_x = grad_b_dec = grad_W = grad_b_enc = None
        d_sae, dead = W_enc.shape[1], ctx.dead
        grad = grad.contiguous()
        G = None  # the AuxK columns' gradient, dense over the dead latents: [n, #dead]
        if dead is not None:
            aux_at = _dead_positions(dead, d_sae)[indices[:, ctx.k :]]
            G = grad.new_zeros(grad.shape[0], dead.numel()).scatter_(1, aux_at, grad[:, ctx.k :])
            indices, grad = indices[:, : ctx.k], grad[:, : ctx.k].contiguous()
        if need_b_enc or need_b_dec:
            grad_b_enc = W_enc.new_zeros(d_sae).index_add_(0, indices.reshape(-1), grad.reshape(-1))
            if G is not None:
                grad_b_enc.index_add_(0, dead, G.sum(0))
        if need_b_dec:
            grad_b_dec = -(W_enc @ grad_b_enc)
        if need_W:
            # Built as the transpose [d_sae, d_in]: whole contiguous rows per latent, and
            # already the strides of TopKSAE's row-major W_enc storage.
            rows = _scatter_rows(indices, grad, centered, d_sae, ctx.plan)
            if G is not None:
                rows.index_add_(0, dead, G.t() @ centered)
            grad_W = rows.t()
        if need_x:
            W_rows = W_enc.t().contiguous()
            grad_x = F.embedding_bag(indices, W_rows, per_sample_weights=grad, mode="sum")
            if G is not None:
                grad_x = grad_x + G @ W_rows.index_select(0, dead)
        return grad_x, grad_b_dec, grad_W, grad_b_enc, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """out[n] = Σ_j values[n, j] · W_dec[indices[n, j]] with a backward over the k rows only.

    Backward with G = ∂L/∂out:
        ∂L/∂W_dec[s]       = Σ_{(n,j): i_nj = s} values_nj G_n        (``_scatter_rows``)
        ∂L/∂values[n, j]   = W_dec[i_nj] · G_n                        (``_rows_dot``)
    """

    @staticmethod
    def forward(ctx: Any, indices, values, W_dec, plan=None):
        ctx.save_for_backward(indices, values, W_dec)
        ctx.plan = plan
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad_out):
        indices, values, W_dec = ctx.saved_tensors
        need_values, need_W = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_values = _rows_dot(W_dec, indices, grad_out) if need_values else None
        grad_W = None
        if need_W:
            grad_W = _scatter_rows(indices, values, grad_out.contiguous(), W_dec.shape[0], ctx.plan)
        return None, grad_values, grad_W, None


def pre_activations(
    x: Float[Tensor, "*batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    b_dec: Float[Tensor, " d_in"],
) -> Float[Tensor, "*batch d_sae"]:
    """Dense pre-activations W_enc (x − b_dec) + b_enc (differentiable)."""
    return (x - b_dec) @ W_enc + b_enc


def _flatten(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def dead_topk(
    pre: Float[Tensor, "n d_sae"],
    dead_mask: Bool[Tensor, " d_sae"],
    k_aux: int,
) -> Int[Tensor, "n k_sel"]:
    """Indices of the top ``min(k_aux, #dead)`` pre-activations among dead latents only.

    Restricting the candidate set (instead of masking alive latents to 0 as OpenAI's
    ``auxk_mask_fn`` does) means an alive latent can never enter the AuxK term.
    """
    dead = dead_mask.nonzero().squeeze(1)
    k_sel = min(k_aux, int(dead.numel()))
    local = pre.index_select(1, dead).topk(k_sel, dim=-1, sorted=False).indices
    return dead[local]


def topk_encode(
    x: Float[Tensor, "*batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    b_dec: Float[Tensor, " d_in"],
    k: int,
) -> TopKActivations:
    """Sparse TopK encoding with a sparse backward (see module docstring)."""
    acts, _ = _topk_encode_with_aux(x, W_enc, b_enc, b_dec, k)
    return acts


def _topk_encode_with_aux(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[TopKActivations, TopKActivations | None]:
    """TopK latents plus (when some latent is dead) the AuxK latents, in one sparse gather.

    Both index sets come out of one fused ``_TopKEncode`` (one pass over the
    pre-activations, one sparse pass in the backward, as in OpenAI's ``EncWrapper``).
    """
    dead = _dead_indices(dead_mask, k_aux)
    acts, aux, _ = _topk_encode_planned(x, W_enc, b_enc, b_dec, k, dead, k_aux)
    return acts, aux


def _topk_encode_planned(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[TopKActivations, TopKActivations | None, _SortPlan | None]:
    """``_topk_encode_with_aux`` with the dead latents given as indices (``_dead_indices``:
    None, or a non-empty set), plus, when gradients will reach W_enc and there is no AuxK
    set or a small one (at most d_sae / 4 dead latents), the sort plan of the TopK indices,
    for ``_sparse_decode(..., plan=)`` to reuse in the decoder's backward (one sort per
    training step instead of two)."""
    if not 1 <= k <= W_enc.shape[1]:
        raise ValueError(f"k must be in [1, d_sae={W_enc.shape[1]}], got {k}")
    flat, lead = _flatten(x)
    small_dead = dead is None or _small_dead_set(dead, W_enc.shape[1])
    share = small_dead and torch.is_grad_enabled() and W_enc.requires_grad
    plan_out: list[_SortPlan] | None = [] if share else None
    values, indices = _TopKEncode.apply(flat, b_dec, W_enc, b_enc, k, dead, k_aux, plan_out)
    values = values.relu()
    acts = TopKActivations(indices[:, :k].reshape(*lead, k), values[:, :k].reshape(*lead, k))
    if dead is None:
        return acts, None, plan_out[0] if plan_out else None
    k_sel = indices.shape[1] - k
    aux = TopKActivations(indices[:, k:].reshape(*lead, k_sel), values[:, k:].reshape(*lead, k_sel))
    return acts, aux, plan_out[0] if plan_out else None


def topk_encode_dense(
    x: Float[Tensor, "*batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    b_dec: Float[Tensor, " d_in"],
    k: int,
) -> Float[Tensor, "*batch d_sae"]:
    """Reference dense TopK encoding with plain autograd (SAELens's semantics)."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def sparse_decode(
    indices: Int[Tensor, "*batch k"],
    values: Float[Tensor, "*batch k"],
    W_dec: Float[Tensor, "d_sae d_in"],
    b_dec: Float[Tensor, " d_in"] | None = None,
) -> Float[Tensor, "*batch d_in"]:
    """Σ_j values_j · W_dec[indices_j] (+ b_dec), touching only the k selected rows."""
    return _sparse_decode(indices, values, W_dec, b_dec)


def _sparse_decode(
    indices: Tensor,
    values: Tensor,
    W_dec: Tensor,
    b_dec: Tensor | None = None,
    plan: _SortPlan | None = None,
) -> Tensor:
    """``sparse_decode`` with an optional sort plan of ``indices`` (flattened to 2-D) for
    the backward (from ``_topk_encode_planned``)."""
    lead = tuple(indices.shape[:-1])
    k = indices.shape[-1]
    if k == 0:
        out = W_dec.new_zeros((*lead, W_dec.shape[1]))
    else:
        flat_values = values.reshape(-1, k).to(W_dec.dtype)
        out = _SparseDecode.apply(indices.reshape(-1, k), flat_values, W_dec, plan)
        out = out.reshape(*lead, W_dec.shape[1])
    return out if b_dec is None else out + b_dec


def dense_decode(
    z: Float[Tensor, "*batch d_sae"],
    W_dec: Float[Tensor, "d_sae d_in"],
    b_dec: Float[Tensor, " d_in"] | None = None,
) -> Float[Tensor, "*batch d_in"]:
    """Reference dense decode z W_dec (+ b_dec)."""
    out = z @ W_dec
    return out if b_dec is None else out + b_dec


def _sum_sq_deviation(x: Tensor, all_reduce: AllReduce | None) -> Tensor:
    """Σ ‖x_n − mean(x)‖² over the (global) batch, with the mean taken first for stability."""
    if all_reduce is None:
        return (x - x.mean(0)).pow(2).sum()
    count = all_reduce(x.new_tensor(float(x.shape[0])))
    mean = all_reduce(x.sum(0)) / count
    return all_reduce((x - mean).pow(2).sum())


class _SumSquaredError(torch.autograd.Function):
    """Σ (x̂ − x)² that saves the difference: the backward is one multiplication, where
    plain autograd's makes three passes (two products and a negation). Values and
    gradients are bit-identical to ``(x - x_hat).pow(2).sum()``."""

    @staticmethod
    def forward(ctx: Any, x, x_hat):
        diff = x_hat - x
        ctx.save_for_backward(diff)
        return diff.pow(2).sum()  # not a BLAS dot: its error is ~200× the pairwise sum's

    @staticmethod
    def backward(ctx: Any, grad):
        (diff,) = ctx.saved_tensors
        need_x, need_x_hat = ctx.needs_input_grad
        grad_x_hat = diff * (2 * grad)
        return (-grad_x_hat if need_x else None), (grad_x_hat if need_x_hat else None)


def _sum_squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
    if x.dtype in (torch.float32, torch.float64) and x.dtype == x_hat.dtype:
        return _SumSquaredError.apply(x, x_hat)
    return (x - x_hat).pow(2).sum()  # reduced precision: sum's float accumulator


def fvu(
    x: Float[Tensor, "n d_in"],
    x_hat: Float[Tensor, "n d_in"],
    *,
    all_reduce: AllReduce | None = None,
) -> Float[Tensor, ""]:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean_batch(x)‖².

    With ``all_reduce`` (data parallel) the denominator is the global batch's and the
    result is this rank's share, so the ranks' values sum to the global FVU.
    """
    denom = _sum_sq_deviation(x.detach(), all_reduce)
    return _sum_squared_error(x, x_hat) / denom.clamp_min(torch.finfo(x.dtype).tiny)


def auxk_loss(
    x: Float[Tensor, "n d_in"],
    x_hat: Float[Tensor, "n d_in"],
    aux: TopKActivations | None,
    W_dec: Float[Tensor, "d_sae d_in"],
    *,
    all_reduce: AllReduce | None = None,
) -> Float[Tensor, ""]:
    """AuxK loss (Gao et al. 2024, §2.4 / Appendix A.2).

    e = x − x̂ (detached) is the residual of the main TopK reconstruction; ê decodes the
    top-k_aux *dead* latents without b_dec (b_dec is already inside x̂). The loss
    ‖e − ê‖² is normalized by Σ‖e − mean(e)‖², like FVU. It is exactly 0 when no latent
    is dead (``aux`` is None or has no columns).
    """
    return _auxk_loss(x, x_hat, aux, W_dec, all_reduce=all_reduce)


def _auxk_loss(
    x: Tensor,
    x_hat: Tensor,
    aux: TopKActivations | None,
    W_dec: Tensor,
    *,
    all_reduce: AllReduce | None = None,
    dead: Tensor | None = None,
) -> Tensor:
    """``auxk_loss``; with ``dead``, the sorted indices of the dead latents that
    ``aux.indices`` were drawn from (``TopKSAE.forward``), a small dead set is decoded
    densely: the aux values scattered into ``[n, #dead]`` times ``W_dec[dead]``, three
    small GEMMs with the backward, instead of gathering k_aux decoder rows per token (at
    ~100 dead of 4,608 latents the gathers were ~3× the GEMMs' time)."""
    if aux is None or aux.indices.shape[-1] == 0:
        return x.new_zeros(())
    residual = (x - x_hat).detach()
    n_sae = W_dec.shape[0]
    if _small_dead_set(dead, n_sae) and aux.indices.dim() == 2:
        assert dead is not None
        z = aux.values.new_zeros(aux.values.shape[0], dead.numel())
        z = z.scatter(1, _dead_positions(dead, n_sae)[aux.indices], aux.values.to(z.dtype))
        e_hat = z.to(W_dec.dtype) @ W_dec.index_select(0, dead)
    else:
        e_hat = sparse_decode(aux.indices, aux.values, W_dec)
    return fvu(residual, e_hat, all_reduce=all_reduce)


def geometric_median(
    points: Float[Tensor, "n d"],
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    eps: float = 1e-8,
) -> Float[Tensor, " d"]:
    """Geometric median by Weiszfeld's iterations, used to initialize b_dec.

    Gao et al. (2024, Appendix A.1) and Bricken et al. (2023) start b_dec at the
    geometric median of a data sample, which is robust to outliers where the mean is not.
    ``eps`` keeps a point that coincides with the iterate from dividing by zero.
    """
    dtype = points.dtype
    points = points.double()
    median = points.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * max(1.0, float(median.norm())):
            break
    return median.to(dtype)

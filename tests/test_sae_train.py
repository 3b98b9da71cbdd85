"""Trainer: constraints each step, resume == uninterrupted, NaN stop, fp32 state, dead-latent
handling, held-out eval, ground-truth recovery, and 2-process data parallel == single process."""

from __future__ import annotations

import itertools
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from interp.sae import SAETrainConfig, TopKSAE, default_lr, evaluate, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n_batches=6, batch=32, d_in=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g) * 2 + 1).to(dtype) for _ in range(n_batches)]


def _sae(d_in=8, d_sae=32, k=4, seed=0, init="gao"):
    return TopKSAE(d_in, d_sae, k, generator=torch.Generator().manual_seed(seed), init=init)


# Most tests here check the trainer's mechanics with Adam (its moments, unit-norm decoder rows
# after every step); the default, schedule-free SignSGD, is covered in test_sae_optim.py and by
# the parametrized resume / DDP / recovery tests below.
QUICK = dict(warmup_steps=2, progress=False, lr=1e-2, optimizer="adam")


def test_train_config_validation():
    with pytest.raises(ValueError, match="lr must be > 0"):
        SAETrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="decay_steps needs max_steps"):
        SAETrainConfig(decay_steps=10)
    with pytest.raises(ValueError, match="dead_tokens must be ≥ 1"):
        SAETrainConfig(dead_tokens=0)
    with pytest.raises(ValueError, match="betas"):
        SAETrainConfig(betas=(0.9, 1.0))
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(2**16) == pytest.approx(1e-4)


def test_history_metrics_and_warmup():
    sae = _sae()
    result = train_sae(sae, _batches(), warmup_steps=4, lr=1e-3, optimizer="adam", progress=False)
    assert result.steps == 6 and result.tokens == 6 * 32
    h = result.history
    assert [m.step for m in h] == list(range(1, 7))
    assert [m.lr for m in h[:5]] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert all(0 < m.l0 <= 4 and 0 <= m.dead_fraction <= 1 and m.fvu > 0 for m in h)
    assert all(m.auxk_loss == 0.0 for m in h)  # 10M-token default: nothing can be dead yet
    assert h[-1].fvu < h[0].fvu


@settings(max_examples=5)
@given(st.integers(2, 12), st.integers(8, 40), st.integers(0, 1000))
def test_decoder_rows_unit_norm_after_every_step(d_in, d_sae, seed):
    sae = _sae(d_in, d_sae, min(3, d_sae), seed)
    norms = []
    train_sae(
        sae,
        _batches(4, 16, d_in, seed),
        on_step=lambda m: norms.append(sae.W_dec.detach().norm(dim=1).clone()),
        dead_tokens=16,
        **QUICK,
    )
    assert len(norms) == 4
    for n in norms:
        torch.testing.assert_close(n, torch.ones(d_sae), atol=1e-5, rtol=0)


def test_first_step_sets_b_dec_to_geometric_median():
    from interp.sae import geometric_median

    batches = _batches()
    sae = _sae()
    seen = []
    train_sae(
        sae,
        batches[:1],
        max_steps=1,
        on_step=lambda m: seen.append(sae.b_dec.detach().clone()),
        lr=1e-12,
        progress=False,
    )
    # With a negligible lr, b_dec after one step is (almost) the median of the first batch.
    torch.testing.assert_close(seen[0], geometric_median(batches[0]), atol=1e-4, rtol=0)


class _Crash(RuntimeError):
    pass


def _crashing(batches, at):
    for i, b in enumerate(batches):
        if i == at:
            raise _Crash(f"simulated crash before batch {i}")
        yield b


@pytest.mark.parametrize(("optimizer", "dead_tokens"), [("adam", 40), ("signsgd", 20)])
def test_resume_matches_uninterrupted_run(tmp_path, optimizer, dead_tokens):
    batches = _batches(n_batches=9)
    cfg = SAETrainConfig(
        dead_tokens=dead_tokens,
        resample_every=4,
        checkpoint_every=2,
        **{**QUICK, "optimizer": optimizer},
    )

    ref = train_sae(_sae(), batches, cfg)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Crash):
        train_sae(_sae(), _crashing(batches, at=7), cfg, checkpoint_dir=ckpt)
    assert (ckpt / "checkpoint.pt").exists()
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]  # atomic writes
    # A fresh SAE with a *different* init: everything must come from the checkpoint.
    resumed = train_sae(_sae(seed=123), batches, cfg, checkpoint_dir=ckpt)

    assert resumed.steps == ref.steps == 9
    assert [m.step for m in resumed.history] == list(range(1, 10))
    for name, p in ref.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], p, atol=0, rtol=0)
    assert resumed.history == ref.history
    # The run exercised both dead-latent strategies.
    assert any(m.auxk_loss > 0 for m in ref.history)


def test_resume_rejects_mismatched_sae(tmp_path):
    train_sae(_sae(), _batches(2), checkpoint_dir=tmp_path, **QUICK)
    with pytest.raises(ValueError, match="d_sae=32"):
        train_sae(_sae(d_sae=16), _batches(2), checkpoint_dir=tmp_path, **QUICK)


def test_nan_stops_with_clear_message():
    batches = _batches(4)
    batches[2][3, 1] = float("nan")
    sae = _sae()
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss at step 2.*input batch contains NaN"
    ):
        train_sae(sae, batches, **QUICK)
    assert all(torch.isfinite(p).all() for p in sae.parameters())  # no update applied
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        train_sae(_sae(), [torch.full((8, 8), float("inf"))], init_b_dec=False, **QUICK)


def test_bf16_batches_keep_fp32_params_and_optimizer_state(tmp_path):
    sae = _sae()
    result = train_sae(sae, _batches(dtype=torch.bfloat16), checkpoint_dir=tmp_path, **QUICK)
    assert all(p.dtype == torch.float32 for p in result.sae.parameters())
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    moments = [t for s in state.values() for k, t in s.items() if k.startswith("exp_avg")]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    with pytest.raises(TypeError, match="float32"):
        train_sae(_sae().to(torch.float64), _batches(1), **QUICK)


def test_auxk_engages_only_with_dead_latents():
    batches = _batches(8)
    quiet = train_sae(_sae(d_sae=64, k=2), batches, dead_tokens=10**9, **QUICK)
    assert all(m.auxk_loss == 0.0 and m.dead_fraction == 0.0 for m in quiet.history)
    noisy = train_sae(_sae(d_sae=64, k=2), batches, dead_tokens=32, **QUICK)
    assert any(m.dead_fraction > 0 for m in noisy.history)
    assert all(
        (m.auxk_loss > 0) == (prev.dead_fraction > 0)
        for prev, m in itertools.pairwise(noisy.history)
    )


def test_resampling_replaces_dead_decoder_rows():
    batches = _batches(4)
    sae = _sae(d_sae=64, k=2)
    before = sae.W_dec.detach().clone()
    result = train_sae(sae, batches, dead_tokens=32, resample_every=2, auxk_alpha=0.0, **QUICK)
    # Resampled rows are unit residual directions; they differ from the tied init.
    changed = (sae.W_dec.detach() - before).norm(dim=1) > 0.5
    assert bool(changed.any())
    assert result.history[1].dead_fraction == 0.0  # counters reset at the resampling step
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=1), torch.ones(64), atol=1e-5, rtol=0)


def test_evaluate_matches_direct_computation():
    sae = _sae()
    train_sae(sae, _batches(), **QUICK)
    held = _batches(3, batch=20, seed=9)
    metrics = evaluate(sae, held)
    x = torch.cat(held)
    x_hat = sae(x).x_hat.detach()
    expected = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert metrics.fvu == pytest.approx(expected, rel=1e-5)
    assert metrics.n_tokens == 60
    assert metrics.mse == pytest.approx(float(((x - x_hat) ** 2).sum() / 60), rel=1e-5)
    assert 0 < metrics.l0 <= 4 and 0 <= metrics.dead_fraction < 1


# ---- ground truth ---------------------------------------------------------------------------


def _dictionary_batches(D, s, n_batches, batch, g):
    n_true = D.shape[0]
    for _ in range(n_batches):
        idx = torch.rand(batch, n_true, generator=g).argsort(dim=1)[:, :s]
        coeff = torch.zeros(batch, n_true).scatter(1, idx, torch.rand(batch, s, generator=g) + 0.5)
        yield coeff @ D


@settings(max_examples=3)
@given(st.integers(8, 24), st.integers(8, 24), st.integers(1, 3), st.integers(0, 10_000))
def test_training_recovers_a_known_sparse_dictionary(d_in, n_true, s, seed):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_true, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    state = g.get_state()
    # Adam (Gao init) at a set lr, and the defaults: schedule-free SignSGD, sparsify init. The
    # defaults' lr (sparsify's 5e-3 * sqrt(2**14 / d_sae)) is 0.1-0.2 at these tiny widths; one
    # generated case (d_in 8, 8 features, s 1, seed 3) ends with 7 of 8 recovered.
    for init, kwargs, bar in (
        ("gao", {"optimizer": "adam", "lr": 1e-2, "warmup_steps": 10}, 0.9),
        (None, {}, 0.85),
    ):
        g.set_state(state)
        gen = torch.Generator().manual_seed(seed)
        sae = TopKSAE(d_in, 2 * n_true, s, generator=gen, **({"init": init} if init else {}))
        batches = _dictionary_batches(D, s, 150, 256, g)
        out = train_sae(sae, batches, dead_tokens=256 * 20, progress=False, **kwargs).sae
        # SignSGD returns the average of unit-norm iterates: compare directions
        W = out.W_dec.detach()
        cos = D @ (W / W.norm(dim=1, keepdim=True)).t()
        recovered = (cos.max(dim=1).values >= 0.9).float().mean().item()
        assert recovered >= bar, f"{kwargs}: only {recovered:.0%} of {n_true} features recovered"


# ---- data parallel ----------------------------------------------------------------------------

_DP_CFG = dict(dead_tokens=48, resample_every=3, warmup_steps=2, progress=False, lr=1e-2)


def _dp_worker(rank: int, world: int, store: str, out_dir: str, optimizer: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        global_batches = _batches(n_batches=6, batch=32)
        shard = [b.chunk(world)[rank] for b in global_batches]  # equal shards of each batch
        # Rank 1 starts from another init: train_sae must broadcast rank 0's parameters.
        result = train_sae(_sae(d_sae=64, k=2, seed=rank), shard, optimizer=optimizer, **_DP_CFG)
        torch.save(
            {"state": result.sae.state_dict(), "history": [list(m) for m in result.history]},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["adam", "signsgd"])
def test_data_parallel_two_processes_match_single_process(tmp_path, optimizer):
    single = train_sae(
        _sae(d_sae=64, k=2), _batches(n_batches=6, batch=32), optimizer=optimizer, **_DP_CFG
    )
    # fork skips re-importing torch in the children (seconds each on a busy 2-core box);
    # the workers drop to one intra-op thread first. Python ≥ 3.12 warns about fork in a
    # multi-threaded process, so there we pay for spawn.
    method = "fork" if sys.version_info < (3, 12) and sys.platform == "linux" else "spawn"
    mp.start_processes(
        _dp_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path), optimizer),
        nprocs=2,
        join=True,
        start_method=method,
    )
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, p in single.sae.state_dict().items():
            torch.testing.assert_close(out["state"][name], p, atol=1e-5, rtol=1e-4)
        for got, want in zip(out["history"], single.history, strict=True):
            assert got[:2] == [want.step, want.tokens]  # tokens are global
            assert got[3] == pytest.approx(want.fvu, rel=1e-4)
            assert got[6] == pytest.approx(want.dead_fraction)
    assert any(m.auxk_loss > 0 for m in single.history), "DP test should exercise AuxK"
    assert not math.isnan(single.history[-1].fvu)

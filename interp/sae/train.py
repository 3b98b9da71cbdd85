"""Training loop for ``TopKSAE`` over any iterable of activation batches.

One function, ``train_sae``, reads top to bottom; each step does, in order:

1. cast the batch to fp32 (parameters and Adam state stay fp32 whatever comes in);
2. on the very first step, set b_dec to the geometric median of the batch
   (Gao et al. 2024, Appendix A.1);
3. with schedule-free SignSGD, renormalize the decoder rows to unit norm (sparsify's
   order: before each forward, so the average x that is returned is not shifted by one
   last renormalization of the iterate y; Adam renormalizes after its step instead);
   forward: FVU + α·AuxK, where AuxK uses the latents that have not fired for
   ``dead_tokens`` tokens (Gao et al. 2024, §2.4; α = 1/32, k_aux = d_in // 2);
4. stop with ``FloatingPointError`` if the loss is not finite (nothing is updated);
5. backward, sum gradients over data-parallel ranks, remove the decoder-gradient
   component parallel to each decoder row, clip the global gradient norm (Adam only: a
   sign step is unchanged by rescaling), optimizer step (Adam, or schedule-free SignSGD),
   with Adam renormalize decoder rows to unit norm (Appendix A.1);
6. update the per-latent "tokens since fired" counters; optionally resample dead
   latents (Bricken et al. 2023) as an alternative to AuxK;
7. record ``StepMetrics`` (FVU, L0, dead fraction, AuxK) and checkpoint atomically.

Optimizer (``optimizer=``): ``"signsgd"`` (default): sparsify's default, schedule-free
SignSGD (``interp.sae.optim``) with lr 5e-3 / sqrt(d_sae / 2**14), momentum 0.95 and no
warm-up; or ``"adam"`` with lr 2e-4 / sqrt(d_sae / 2**14) (the 1/√d_sae scaling of Gao et
al. 2024 as used by ``sparsify``), 1,000 warm-up steps, optional linear decay at the end,
eps 6.25e-10 (Gao et al. 2024, Appendix A). SignSGD is the default because it reaches a
lower held-out FVU per token: 0.302 vs 0.710 (Adam, same init) after 74k tokens and 0.207
vs 0.677 after 368k in ``benchmarks/sae_throughput.py``'s ablation; Adam's 1,000-step
warm-up explains much of that on short runs (without it, sparsify's init and mean
b_dec: 0.573 / 0.349). Schedule-free training takes
gradients at the interpolated point y; the SAE that ``train_sae`` returns (and that
``evaluate``/``save`` then see) holds the *averaged* x weights, while checkpoints hold y
and the optimizer state (so a resumed run continues exactly). Initialization is the
SAE's (``TopKSAE(init=...)``); b_dec is set on the first batch to the geometric median
(default) or the mean (``b_dec_init="mean"``, sparsify's choice).

Resuming: a checkpoint holds the SAE, the optimizer, the counters, the generator state
and the history. ``train_sae`` resumed from it skips the batches already consumed (so the
iterable must yield the same batches again, e.g. a list or a seeded stream) and gives
the same parameters as an uninterrupted run.

Data parallel (``torchrun``): when ``torch.distributed`` is initialized, each rank
passes its own shard of every global batch (equal sizes). Loss normalizers, dead-latent
counters, metrics and the b_dec sample are global (all-reduce/all-gather) and gradients
are summed, so every rank ends with the parameters single-process training on the
global batches would give. Rank 0's initial parameters are broadcast, and only rank 0
writes checkpoints. For example, with ``torchrun --nproc_per_node 2 fit.py``::

    dist.init_process_group("gloo")          # "nccl" on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = (batch.chunk(world)[rank] for batch in global_batches)
    train_sae(TopKSAE(576, 4608, 32), shards, SAETrainConfig(checkpoint_dir="ckpt"))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from interp.cache import atomic_write
from interp.sae.functional import reuse_encoder_buffer
from interp.sae.model import TopKSAE
from interp.sae.optim import ScheduleFreeSignSGD

__all__ = [
    "EvalMetrics",
    "SAETrainConfig",
    "SAETrainResult",
    "StepMetrics",
    "default_lr",
    "evaluate",
    "train_sae",
]

CHECKPOINT_NAME = "checkpoint.pt"


OPTIMIZERS = ("adam", "signsgd")
B_DEC_INITS = ("geometric_median", "mean")
_DEFAULT_BETAS = (0.9, 0.999)
_DEFAULT_EPS = 6.25e-10
_DEFAULT_MOMENTUM = 0.95
_DEFAULT_MAX_NORM = 1.0


def default_lr(d_sae: int, optimizer: str = "adam") -> float:
    """Gao et al. (2024)'s 1/√n learning-rate scaling: 2e-4 / sqrt(d_sae / 2**14) for Adam,
    5e-3 / sqrt(d_sae / 2**14) for schedule-free SignSGD (sparsify's values)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    return (2e-4 if optimizer == "adam" else 5e-3) / math.sqrt(d_sae / 2**14)


@dataclass(frozen=True)
class SAETrainConfig:
    """Hyper-parameters of ``train_sae``; every field is validated on construction.

    ``dead_tokens``: a latent is dead when it has not fired in that many tokens (10M in
    Gao et al. 2024; scale down for small runs). ``resample_every``: every that many
    steps, re-initialize dead latents towards badly reconstructed inputs (an
    alternative to AuxK; set ``auxk_alpha=0`` to use it alone). ``decay_steps``:
    linear decay to 0 over the final steps (needs ``max_steps``). ``optimizer``:
    ``"signsgd"`` (schedule-free SignSGD, default) or ``"adam"``; ``betas``/``eps`` are Adam's and
    ``momentum`` is SignSGD's (setting one for the other optimizer raises); ``lr`` and
    ``warmup_steps`` None take the optimizer's default (``default_lr``; 1,000 warm-up steps
    for Adam, 0 for SignSGD). ``b_dec_init``: ``"geometric_median"`` or ``"mean"``.
    ``normalize_decoder`` False skips the decoder-gradient projection and the unit-norm
    renormalization (an ablation: the decoder then keeps whatever row norms it learns).
    ``max_grad_norm`` clips Adam's global gradient norm; SignSGD's step is the gradient's
    sign, which clipping leaves unchanged, so any other value than the default (or None)
    raises with ``optimizer="signsgd"``.
    """

    lr: float | None = None
    optimizer: str = "signsgd"
    betas: tuple[float, float] = _DEFAULT_BETAS
    eps: float = _DEFAULT_EPS
    momentum: float = _DEFAULT_MOMENTUM
    warmup_steps: int | None = None
    decay_steps: int = 0
    max_grad_norm: float | None = _DEFAULT_MAX_NORM
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None
    dead_tokens: int = 10_000_000
    resample_every: int | None = None
    init_b_dec: bool = True
    b_dec_init: str = "geometric_median"
    normalize_decoder: bool = True
    max_steps: int | None = None
    seed: int = 0
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"SAETrainConfig: {msg}")

        if self.lr is not None and not self.lr > 0:
            bad(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.optimizer == "signsgd" and (
            tuple(self.betas) != _DEFAULT_BETAS or self.eps != _DEFAULT_EPS
        ):
            bad("betas and eps are Adam's; optimizer='signsgd' takes momentum instead")
        if self.optimizer == "signsgd" and self.max_grad_norm not in (None, _DEFAULT_MAX_NORM):
            bad(
                "max_grad_norm clips Adam's gradient; SignSGD steps by the gradient's sign, "
                "which clipping leaves unchanged (leave max_grad_norm at its default)"
            )
        if self.optimizer == "adam" and self.momentum != _DEFAULT_MOMENTUM:
            bad("momentum is schedule-free SignSGD's; optimizer='adam' takes betas instead")
        if not 0 < self.momentum < 1:
            bad(f"momentum must be in (0, 1), got {self.momentum}")
        if self.b_dec_init not in B_DEC_INITS:
            bad(f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            bad(f"eps must be > 0, got {self.eps}")
        for name in ("warmup_steps", "decay_steps"):
            if (getattr(self, name) or 0) < 0:
                bad(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.decay_steps and self.max_steps is None:
            bad("decay_steps needs max_steps (the decay ends at max_steps)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if not self.auxk_alpha >= 0:
            bad(f"auxk_alpha must be ≥ 0, got {self.auxk_alpha}")
        if self.k_aux is not None and self.k_aux < 1:
            bad(f"k_aux must be ≥ 1 or None (= d_in // 2), got {self.k_aux}")
        if self.dead_tokens < 1:
            bad(f"dead_tokens must be ≥ 1, got {self.dead_tokens}")
        if self.resample_every is not None and self.resample_every < 1:
            bad(f"resample_every must be ≥ 1 or None, got {self.resample_every}")
        if self.max_steps is not None and self.max_steps < 0:
            bad(f"max_steps must be ≥ 0 or None, got {self.max_steps}")
        if self.checkpoint_every < 1:
            bad(f"checkpoint_every must be ≥ 1, got {self.checkpoint_every}")


class StepMetrics(NamedTuple):
    """Per-step training metrics (global over data-parallel ranks)."""

    step: int
    tokens: int
    loss: float
    fvu: float
    auxk_loss: float
    l0: float
    dead_fraction: float
    lr: float
    grad_norm: float


class EvalMetrics(NamedTuple):
    """Held-out metrics: FVU against the whole set's mean, mean squared error per token,
    mean L0, fraction of latents that never fired on the set, and the token count."""

    fvu: float
    mse: float
    l0: float
    dead_fraction: float
    n_tokens: int


class SAETrainResult(NamedTuple):
    sae: TopKSAE
    history: list[StepMetrics]
    steps: int
    tokens: int


# ---- data parallel ---------------------------------------------------------------------


class _DataParallel:
    """The few collectives the trainer needs; all no-ops without ``torch.distributed``."""

    def __init__(self) -> None:
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, t: Tensor) -> Tensor:
        if not self.enabled:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    @property
    def all_reduce(self) -> Callable[[Tensor], Tensor] | None:
        return self.sum if self.enabled else None

    def gather_rows(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def sum_grads_(self, params: list[torch.nn.Parameter]) -> None:
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_(self, module: torch.nn.Module) -> None:
        if self.enabled:
            for p in module.parameters():
                dist.broadcast(p.data, 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


# ---- checkpoints -------------------------------------------------------------------------


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@dataclass
class _State:
    step: int
    tokens: int
    tokens_since_fired: Tensor
    history: list[StepMetrics]


def _save_checkpoint(
    path: Path,
    sae: TopKSAE,
    opt: torch.optim.Optimizer,
    state: _State,
    gen: torch.Generator,
    cfg: SAETrainConfig,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": 1,
        "sae_config": sae.cfg.to_dict(),
        "sae": sae.state_dict(),
        "optimizer": opt.state_dict(),
        "step": state.step,
        "tokens": state.tokens,
        "tokens_since_fired": state.tokens_since_fired,
        "generator": gen.get_state(),
        "history": [list(m) for m in state.history],
        "train_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    }
    _atomic_torch_save(payload, path)


def _load_checkpoint(
    path: Path, sae: TopKSAE, opt: torch.optim.Optimizer, gen: torch.Generator
) -> _State:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    saved = payload["sae_config"]
    for key in ("d_in", "d_sae", "k"):
        if saved[key] != getattr(sae.cfg, key):
            raise ValueError(
                f"checkpoint {path} is for {key}={saved[key]}, but the SAE passed to "
                f"train_sae has {key}={getattr(sae.cfg, key)}"
            )
    sae.load_state_dict(payload["sae"])
    opt.load_state_dict(payload["optimizer"])
    gen.set_state(payload["generator"])
    return _State(
        step=int(payload["step"]),
        tokens=int(payload["tokens"]),
        tokens_since_fired=payload["tokens_since_fired"].to(sae.W_enc.device),
        history=[StepMetrics(*m) for m in payload["history"]],
    )


# ---- the loop ------------------------------------------------------------------------------


def _warmup(cfg: SAETrainConfig) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return 1000 if cfg.optimizer == "adam" else 0


def _lr_at(step: int, base: float, cfg: SAETrainConfig) -> float:
    warmup = _warmup(cfg)
    lr = base * min(1.0, (step + 1) / warmup) if warmup else base
    if cfg.decay_steps and cfg.max_steps is not None:
        lr *= min(1.0, max(0.0, (cfg.max_steps - step) / cfg.decay_steps))
    return lr


@torch.no_grad()
def _resample_dead_(
    sae: TopKSAE,
    opt: torch.optim.Optimizer,
    residual: Tensor,
    dead: Tensor,
    gen: torch.Generator,
) -> None:
    """Re-initialize dead latents towards inputs the SAE reconstructs worst.

    Bricken et al. (2023, "Towards Monosemanticity", resampling): sample inputs with
    probability ∝ squared reconstruction error; the dead decoder row becomes the unit
    residual direction, the encoder column the same direction scaled to 0.2 × the mean
    alive encoder norm, b_enc 0, and Adam's moments for those entries are reset
    (schedule-free SignSGD: its z is set to the new values, so x = y = z there).
    """
    dead_idx = dead.nonzero().squeeze(1)
    weights = residual.pow(2).sum(1).double()
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    replace_ = dead_idx.numel() > weights.numel()
    rows = torch.multinomial(weights, dead_idx.numel(), replacement=replace_, generator=gen)
    dirs = residual[rows]
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = (
        sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else sae.W_enc.new_tensor(1.0)
    )
    sae.W_dec[dead_idx] = dirs
    sae.W_enc[:, dead_idx] = dirs.t() * (0.2 * enc_norm)
    sae.b_enc[dead_idx] = 0.0
    for param, index in (
        (sae.W_dec, (dead_idx,)),
        (sae.W_enc, (slice(None), dead_idx)),
        (sae.b_enc, (dead_idx,)),
    ):
        if isinstance(opt, ScheduleFreeSignSGD):
            opt.set_state_(param, index)
        for key in ("exp_avg", "exp_avg_sq"):
            moment = opt.state.get(param, {}).get(key)
            if moment is not None:
                moment[index] = 0.0


def train_sae(
    sae: TopKSAE,
    batches: Iterable[Tensor],
    config: SAETrainConfig | None = None,
    *,
    on_step: Callable[[StepMetrics], None] | None = None,
    **overrides: Any,
) -> SAETrainResult:
    """Train ``sae`` in place on ``batches`` (tensors ``[batch, d_in]``, any float dtype).

    ``config`` fields can also be given as keyword ``overrides``. ``on_step`` is called
    after every step with its metrics. With ``config.checkpoint_dir`` set, training
    resumes from ``checkpoint_dir/checkpoint.pt`` when present (skipping the batches it
    had consumed) and writes that file atomically every ``checkpoint_every`` steps and at
    the end.
    """
    cfg = replace(config or SAETrainConfig(), **overrides)
    dp = _DataParallel()
    device = sae.W_enc.device
    params = list(sae.parameters())
    if any(p.dtype != torch.float32 for p in params):
        raise TypeError("TopKSAE parameters must be float32 for training (inputs are cast in)")
    base_lr = cfg.lr if cfg.lr is not None else default_lr(sae.d_sae, cfg.optimizer)
    opt: torch.optim.Optimizer
    schedule_free = cfg.optimizer == "signsgd"
    if schedule_free:
        opt = ScheduleFreeSignSGD(params, lr=base_lr, momentum=cfg.momentum)
    else:
        opt = torch.optim.Adam(params, lr=base_lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = Path(cfg.checkpoint_dir) / CHECKPOINT_NAME if cfg.checkpoint_dir is not None else None

    if ckpt is not None and ckpt.exists():
        state = _load_checkpoint(ckpt, sae, opt, gen)
    else:
        dp.broadcast_(sae)  # identical start on every rank
        state = _State(0, 0, torch.zeros(sae.d_sae, dtype=torch.long, device=device), [])
    # Skip the batches a resumed run already consumed; never pull one past max_steps.
    stream = itertools.islice(iter(batches), state.step, cfg.max_steps)

    with (
        reuse_encoder_buffer(),  # one pre-activation buffer for every step
        tqdm(
            total=cfg.max_steps,
            initial=state.step,
            disable=not (cfg.progress and dp.is_main),
            desc="TopKSAE",
            unit="step",
        ) as bar,
    ):
        for batch in stream:
            x = batch.to(device=device, dtype=torch.float32).reshape(-1, sae.d_in)

            if state.step == 0 and cfg.init_b_dec:
                sae.init_b_dec(dp.gather_rows(x), method=cfg.b_dec_init)

            lr = _lr_at(state.step, base_lr, cfg)
            for group in opt.param_groups:
                group["lr"] = lr

            if cfg.normalize_decoder and schedule_free:
                sae.normalize_decoder_()
            dead = state.tokens_since_fired >= cfg.dead_tokens
            use_aux = cfg.auxk_alpha > 0 and bool(dead.any())
            out = sae(
                x,
                dead_mask=dead if use_aux else None,
                k_aux=cfg.k_aux,
                all_reduce=dp.all_reduce,
            )
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss

            fired_local = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
            values = out.latents.values
            fired_local[out.latents.indices[values > 0]] = 1
            stats = torch.stack(
                [
                    out.fvu.detach(),
                    out.auxk_loss.detach(),
                    (values > 0).sum().to(x.dtype),
                    x.new_tensor(float(x.shape[0])),
                ]
            )
            fvu_g, aux_g, nnz_g, n_g = dp.sum(stats).tolist()
            if not (math.isfinite(fvu_g) and math.isfinite(aux_g)):
                bad_input = not bool(torch.isfinite(batch).all())
                raise FloatingPointError(
                    f"non-finite loss at step {state.step}: fvu={fvu_g}, auxk_loss={aux_g}"
                    + (" — the input batch contains NaN/inf" if bad_input else "")
                    + ". No update was applied; lower the learning rate or check the "
                    "activations, then resume from the last checkpoint."
                )

            opt.zero_grad(set_to_none=True)
            loss.backward()
            dp.sum_grads_(params)
            if cfg.normalize_decoder:
                sae.project_decoder_grad_()
            if schedule_free:
                # Its step is the gradient's sign, which rescaling leaves as it is: clipping
                # would only cost a pass over every gradient. The norm is still reported.
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    params, cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                )
            if not bool(torch.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"non-finite gradient norm at step {state.step} ({float(grad_norm)}); "
                    "no update was applied."
                )
            opt.step()
            if cfg.normalize_decoder and not schedule_free:
                sae.normalize_decoder_()

            n_tokens = round(n_g)
            fired = dp.sum(fired_local) > 0
            state.tokens_since_fired += n_tokens
            state.tokens_since_fired[fired] = 0
            state.step += 1
            state.tokens += n_tokens

            if cfg.resample_every is not None and state.step % cfg.resample_every == 0:
                dead_now = state.tokens_since_fired >= cfg.dead_tokens
                if bool(dead_now.any()):
                    residual = dp.gather_rows((x - out.x_hat).detach())
                    _resample_dead_(sae, opt, residual, dead_now, gen)
                    state.tokens_since_fired[dead_now] = 0

            metrics = StepMetrics(
                step=state.step,
                tokens=state.tokens,
                loss=fvu_g + cfg.auxk_alpha * aux_g,
                fvu=fvu_g,
                auxk_loss=aux_g,
                l0=nnz_g / n_g,
                dead_fraction=float((state.tokens_since_fired >= cfg.dead_tokens).float().mean()),
                lr=lr,
                grad_norm=float(grad_norm),
            )
            state.history.append(metrics)
            if on_step is not None:
                on_step(metrics)
            bar.update(1)
            bar.set_postfix(
                fvu=f"{fvu_g:.4f}", l0=f"{metrics.l0:.1f}", dead=f"{metrics.dead_fraction:.3f}"
            )

            if ckpt is not None and state.step % cfg.checkpoint_every == 0:
                if dp.is_main:
                    _save_checkpoint(ckpt, sae, opt, state, gen, cfg)
                dp.barrier()

    if ckpt is not None:
        if dp.is_main:
            _save_checkpoint(ckpt, sae, opt, state, gen, cfg)
        dp.barrier()
    if schedule_free:
        opt.eval()  # the SAE to evaluate and export is the average x, not the iterate y
    return SAETrainResult(sae, state.history, state.step, state.tokens)


@torch.no_grad()
def evaluate(sae: TopKSAE, batches: Iterable[Tensor]) -> EvalMetrics:
    """FVU, MSE, L0 and never-fired fraction of ``sae`` on held-out ``batches``.

    FVU here is Σ‖x − x̂‖² / Σ‖x − mean(x)‖² with the mean over the *whole* set, merged
    across batches with Chan et al.'s parallel variance update (one pass, stable).
    """
    n = 0
    mean: Tensor | None = None
    m2 = 0.0
    sse = 0.0
    nnz = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.W_enc.device)
    for batch in batches:
        x = batch.to(device=sae.W_enc.device, dtype=torch.float32).reshape(-1, sae.d_in)
        if x.shape[0] == 0:
            continue
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
        sse += float((x - x_hat).double().pow(2).sum())
        active = latents.values > 0
        nnz += float(active.sum())
        fired[latents.indices[active]] = True
        xd = x.double()
        b_n, b_mean = x.shape[0], xd.mean(0)
        b_m2 = float((xd - b_mean).pow(2).sum())
        if mean is None:
            mean, m2 = b_mean, b_m2
        else:
            delta = float((b_mean - mean).pow(2).sum())
            m2 += b_m2 + delta * n * b_n / (n + b_n)
            mean = mean + (b_mean - mean) * (b_n / (n + b_n))
        n += b_n
    if n == 0:
        raise ValueError("evaluate needs at least one non-empty batch")
    return EvalMetrics(
        fvu=sse / m2 if m2 > 0 else math.inf,
        mse=sse / n,
        l0=nnz / n,
        dead_fraction=float((~fired).float().mean()),
        n_tokens=n,
    )

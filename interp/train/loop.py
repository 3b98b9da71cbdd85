"""The training loop: accumulation, cosine schedule, clipping, eval, checkpoint/resume.

Determinism: data order comes from ``torch.Generator(seed + epoch)``; LoRA
init and dropout draw from the global RNG, which the loop seeds inside
``torch.random.fork_rng`` (the caller's RNG state is untouched) and stores in
every checkpoint. Evaluation runs in its own forked RNG, so an eval callback
that samples cannot change the training trajectory. Together these make a
resumed run reproduce an uninterrupted one exactly on the same device.

Checkpoints are one file (``checkpoint.pt``: trainable weights, optimizer,
scheduler, RNG, step, history, a config fingerprint) written to a temp file
and renamed into place, so an interruption never leaves a torn checkpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from interp.cache import atomic_write
from interp.checkpointing import checkpointing
from interp.train.config import TrainConfig
from interp.train.data import collate, prepare
from interp.train.lora import _is_peft, apply_lora, resolve_model
from interp.train.objectives import LossFn

__all__ = ["CHECKPOINT_NAME", "TrainResult", "cosine_with_warmup", "train"]

CHECKPOINT_NAME = "checkpoint.pt"
EvalFn = Callable[[nn.Module, int], Mapping[str, float] | None]


class TrainResult(NamedTuple):
    """What ``train`` returns.

    Attributes:
        model: the ``PeftModel`` (LoRA injected into the base model in place).
        losses: mean loss of each optimizer step, from step 1 (including steps
            restored from a checkpoint).
        evals: ``(step, metrics)`` from the evaluation callback.
        grad_norms: global gradient norm (before clipping) of each optimizer step.
        steps: optimizer steps completed.
        resumed_from: the step the run resumed at (0 for a fresh run).
    """

    model: nn.Module
    losses: tuple[float, ...]
    evals: tuple[tuple[int, dict[str, float]], ...]
    grad_norms: tuple[float, ...]
    steps: int
    resumed_from: int


def cosine_with_warmup(
    total_steps: int, warmup_steps: int, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine to ``min_ratio``.

    Step ``s`` (0-based) gets ``(s + 1) / (warmup + 1)`` during warmup, so no
    step is wasted at lr 0.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _fingerprint(
    config: TrainConfig, n_examples: int, params: Sequence[tuple[str, torch.Tensor]]
) -> dict[str, Any]:
    # Fields that change the trajectory; eval/save cadence and checkpointing do not.
    cadence = ("eval_every", "save_every", "gradient_checkpointing")
    cfg = {k: v for k, v in config.as_dict().items() if k not in cadence}
    return {
        "config": cfg,
        "n_examples": n_examples,
        "params": [[n, list(p.shape)] for n, p in params],
    }


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _diff(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    parts = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            a, b = saved.get(key), now.get(key)
            if isinstance(a, Mapping) and isinstance(b, Mapping):
                parts.append(_diff(a, b))
            else:
                parts.append(f"{key}: checkpoint {a!r} vs now {b!r}")
    return "; ".join(p for p in parts if p)


def _prepare_run(
    model: Any,
    examples: Sequence[Mapping[str, Any]],
    config: TrainConfig,
    tokenizer: Any,
) -> tuple[nn.Module, list[dict[str, list[int]]], int]:
    """What both training paths start from: the ``PeftModel`` (LoRA attached per ``config``
    unless the model already is one), the prepared examples (raises on none) and the pad
    id (the tokenizer's, default ``model.tokenizer``; 0 without one)."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    base = resolve_model(model)
    peft_model = base if _is_peft(base) else apply_lora(base, config)
    items = prepare(examples, tokenizer)
    if not items:
        raise ValueError("no training examples")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return peft_model, items, 0 if pad_id is None else int(pad_id)


def train(
    model: Any,
    examples: Sequence[Mapping[str, Any]],
    loss_fn: LossFn,
    config: TrainConfig | None = None,
    *,
    tokenizer: Any = None,
    eval_fn: EvalFn | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    """LoRA-fine-tune ``model`` on ``examples`` with ``loss_fn(logits, batch)``.

    Args:
        model: a ``transformers`` causal LM, a ``PeftModel`` (its trainable
            parameters are trained as they are; LoRA settings in ``config`` are
            then unused), or an object holding either in ``.model``.
        examples: dicts, text or token level (see ``interp.train.data``).
        loss_fn: ``(logits [batch, pos, vocab], Batch) -> scalar``; the ``Batch`` (from
            ``collate``) carries the examples' masks in ``batch.masks``.
        config: hyperparameters; ``TrainConfig()`` by default.
        tokenizer: for text examples and the pad id; defaults to ``model.tokenizer``.
        eval_fn: ``eval_fn(peft_model, step) -> metrics`` every ``config.eval_every``
            steps and after the last, run in eval mode under ``no_grad``.
        checkpoint_dir: write ``checkpoint.pt`` here every ``config.save_every``
            steps and at the end; an existing checkpoint is resumed from.
        progress: show a tqdm bar.
    """
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    base = resolve_model(model)
    was_training = base.training
    peft_model, items, pad_id = _prepare_run(model, examples, config, tokenizer)

    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    params = [p for _, p in named]
    n_micro = math.ceil(len(items) / config.batch_size)
    steps_per_epoch = math.ceil(n_micro / config.grad_accum_steps)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = math.floor(config.warmup_ratio * total)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total, warmup, config.min_lr_ratio)
    )
    fingerprint = _fingerprint(config, len(items), named)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    device = params[0].device

    step, losses, evals, grad_norms = 0, [], [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        if ckpt_path is not None and ckpt_path.is_file():
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            if state["fingerprint"] != fingerprint:
                raise ValueError(
                    f"checkpoint {ckpt_path} belongs to a different run ("
                    f"{_diff(state['fingerprint'], fingerprint)}); use another checkpoint_dir"
                )
            with torch.no_grad():
                for n, p in named:
                    p.copy_(state["trainable"][n])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            step, losses = int(state["step"]), list(state["losses"])
            grad_norms = list(state["grad_norms"])
            evals = [(int(s), dict(m)) for s, m in state["evals"]]
        resumed_from = step

        def checkpoint() -> None:
            assert ckpt_path is not None
            _atomic_save(
                {
                    "step": step,
                    "trainable": {n: p.detach().cpu().clone() for n, p in named},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "losses": losses,
                    "grad_norms": grad_norms,
                    "evals": [[s, m] for s, m in evals],
                    "fingerprint": fingerprint,
                },
                ckpt_path,
            )

        bar = tqdm(total=total, initial=step, disable=not progress, desc="train", leave=False)
        peft_model.train()
        try:
            for epoch in range(step // steps_per_epoch, config.epochs):
                if config.shuffle:
                    g = torch.Generator().manual_seed(config.seed + epoch)
                    order = torch.randperm(len(items), generator=g).tolist()
                else:
                    order = list(range(len(items)))
                micro = [
                    order[i : i + config.batch_size]
                    for i in range(0, len(order), config.batch_size)
                ]
                groups = [
                    micro[i : i + config.grad_accum_steps]
                    for i in range(0, len(micro), config.grad_accum_steps)
                ]
                for index, group in enumerate(groups):
                    if step >= total:
                        break  # max_steps reached
                    if epoch * steps_per_epoch + index < step:
                        continue  # done before the checkpoint we resumed from
                    step_loss = 0.0
                    for rows in group:
                        batch = collate([items[i] for i in rows], pad_id).to(device)
                        with checkpointing(peft_model, config.gradient_checkpointing):
                            logits = peft_model(
                                input_ids=batch.input_ids,
                                attention_mask=batch.attention_mask,
                                use_cache=False,
                            ).logits
                            loss = loss_fn(logits, batch)
                            if loss.ndim != 0:
                                raise ValueError(
                                    f"loss_fn must return a scalar, got shape {tuple(loss.shape)}"
                                )
                            if not torch.isfinite(loss):
                                raise FloatingPointError(
                                    f"non-finite loss {loss.item()} at step {step + 1}"
                                )
                            # Mean over the group's micro-batches (the last may be short).
                            (loss / len(group)).backward()
                        step_loss += loss.item() / len(group)
                    grads = [p.grad for p in params if p.grad is not None]
                    norm = torch.nn.utils.get_total_norm(grads)
                    if config.max_grad_norm is not None:
                        torch.nn.utils.clip_grads_with_norm_(params, config.max_grad_norm, norm)
                    grad_norms.append(float(norm))
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    losses.append(step_loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    last = step == total
                    if (
                        eval_fn is not None
                        and config.eval_every
                        and (step % config.eval_every == 0 or last)
                    ):
                        peft_model.eval()
                        with torch.random.fork_rng(devices=[]), torch.no_grad():
                            metrics = eval_fn(peft_model, step)
                        peft_model.train()
                        evals.append((step, {k: float(v) for k, v in (metrics or {}).items()}))
                    if ckpt_path is not None and (
                        last or (config.save_every and step % config.save_every == 0)
                    ):
                        checkpoint()
        finally:
            bar.close()
            optimizer.zero_grad(set_to_none=True)
            peft_model.train(was_training)
    return TrainResult(
        peft_model, tuple(losses), tuple(evals), tuple(grad_norms), step, resumed_from
    )

"""``train``: a LoRA run in one process, its steps taken by ``transformers.Trainer``.

The steps are ``interp.train.trainer.LossTrainer``'s, the engine ``train_trainer`` (and
``torchrun``) use: AdamW, warmup + cosine (``cosine_with_warmup``), gradient accumulation,
norm clipping. ``train`` adds, for one process: the model is trained on the device(s) it
is on (never moved; a placement the Trainer would change raises), the per-step losses and
pre-clipping gradient norms come back in a ``TrainResult``, an eval callback runs in eval
mode under ``no_grad``, and a checkpoint directory carries a fingerprint of the run.

Determinism: data order is ``torch.randperm`` from ``torch.Generator(seed + epoch)``
(``trainer.EpochOrder``); LoRA init is seeded by ``apply_lora``; dropout draws from the
global RNG, which the Trainer seeds with ``config.seed`` and stores in every checkpoint.
All of it runs inside a fork of the global RNGs (``random``, ``numpy``, torch CPU and
CUDA), so the caller's RNG state is untouched; evaluation runs in its own forked RNG, so
an eval callback that samples cannot change the trajectory. A resumed run reproduces an
uninterrupted one exactly on the same device.

Checkpoint layout (``checkpoint_dir``):

- ``interp_run.json``: the run's fingerprint (the config fields that change the
  trajectory, the number of examples, the trainable parameters' shapes);
- ``checkpoint-<step>/``: the Trainer's checkpoint (adapter, optimizer, scheduler, RNG,
  ``trainer_state.json``), completed by ``interp_trainable.pt`` (every trainable tensor by
  name) and, written last, ``interp_state.json`` (fingerprint, step, losses, gradient
  norms, evals), each written atomically.

A ``checkpoint-<step>`` folder without ``interp_state.json`` is a save that an interruption
cut short: it is never resumed from, and the next run deletes it. Only the newest complete
checkpoint is kept (older ones are deleted once the new one is complete).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from interp.cache import atomic_write
from interp.train.config import TrainConfig
from interp.train.data import prepare
from interp.train.lora import _is_peft, apply_lora, refuse_meta_adapters, resolve_model
from interp.train.objectives import LossFn

__all__ = ["RUN_FILE", "STATE_FILE", "TrainResult", "cosine_with_warmup", "train"]

RUN_FILE = "interp_run.json"
STATE_FILE = "interp_state.json"
TRAINABLE_FILE = "interp_trainable.pt"
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


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj)))


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
    if _is_peft(base):
        refuse_meta_adapters(base)
        peft_model = base
    else:
        peft_model = apply_lora(base, config)
    items = prepare(examples, tokenizer)
    if not items:
        raise ValueError("no training examples")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return peft_model, items, 0 if pad_id is None else int(pad_id)


@contextlib.contextmanager
def _forked_rngs() -> Iterator[None]:
    """Run the block on forks of every global RNG the Trainer seeds (``random``, ``numpy``,
    torch's CPU and CUDA generators): the caller's states come back afterwards."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


@contextlib.contextmanager
def _kept_accelerate_state() -> Iterator[None]:
    """Run the block with the caller's ``accelerate`` state put back afterwards.

    ``transformers``' ``TrainingArguments`` reset accelerate's process-wide state (the
    ``PartialState`` / ``AcceleratorState`` / ``GradientState`` singletons) and the Trainer
    builds its own ``Accelerator``: a caller's ``Accelerator`` (mixed precision, CPU
    placement) would otherwise find it replaced by the Trainer's, and a caller without one
    would inherit it. The current CUDA device is restored too."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    states = (PartialState, AcceleratorState, GradientState)
    saved = [dict(cls._shared_state) for cls in states]
    cuda = torch.cuda.current_device() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        for cls, shared in zip(states, saved, strict=True):
            cls._shared_state.clear()
            cls._shared_state.update(shared)
        if cuda is not None:
            torch.cuda.set_device(cuda)


def _resume_point(
    directory: Path, fingerprint: dict[str, Any]
) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of this run in ``directory`` and its state, or ``None``
    (a fresh run: the run file is written). Raises for a directory of another run; deletes
    checkpoint folders whose save was cut short."""
    from interp.train.trainer import checkpoint_steps

    run_file = directory / RUN_FILE
    folders = checkpoint_steps(directory)
    if not run_file.is_file():
        foreign = [p.name for _, p in folders] + [
            n for n in ("checkpoint.pt",) if (directory / n).exists()
        ]
        if foreign:
            raise ValueError(
                f"checkpoint_dir {directory} holds {foreign} but no {RUN_FILE}: checkpoints "
                "that interp.train.train did not write (or the one-file checkpoint.pt of its "
                "earlier loop, which this version cannot resume); use another checkpoint_dir"
            )
        _write_json(run_file, {"fingerprint": fingerprint})
        return None
    saved = json.loads(run_file.read_text())["fingerprint"]
    if saved != fingerprint:
        raise ValueError(
            f"checkpoint_dir {directory} belongs to a different run ("
            f"{_diff(saved, fingerprint)}); use another checkpoint_dir"
        )
    complete = []
    for step, path in folders:
        if (path / STATE_FILE).is_file():
            complete.append((step, path))
        else:
            shutil.rmtree(path)  # a save an interruption cut short: never resumed from
    if not complete:
        return None
    step, path = complete[-1]
    state = json.loads((path / STATE_FILE).read_text())
    if state["fingerprint"] != fingerprint or state["step"] != step:
        raise ValueError(f"checkpoint {path} does not match {run_file}; use another checkpoint_dir")
    return path, state


def _save_state(path: Path, named: Sequence[tuple[str, torch.Tensor]], state: dict) -> None:
    """Complete the Trainer's checkpoint ``path``: every trainable tensor (the Trainer's
    adapter file holds only the adapter's), then the state file, written last."""
    trainable = {n: p.detach().cpu().clone() for n, p in named}
    atomic_write(path / TRAINABLE_FILE, lambda tmp: torch.save(trainable, tmp))
    _write_json(path / STATE_FILE, state)
    from interp.train.trainer import checkpoint_steps

    for step, older in checkpoint_steps(path.parent):
        if step < state["step"]:
            (older / STATE_FILE).unlink(missing_ok=True)  # first: never a half-deleted one
            shutil.rmtree(older)


def _load_trainable(path: Path, named: Sequence[tuple[str, torch.Tensor]]) -> None:
    saved = torch.load(path / TRAINABLE_FILE, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved[n])


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
    """LoRA-fine-tune ``model`` on ``examples`` with ``loss_fn(logits, batch)``, in this
    process, on the device(s) the model is on.

    The steps are ``transformers.Trainer``'s (``interp.train.trainer.LossTrainer``, the
    engine of ``train_trainer``); for ``torchrun`` / ``accelerate launch`` (DDP, FSDP,
    DeepSpeed) call ``train_trainer`` instead: ``train`` refuses to run in a launched
    process group.

    Args:
        model: a ``transformers`` causal LM, a ``PeftModel`` (its trainable
            parameters are trained as they are; LoRA settings in ``config`` are
            then unused), or an object holding either in ``.model``. It stays where it
            is: on the CPU, on the one accelerator the Trainer uses (``cuda:0``), or
            dispatched by ``accelerate`` (``hf_device_map``); a model on another single
            device (``cuda:1``) raises instead of being moved. LoRA on a module that
            ``accelerate`` offloaded (disk, or CPU beside an accelerator) gets its adapter
            in memory on the module's execution device (see ``apply_lora``).
        examples: dicts, text or token level (see ``interp.train.data``).
        loss_fn: ``(logits [batch, pos, vocab], Batch) -> scalar``; the ``Batch`` (from
            ``collate``) carries the examples' masks in ``batch.masks``.
        config: hyperparameters; ``TrainConfig()`` by default.
        tokenizer: for text examples and the pad id; defaults to ``model.tokenizer``.
        eval_fn: ``eval_fn(peft_model, step) -> metrics`` every ``config.eval_every``
            steps and after the last, run in eval mode under ``no_grad``.
        checkpoint_dir: a ``checkpoint-<step>`` folder every ``config.save_every`` steps
            and at the end (the newest complete one kept; layout in the module
            docstring); an existing checkpoint of the same run is resumed from, one of
            another run raises. Without it nothing is written anywhere lasting.
        progress: show a tqdm bar.
    """
    from interp.train import trainer as engine  # transformers loads here

    config = config or TrainConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise RuntimeError(
            f"interp.train.train runs one process, but this one was launched with "
            f"WORLD_SIZE={world}: call interp.train.trainer.train_trainer under torchrun / "
            "accelerate launch (its processes average their gradients)"
        )
    base = resolve_model(model)
    was_training = base.training
    peft_model, items, pad_id = _prepare_run(model, examples, config, tokenizer)
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    fingerprint = json.loads(json.dumps(_fingerprint(config, len(items), named)))
    devices = {str(p.device) for p in peft_model.parameters()}
    device_map = getattr(resolve_model(peft_model), "hf_device_map", None)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume = _resume_point(ckpt_dir, fingerprint) if ckpt_dir is not None else None
    ckpt, state = resume if resume is not None else (None, {})
    losses = [float(x) for x in state.get("losses", [])]
    evals = [(int(s), {k: float(v) for k, v in m.items()}) for s, m in state.get("evals", [])]
    resumed_from = int(state.get("step", 0))

    with _forked_rngs(), _kept_accelerate_state(), contextlib.ExitStack() as stack:
        out = ckpt_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="train-")))
        kwargs = engine._argument_kwargs(config, out, len(items), {})
        kwargs.pop("activation_checkpointing", None)  # interp.checkpointing instead
        kwargs.pop("activation_checkpointing_kwargs", None)
        kwargs.update(
            save_strategy="steps" if ckpt_dir is not None else "no",
            save_total_limit=None,  # _save_state keeps the newest complete one
            logging_strategy="no",  # losses and norms are recorded per step below
            disable_tqdm=not progress,
        )
        args = engine.in_place_arguments(kwargs, devices, device_map)
        total = args.max_steps

        class Record(engine.TrainerCallback):
            def on_step_end(self, args: Any, state_: Any, control: Any, **kw: Any) -> None:
                step = state_.global_step
                losses.append(trainer.step_loss)
                trainer.step_loss = 0.0
                if (
                    eval_fn is not None
                    and config.eval_every
                    and (step % config.eval_every == 0 or step == total)
                ):
                    peft_model.eval()
                    with torch.random.fork_rng(devices=[]), torch.no_grad():
                        metrics = eval_fn(peft_model, step)
                    peft_model.train()
                    evals.append((step, {k: float(v) for k, v in (metrics or {}).items()}))

            def on_save(self, args: Any, state_: Any, control: Any, **kw: Any) -> None:
                step = state_.global_step
                record = {
                    "fingerprint": fingerprint,
                    "step": step,
                    "losses": losses,
                    "grad_norms": trainer.grad_norms,
                    "evals": [[s, m] for s, m in evals],
                }
                _save_state(out / f"checkpoint-{step}", named, record)

        trainer = engine._Recording(
            model=peft_model,
            args=args,
            train_dataset=items,
            data_collator=engine._Collator(pad_id),
            loss_fn=loss_fn,
            shuffle=config.shuffle,
            lr_lambda=lambda n: cosine_with_warmup(
                n, math.floor(config.warmup_ratio * n), config.min_lr_ratio
            ),
            checkpoint_blocks=config.gradient_checkpointing,
            callbacks=[Record()],
        )
        engine.quiet_logs(trainer, progress)
        trainer.grad_norms = [float(x) for x in state.get("grad_norms", [])]
        try:
            if ckpt is not None:
                _load_trainable(ckpt, named)  # also what the adapter file lacks
            if resumed_from < total:
                trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
        finally:
            peft_model.zero_grad(set_to_none=True)
            peft_model.train(was_training)
    steps = max(resumed_from, trainer.state.global_step)
    if not len(losses) == len(trainer.grad_norms) == steps:
        raise RuntimeError(
            f"recorded {len(losses)} losses and {len(trainer.grad_norms)} gradient norms for "
            f"{steps} steps: this transformers version runs its steps differently"
        )
    return TrainResult(
        peft_model, tuple(losses), tuple(evals), tuple(trainer.grad_norms), steps, resumed_from
    )

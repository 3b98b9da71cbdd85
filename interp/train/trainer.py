"""Training on ``transformers.Trainer``: the library's losses on the engine researchers launch.

``LossTrainer`` is a ``transformers.Trainer`` whose loss is any ``loss(logits, Batch)`` of
``interp`` (``SFTLoss``, ``KLSpanLoss``, ``weighted_sum`` …, the same callables
``capture_grads`` and evaluation take). Everything else is the Trainer's: ``accelerate``
and ``torchrun`` give DDP, ``fsdp=`` / ``deepspeed=`` pass through, mixed precision,
gradient accumulation and checkpointing, ``report_to`` logging, and
``resume_from_checkpoint``.

Why a ``Trainer`` subclass rather than TRL's ``SFTTrainer``: the losses here are not all
supervised fine-tuning (the KL span loss reads two token spans of one sequence), the data
is already tokenized with its masks (``interp.train.prepare``), and ``Trainer`` is the
smaller dependency with the same launch story; ``SFTTrainer`` would add its own dataset
formatting on top of what ``prepare`` already does.

``train_trainer(model, examples, loss_fn, TrainConfig(...), output_dir=...)`` maps a
``TrainConfig`` onto ``TrainingArguments`` so that, with one process, it takes the same
steps as the hand-written ``interp.train.train`` (same data order, AdamW, warmup + cosine
schedule, clipping; tested equal), attaches LoRA the same way (layer-restricted), and
resumes from the newest checkpoint in ``output_dir``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from interp.positions import Batch
from interp.train.config import TrainConfig
from interp.train.data import MASK_KEYS, collate
from interp.train.loop import _prepare_run, cosine_with_warmup
from interp.train.objectives import LossFn

__all__ = ["LossTrainer", "TrainerResult", "train_trainer", "training_arguments"]


class TrainerResult(NamedTuple):
    """What ``train_trainer`` returns.

    Attributes:
        model: the trained ``PeftModel`` (LoRA injected into the base model in place).
        trainer: the ``LossTrainer`` (its ``state.log_history`` has every logged step).
        losses: the training loss of each optimizer step, as the Trainer logged it.
        steps: optimizer steps completed.
        resumed_from: the checkpoint step the run resumed at (0 for a fresh run).
    """

    model: nn.Module
    trainer: Any
    losses: tuple[float, ...]
    steps: int
    resumed_from: int


class _Collator:
    """Prepared items -> the Trainer's dict of tensors (``collate``'s ``Batch`` flattened)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(items, self.pad_token_id)
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            **batch.masks,
        }


class LossTrainer(Trainer):
    """``transformers.Trainer`` training ``loss_fn(logits, Batch)``.

    Args:
        loss_fn: an ``interp`` loss: ``(logits [batch, pos, vocab], Batch) -> scalar``; the
            ``Batch`` carries the examples' masks (``loss_mask``, ``span_s``, ``span_o``) in
            ``batch.masks``.
        shuffle: ``False`` keeps the data in order (the Trainer always shuffles).
        lr_lambda: ``lr_lambda(total_steps) -> (step -> multiplier)``: a schedule that
            replaces the one ``args.lr_scheduler_type`` names (``train_trainer`` passes
            ``interp.train.train``'s: linear warmup from ``lr / (warmup + 1)``, so no step
            runs at lr 0 as in the Trainer's warmup, then cosine to ``lr × min_lr_ratio``).
        everything else: ``transformers.Trainer``'s arguments (``args`` needs
            ``remove_unused_columns=False``: the masks are not arguments of the model).
    """

    def __init__(
        self,
        *args: Any,
        loss_fn: LossFn,
        shuffle: bool = True,
        lr_lambda: Callable[[int], Callable[[int], float]] | None = None,
        **kwargs: Any,
    ):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        args_ = kwargs.get("args", args[1] if len(args) > 1 else None)
        if args_ is not None and getattr(args_, "remove_unused_columns", False):
            raise ValueError(
                "LossTrainer needs TrainingArguments(remove_unused_columns=False): the masks "
                "a loss reads are not arguments of the model's forward"
            )
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self.shuffle = shuffle
        self.lr_lambda = lr_lambda
        # The loss is a mean per micro-batch and takes no `num_items_in_batch`: the Trainer
        # must divide it by the accumulation steps and not rescale it by the world size
        # (which it does for models whose forward takes **kwargs, as HF causal LMs do).
        self.model_accepts_loss_kwargs = False

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is None and self.lr_lambda is not None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, self.lr_lambda(num_training_steps)
            )
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        if not self.shuffle:
            return torch.utils.data.SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Mapping[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        masks = {k: v.bool() for k, v in inputs.items() if k in MASK_KEYS}
        batch = Batch(inputs["input_ids"], inputs["attention_mask"], masks=masks)
        outputs = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        loss = self.loss_fn(outputs.logits, batch)
        if loss.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        return (loss, outputs) if return_outputs else loss


def _total_steps(config: TrainConfig, n_items: int, world_size: int) -> int:
    micro = math.ceil(n_items / (config.batch_size * world_size))
    total = math.ceil(micro / config.grad_accum_steps) * config.epochs
    return min(total, config.max_steps) if config.max_steps is not None else total


def training_arguments(
    config: TrainConfig, output_dir: str | os.PathLike[str], n_items: int, **overrides: Any
) -> Any:
    """``TrainingArguments`` that take the steps ``interp.train.train`` takes for ``config``.

    ``config.batch_size`` is per device (the global batch is ``batch_size × world size ×
    grad_accum_steps``). Warmup is ``floor(warmup_ratio × total steps)`` and the schedule
    is cosine to ``min_lr_ratio`` (``cosine_with_min_lr``); ``max_grad_norm=None``
    disables clipping; checkpoints every ``save_every`` steps (0: only at the end).
    ``overrides`` are any other ``TrainingArguments`` fields (``bf16=True``,
    ``fsdp=...``, ``deepspeed=...``, ``report_to=...``); a field the config already sets
    raises, so one setting cannot silently win over the other.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = _total_steps(config, n_items, world)
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum_steps,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        warmup_steps=math.floor(config.warmup_ratio * total),
        lr_scheduler_type="cosine_with_min_lr",  # what the Trainer runs without lr_lambda
        lr_scheduler_kwargs={"min_lr_rate": config.min_lr_ratio},
        max_grad_norm=config.max_grad_norm if config.max_grad_norm is not None else 0.0,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=config.save_every or total,
        logging_steps=1,
        remove_unused_columns=False,
        report_to="none",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        dataloader_drop_last=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if world > 1 and not torch.cuda.is_available():
        # Without use_cpu the Trainer on a CPU-only machine runs each torchrun process on
        # its own shard of the data with no gradient all-reduce (ParallelMode.NOT_PARALLEL).
        kwargs["use_cpu"] = True
        kwargs["ddp_backend"] = overrides.pop("ddp_backend", "gloo")
    if config.gradient_checkpointing:
        kwargs["activation_checkpointing"] = True
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    clash = sorted(set(overrides) & (set(kwargs) - {"report_to", "output_dir"}))
    if clash:
        raise ValueError(
            f"{clash} are set from TrainConfig; change the TrainConfig instead of overriding"
        )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def train_trainer(
    model: Any,
    examples: Sequence[Mapping[str, Any]],
    loss_fn: LossFn,
    config: TrainConfig | None = None,
    *,
    output_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    eval_fn: Callable[[nn.Module, int], Mapping[str, float] | None] | None = None,
    resume: bool = True,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    **training_args: Any,
) -> TrainerResult:
    """LoRA-fine-tune ``model`` on ``examples`` with ``loss_fn`` through ``LossTrainer``.

    Args:
        model: a ``transformers`` causal LM, a ``PeftModel``, or an interp ``HookedModel``.
        examples: dicts, text or token level (``interp.train.prepare``).
        loss_fn: ``(logits, Batch) -> scalar``.
        config: ``TrainConfig`` (LoRA rank/layers, optimizer, schedule, batch, seed).
        output_dir: the Trainer's checkpoints (``checkpoint-<step>``) go here.
        tokenizer: for text examples and the pad id; defaults to ``model.tokenizer``.
        eval_fn: ``eval_fn(peft_model, step) -> metrics`` every ``config.eval_every``
            steps, logged into ``trainer.state.log_history`` (eval mode, no grad).
        resume: continue from the newest checkpoint in ``output_dir`` when there is one.
        progress: the Trainer's progress bar.
        callbacks: more ``TrainerCallback`` objects.
        training_args: other ``TrainingArguments`` fields (``bf16=True``, ``fsdp=...``,
            ``deepspeed=...``, ``report_to="wandb"``, ``ddp_backend="gloo"`` …).

    Launch with ``torchrun --nproc_per_node N script.py`` (or ``accelerate launch``) for
    data parallelism: ``config.batch_size`` is then per process.
    """
    config = config or TrainConfig()
    peft_model, items, pad_id = _prepare_run(model, examples, config, tokenizer)
    out = Path(output_dir)
    args = training_arguments(config, out, len(items), disable_tqdm=not progress, **training_args)
    extra = list(callbacks)
    if eval_fn is not None and config.eval_every:

        class _Eval(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                step = state.global_step
                if step % config.eval_every and step != state.max_steps:
                    return
                peft_model.eval()
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    metrics = eval_fn(peft_model, step) or {}
                peft_model.train()
                state.log_history.append(
                    {"step": step, **{f"eval_{k}": float(v) for k, v in metrics.items()}}
                )

        extra.append(_Eval())
    trainer = LossTrainer(
        model=peft_model,
        args=args,
        train_dataset=items,
        data_collator=_Collator(pad_id),
        loss_fn=loss_fn,
        shuffle=config.shuffle,
        lr_lambda=lambda total: cosine_with_warmup(
            total, math.floor(config.warmup_ratio * total), config.min_lr_ratio
        ),
        callbacks=extra,
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and (
        trainer.args.world_size != world or trainer.args.parallel_mode.value != "distributed"
    ):
        raise RuntimeError(
            f"launched with WORLD_SIZE={world}, but the Trainer runs "
            f"{trainer.args.parallel_mode} over {trainer.args.world_size} processes: its "
            "gradients would not be averaged across processes"
        )
    checkpoint = _last_checkpoint(out) if resume else None
    resumed_from = int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else 0
    trainer.train(resume_from_checkpoint=checkpoint)
    losses = tuple(
        float(h["loss"]) for h in trainer.state.log_history if "loss" in h and "step" in h
    )
    return TrainerResult(peft_model, trainer, losses, trainer.state.global_step, resumed_from)

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
``TrainConfig`` onto ``TrainingArguments`` (same data order, AdamW, warmup + cosine
schedule, clipping as ``interp.train.train``), attaches LoRA the same way
(layer-restricted), and resumes from the newest checkpoint in ``output_dir``.
``interp.train.train`` is the one-process front end of the same engine: it builds a
``LossTrainer`` too, and adds what a notebook wants (the model trained where it is, a
``TrainResult`` with per-step losses and gradient norms, a run fingerprint in its
checkpoints, the caller's RNG untouched).

Data order (both): each epoch is ``torch.randperm(n, generator=Generator().manual_seed(
data_seed + epoch))`` (or ``range(n)`` unshuffled), the same on every process; under
``torchrun`` ``accelerate`` hands each process its share of each global batch. The data
loader draws its base seed from a private generator, so the global RNG feeds only the
model (LoRA dropout): a resumed run restores it from the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from interp.checkpointing import checkpointing
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


class EpochOrder(torch.utils.data.Sampler[int]):
    """``interp.train``'s data order: epoch ``e`` is ``torch.randperm(n)`` drawn from
    ``torch.Generator().manual_seed(seed + e)`` (``range(n)`` when ``shuffle=False``).

    The Trainer (through ``accelerate``) calls ``set_epoch`` before every epoch, also on
    resume; the order depends on nothing else, so every process sees the same one.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class LossTrainer(Trainer):
    """``transformers.Trainer`` training ``loss_fn(logits, Batch)``.

    Args:
        loss_fn: an ``interp`` loss: ``(logits [batch, pos, vocab], Batch) -> scalar``; the
            ``Batch`` carries the examples' masks (``loss_mask``, ``span_s``, ``span_o``) in
            ``batch.masks``.
        shuffle: ``False`` keeps the data in order; ``True`` reshuffles every epoch with
            ``EpochOrder`` (seeded by ``args.data_seed``, else ``args.seed``). A
            ``train_sampling_strategy`` other than ``"random"``/``"sequential"``
            (``"group_by_length"`` …) replaces both.
        lr_lambda: ``lr_lambda(total_steps) -> (step -> multiplier)``: a schedule that
            replaces the one ``args.lr_scheduler_type`` names (``train_trainer`` passes
            ``interp.train.train``'s: linear warmup from ``lr / (warmup + 1)``, so no step
            runs at lr 0 as in the Trainer's warmup, then cosine to ``lr × min_lr_ratio``).
        checkpoint_blocks: recompute each decoder block in the backward pass with
            ``interp.checkpointing`` for the training steps (hooks of a ``HookedModel``
            apply again in the recomputation); ``interp.train.train`` uses it for
            ``TrainConfig.gradient_checkpointing``.
        everything else: ``transformers.Trainer``'s arguments (``args`` needs
            ``remove_unused_columns=False``: the masks are not arguments of the model).
    """

    def __init__(
        self,
        *args: Any,
        loss_fn: LossFn,
        shuffle: bool = True,
        lr_lambda: Callable[[int], Callable[[int], float]] | None = None,
        checkpoint_blocks: bool = False,
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
        self.checkpoint_blocks = checkpoint_blocks
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

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.args.train_sampling_strategy not in ("random", "sequential"):
            return super()._get_train_sampler(train_dataset)  # group_by_length etc.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        shuffle = self.shuffle and self.args.train_sampling_strategy == "random"
        return EpochOrder(len(dataset), seed, shuffle)

    def get_train_dataloader(self) -> Any:
        loader = super().get_train_dataloader()
        # A DataLoader without a generator draws its base seed from the global RNG at every
        # epoch; a private one leaves the global RNG to the model (dropout).
        base = getattr(loader, "base_dataloader", loader)
        base.generator = torch.Generator().manual_seed(self.args.seed)
        return loader

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> Any:
        with checkpointing(self.model, self.checkpoint_blocks):
            return super().training_step(model, inputs, num_items_in_batch)

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
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {self.state.global_step + 1}"
            )
        return (loss, outputs) if return_outputs else loss


class _Recording(LossTrainer):
    """``LossTrainer`` keeping what ``interp.train.train`` returns: the mean loss of each
    optimizer step (summed in float64 over its micro-batches, as the hand-written loop did)
    and the global gradient norm before clipping."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_loss = 0.0
        self.grad_norms: list[float] = []

    def compute_loss(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        out = super().compute_loss(model, inputs, *args, **kwargs)
        loss = out[0] if isinstance(out, tuple) else out
        self.step_loss += loss.item() / self.current_gradient_accumulation_steps
        return out

    def floating_point_ops(self, inputs: Any) -> int:
        # The Trainer's FLOP count walks every parameter of the model at every micro-batch
        # (a third of its per-step overhead on a tiny model) for a metric train() does not
        # report.
        return 0

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # Called once per optimizer step with the pre-clipping norm (computed without
        # clipping when max_grad_norm is 0); train() checks that it saw every step.
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.grad_norms.append(float(norm))
        return norm


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
    return TrainingArguments(**_argument_kwargs(config, output_dir, n_items, overrides))


def _argument_kwargs(
    config: TrainConfig,
    output_dir: str | os.PathLike[str],
    n_items: int,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = _total_steps(config, n_items, world)
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum_steps,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        num_train_epochs=float(config.epochs),
        # Always the step count: the Trainer runs max_steps even past num_train_epochs.
        max_steps=total,
        warmup_steps=float(math.floor(config.warmup_ratio * total)),  # ≥ 1: steps
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
    return kwargs


# ``TrainingArguments`` whose Trainer leaves the model where it is (the documented way:
# override ``place_model_on_device``). Made with ``type`` so that the test run's import
# hook does not type-check ``transformers``' own loose annotations (``logging_steps: float``
# given 1) as if they were ours.
_InPlaceArguments = type(
    "_InPlaceArguments", (TrainingArguments,), {"place_model_on_device": property(lambda _: False)}
)


def _placement(devices: set[str], device_map: Mapping[str, Any] | None) -> tuple[bool, str | None]:
    """``(use_cpu, device)`` for training a model whose parameters are on ``devices``
    without moving it: ``device`` is the one device the Trainer must resolve to, ``None``
    for a model dispatched by ``accelerate`` (its hooks move the inputs)."""
    mapped = {str(v) for v in (device_map or {}).values()}
    if len(devices) > 1 or len(mapped) > 1:
        if not device_map or len(device_map) < 2:
            raise ValueError(
                f"the model's parameters are on {sorted(devices)} without an accelerate "
                "device map (hf_device_map): put the model on one device, or dispatch it "
                "with accelerate (from_pretrained(device_map=...))"
            )
        accelerators = {d for d in mapped | devices if d not in ("cpu", "disk", "meta")}
        return not accelerators, None
    (device,) = devices
    return device == "cpu", device


def in_place_arguments(
    kwargs: dict[str, Any], devices: set[str], device_map: Mapping[str, Any] | None
) -> Any:
    """``TrainingArguments(**kwargs)`` for one process that trains the model on
    ``devices`` (its parameters' devices) where it is.

    A CPU model gets ``use_cpu=True`` (also on a CUDA machine); a model on one accelerator
    must be on the one the Trainer uses (``cuda:0``; else ``ValueError``: the Trainer and
    ``accelerate`` would move it); a model dispatched by ``accelerate`` (``hf_device_map``
    over several devices, CPU/disk offload included) is never moved. One process never
    runs ``nn.DataParallel`` over several GPUs (``n_gpu`` is 1 at most).
    """
    use_cpu, device = _placement(devices, device_map)
    args = _InPlaceArguments(**kwargs, use_cpu=use_cpu)
    if device is not None and torch.device(device) != args.device:
        raise ValueError(
            f"interp.train.train trains the model where it is, on {device}, but "
            f"transformers' Trainer in this process runs on {args.device} and would move it "
            f"there: move the model to {args.device}, or make its device the first visible "
            "one (CUDA_VISIBLE_DEVICES)"
        )
    args._n_gpu = min(args.n_gpu, 1)  # as the Trainer does for a model-parallel model
    return args


class _Bar(ProgressCallback):
    """The Trainer's progress bar without its printed log lines."""

    def on_log(self, *args: Any, **kwargs: Any) -> None:
        return None


def quiet_logs(trainer: Any, progress: bool) -> None:
    """A progress bar (``progress``) or nothing: no printed log dictionaries."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(_Bar())


def checkpoint_steps(directory: Path) -> list[tuple[int, Path]]:
    """The Trainer's ``checkpoint-<step>`` folders in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint. ``transformers``' ``get_last_checkpoint`` takes the
    highest-numbered folder even when a kill cut its save short; the Trainer writes
    ``trainer_state.json`` last, so a folder whose state does not parse, or names another
    step, is skipped."""
    for step, path in reversed(checkpoint_steps(output_dir)):
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if state.get("global_step") == step:
            return str(path)
    return None


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

"""LoRA fine-tuning of HF causal LMs with pluggable losses.

Design
------
A loss is any callable ``loss(logits, batch) -> scalar`` where ``batch`` is an
``interp.positions.Batch`` (the batch type of ``capture`` and ``capture_grads``), the
masks the examples carry (``loss_mask``, ``span_s``, ``span_o``) in ``batch.masks``: one
loss serves training, ``capture_grads`` and evaluation. ``SFTLoss``
(assistant-token cross-entropy), ``KLSpanLoss`` (study 000's span alignment)
and ``weighted_sum`` ship; anything else plugs in the same way.

``train(model, examples, loss, TrainConfig(...))`` attaches LoRA with
``peft`` (optionally only to chosen layers) and runs its steps on
``transformers.Trainer`` (``trainer.LossTrainer``): AdamW with gradient
accumulation, a warmup+cosine schedule and norm clipping, an eval callback every
N steps, and checkpoints that an interrupted run resumes from to the same adapter.
``trainer.train_trainer`` is the same engine for ``torchrun`` / ``accelerate launch``
(DDP, FSDP, DeepSpeed). ``save_adapter``/``load_adapter`` round-trip the adapter
through ``peft``'s format.

Modules: ``config`` (``TrainConfig``), ``data`` (examples -> tensors),
``objectives`` (losses), ``lora`` (attach/save/load), ``loop`` (``train``), ``trainer``
(``LossTrainer``, ``train_trainer``), ``trial`` (``lora_trial``: a fine-tune for the
length of a ``with`` block). Nothing heavy is imported until used (``peft`` and
``transformers``' Trainer load lazily).
"""

from __future__ import annotations

from interp.train.config import TrainConfig
from interp.train.data import collate, encode_example, prepare
from interp.train.evaluate import example_losses
from interp.train.loop import RUN_FILE, STATE_FILE, TrainResult, cosine_with_warmup, train
from interp.train.lora import (
    apply_lora,
    default_target_modules,
    load_adapter,
    lora_target_names,
    resolve_model,
    save_adapter,
)
from interp.train.objectives import (
    KLSpanLoss,
    LossFn,
    SFTLoss,
    WeightedSum,
    batch_mask,
    weighted_sum,
)
from interp.train.trial import lora_trial

__all__ = [
    "RUN_FILE",
    "STATE_FILE",
    "KLSpanLoss",
    "LossFn",
    "SFTLoss",
    "TrainConfig",
    "TrainResult",
    "WeightedSum",
    "apply_lora",
    "batch_mask",
    "collate",
    "cosine_with_warmup",
    "default_target_modules",
    "encode_example",
    "example_losses",
    "load_adapter",
    "lora_target_names",
    "lora_trial",
    "prepare",
    "resolve_model",
    "save_adapter",
    "train",
    "weighted_sum",
]

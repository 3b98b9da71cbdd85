"""``TrainConfig``: every knob of a LoRA run, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """LoRA fine-tuning settings.

    Attributes:
        r: LoRA rank.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the LoRA input.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay on the LoRA parameters.
        epochs: passes over the data.
        max_steps: stop after this many optimizer steps (the learning-rate schedule is
            laid out over them), even mid-epoch; ``None`` = ``epochs`` full passes.
        batch_size: examples per micro-batch (one forward pass).
        grad_accum_steps: micro-batches per optimizer step.
        warmup_ratio: fraction of optimizer steps with linear warmup before the
            cosine decay.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio``.
        max_grad_norm: global gradient-norm clip; ``None`` disables clipping.
        seed: seeds LoRA init, data order and dropout.
        shuffle: reshuffle examples every epoch (seeded by ``seed + epoch``).
        layers: restrict LoRA to these decoder-layer indices (negative counts
            from the end, e.g. ``(-4, -3, -2, -1)`` = the last four); ``None`` = all.
        target_modules: module names to adapt; ``None`` = the family's attention
            and MLP projections (see ``interp.train.default_target_modules``).
        eval_every: call the evaluation callback every this many optimizer
            steps (and after the last); 0 = never.
        save_every: write a checkpoint every this many optimizer steps (and
            after the last) when a checkpoint directory is given.
        gradient_checkpointing: recompute each decoder block's activations in the
            backward pass instead of keeping them (``interp.checkpointing``), for the
            training steps only: the same gradients for about one more forward pass of
            compute; activation memory falls to about one block's. The model is left as
            it was; resuming may switch it on or off.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 2e-4
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum_steps: int = 1
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    shuffle: bool = True
    layers: tuple[int, ...] | None = None
    target_modules: tuple[str, ...] | None = None
    eval_every: int = 0
    save_every: int = 50
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Accept lists from JSON/YAML configs but store tuples (hashable, frozen).
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        problems = []
        for name in ("r", "epochs", "batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be ≥ 1 or None, got {self.max_steps}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            problems.append(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive finite number, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be ≥ 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.layers is not None and (
            not self.layers or len(set(self.layers)) != len(self.layers)
        ):
            problems.append(
                f"layers must be a non-empty set of distinct indices, got {self.layers}"
            )
        if self.target_modules is not None and (
            not self.target_modules
            or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            problems.append(f"target_modules must be non-empty names, got {self.target_modules}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON view (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

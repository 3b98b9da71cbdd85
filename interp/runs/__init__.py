"""Batched runs over a dataset: ``generate``, ``score`` and ``capture_dataset``.

The three loops every study writes around a model, done once:

* ``generate(model, prompts, ...)``: texts or conversations in, completions out, batched
  with left padding, greedy or sampled (seeded per prompt and sample, so a rerun gives the
  same samples whatever the batch size), with stop strings and hooks on every forward
  pass or on the generated tokens only. The result carries a ``Batch`` of prompt +
  completion with named positions, ready to score or capture (teacher forcing on the
  model's own generations).
* ``score(model, batch, mask=...)``: per-token log-probabilities of each token given its
  prefix, and per-example NLL over a mask (``"assistant"``, any named mask, a
  ``[batch, pos]`` bool mask, or every predicted token).
* ``capture_dataset(model, data, names, ...)``: activations of a dataset at hook points,
  one row per token or pooled per example (mean / last / a named position), special
  tokens (BOS, pad, chat markers) left out of pooling, in memory or written to a folder
  of safetensors shards that a rerun resumes.

Conversations are encoded by ``interp.chat.encode``; all three take its ``chat_format``
(``"template"``, ``"plain"``, ``"auto"`` or a ``PlainFormat``, for base models) and
``chat_template_kwargs`` (e.g. ``{"enable_thinking": False}`` for Qwen3-style templates).

Rows are re-padded for every mini-batch (``score`` and ``capture_dataset`` pad on the
right, so position ids start at 0 in every row; ``generate`` pads prompts on the left and
lets ``transformers`` derive position ids from the attention mask): results do not depend
on how the input was padded. Nothing casts or moves the model; log-softmax and pooling are
computed in float32 on the model's output.

The package: ``generation`` holds ``generate`` (sampling, stop strings, TransformerLens
decoding, generation hooks), ``scoring`` holds ``score``, ``capture`` holds
``capture_dataset`` (pooling plans, length windows, shards, data-parallel ranks), and
``_rows`` what the three share (inputs as unpadded token rows, re-padding, chat options, and
``Generations``, which every loop also takes as input).
"""

from __future__ import annotations

from interp.runs._rows import Generations
from interp.runs.capture import DatasetActivations, ShardedActivations, capture_dataset, special_ids
from interp.runs.generation import generate
from interp.runs.scoring import Scores, score

__all__ = [
    "DatasetActivations",
    "Generations",
    "Scores",
    "ShardedActivations",
    "capture_dataset",
    "generate",
    "score",
    "special_ids",
]

"""Examples -> token lists -> padded tensors.

An example is a dict. Either it is already tokenized:

    {"input_ids": [...], "loss_mask": [...], "span_s": [...], "span_o": [...]}

(masks are per-token 0/1 or bools, all the same length; only ``input_ids`` is
required), or it is text:

    {"prompt": str | list[message], "response": str,
     "span_s": [(start, end), ...], "span_o": [(start, end), ...]}

where spans are *character* spans into ``response`` (e.g. from
``interp.spans``): one ``(start, end)`` or a list of them, whose tokens form
one span mask (several biased sentences aggregate into one ``P_s``). Text examples are rendered exactly as at generation time:
the chat template's generation prompt, then the response, then the
tokenizer's EOS token, tokenized as one string. ``loss_mask`` marks the
response and EOS tokens; span masks mark the tokens overlapping each span.
Re-rendering the conversation with the assistant message instead would let
templates that rewrite history (dropping ``<think>`` blocks, as DeepSeek-R1's
does) change the very tokens we want to train on.

``collate`` pads prepared items into one ``interp.positions.Batch`` — the batch type of
``capture``, ``capture_grads`` and ``runs`` — with the masks in ``Batch.masks``
(``loss_mask``, ``span_s``, ``span_o``), so one loss ``loss(logits, batch)`` serves
training, ``capture_grads`` and evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from interp.positions import Batch
from interp.spans import token_mask

__all__ = ["collate", "encode_example", "prepare"]

MASK_KEYS = ("loss_mask", "span_s", "span_o")


def _as_spans(value: Any) -> list[tuple[int, int]]:
    if value is None:
        return []
    if len(value) == 2 and all(isinstance(v, int) for v in value):
        return [(int(value[0]), int(value[1]))]
    return [(int(a), int(b)) for a, b in value]


def encode_example(
    tokenizer: Any, example: Mapping[str, Any], *, add_eos: bool = True
) -> dict[str, list[int]]:
    """Tokenize a text example (see the module docstring) into lists."""
    if "response" not in example or "prompt" not in example:
        raise ValueError(
            f"a text example needs 'prompt' and 'response', got keys {sorted(example)}"
        )
    prompt, response = example["prompt"], example["response"]
    chat = getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, str) and not chat:
        prefix, specials = prompt, True
    else:
        if not chat:
            raise ValueError("message-list prompts need a tokenizer with a chat template")
        messages = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        )
        prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        specials = False  # the template already placed BOS and friends
    eos = tokenizer.eos_token if add_eos and tokenizer.eos_token else ""
    if eos and response.endswith(eos):  # a generation that kept its stop token
        eos = ""
    text = prefix + response + eos
    enc = tokenizer(text, add_special_tokens=specials, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    start = len(prefix)
    out: dict[str, list[int]] = {
        "input_ids": list(enc["input_ids"]),
        "loss_mask": token_mask(offsets, [(start, len(text))]).int().tolist(),
    }
    for key in ("span_s", "span_o"):
        if key in example:
            spans = _as_spans(example[key])
            for a, b in spans:
                if not 0 <= a < b <= len(response):
                    raise ValueError(
                        f"{key} char span ({a}, {b}) is empty or outside the response "
                        f"(length {len(response)})"
                    )
            out[key] = token_mask(offsets, spans, shift=start).int().tolist()
    return out


def prepare(
    examples: Sequence[Mapping[str, Any]], tokenizer: Any = None
) -> list[dict[str, list[int]]]:
    """Tokenize text examples and check token-level ones; returns lists of ints."""
    out = []
    for i, ex in enumerate(examples):
        if "input_ids" not in ex:
            if tokenizer is None:
                raise ValueError(f"example {i} is text but no tokenizer was given")
            out.append(encode_example(tokenizer, ex))
            continue
        ids = [int(t) for t in ex["input_ids"]]
        item = {"input_ids": ids}
        for key in MASK_KEYS:
            if key in ex:
                mask = [int(bool(m)) for m in ex[key]]
                if len(mask) != len(ids):
                    raise ValueError(
                        f"example {i}: {key} has {len(mask)} entries for {len(ids)} tokens"
                    )
                item[key] = mask
        out.append(item)
    if out:
        keys = set(out[0])
        for i, item in enumerate(out):
            if set(item) != keys:
                raise ValueError(
                    f"example {i} has fields {sorted(item)}, example 0 has {sorted(keys)}; "
                    "all examples need the same fields"
                )
    return out


def collate(items: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int = 0) -> Batch:
    """Right-pad prepared items into a ``Batch``: ``input_ids`` / ``attention_mask`` (long)
    and the items' masks (``loss_mask``, ``span_s``, ``span_o``) as bool ``Batch.masks``."""
    if not items:
        raise ValueError("cannot collate an empty list of examples")
    length = max(len(it["input_ids"]) for it in items)
    n = len(items)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(n, length, dtype=torch.long)
    masks: dict[str, Tensor] = {
        key: torch.zeros(n, length, dtype=torch.bool) for key in MASK_KEYS if key in items[0]
    }
    for row, it in enumerate(items):
        k = len(it["input_ids"])
        input_ids[row, :k] = torch.tensor(it["input_ids"], dtype=torch.long)
        attention_mask[row, :k] = 1
        for key, mask in masks.items():
            mask[row, :k] = torch.tensor(it[key], dtype=torch.bool)
    return Batch(input_ids, attention_mask, masks=masks)

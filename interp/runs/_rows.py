"""What the three loops share: inputs (texts, conversations, a ``Batch``, ``Generations``) as
unpadded token rows with their named positions and masks, re-padded per mini-batch; chat
options, progress bars and checks of the model and arguments.

``Generations`` (what ``generate`` returns) is defined here because every loop also takes it
as input.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from interp.positions import Batch

Message = Mapping[str, str]


# ---- rows: one example's tokens and named positions, unpadded ---------------------------------
@dataclass
class _Row:
    ids: Tensor  # [n] long, cpu
    positions: dict[str, int] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)  # name -> [n] bool
    text: str | None = None


def _is_conversation(x: Any) -> bool:
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and len(x) > 0
        and all(isinstance(m, Mapping) for m in x)
    )


def _rows_from_batch(batch: Batch) -> list[_Row]:
    """Each row's real tokens (the attention mask's 1s, which must be contiguous)."""
    ids, att = batch.input_ids.cpu(), batch.attention_mask.cpu().bool()
    positions = {k: v.cpu() for k, v in batch.positions.items()}
    masks = {k: v.cpu() for k, v in batch.masks.items()}
    rows = []
    for b in range(ids.shape[0]):
        real = att[b].nonzero().flatten()
        if real.numel() == 0:
            raise ValueError(f"row {b} of the batch has no tokens (attention_mask all 0)")
        start, end = int(real[0]), int(real[-1]) + 1
        if real.numel() != end - start:
            raise ValueError(
                f"row {b} has padding between real tokens (attention_mask "
                f"{att[b].int().tolist()[:32]}...); pad on the left or the right only"
            )
        rows.append(
            _Row(
                ids[b, start:end].clone(),
                {k: int(v[b]) - start for k, v in positions.items()},
                {k: v[b, start:end].clone() for k, v in masks.items()},
                None if batch.texts is None else batch.texts[b],
            )
        )
    return rows


def _tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("this model has no tokenizer; pass token ids (a Batch) instead of text")
    return tok


@dataclass(frozen=True)
class _ChatOptions:
    """How conversations are encoded (``interp.chat.encode``'s ``chat_format`` and template
    keyword arguments)."""

    chat_format: Any = "template"
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, chat_format: Any, chat_template_kwargs: Mapping[str, Any] | None) -> _ChatOptions:
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
            raise TypeError(
                "chat_template_kwargs must be a dict of chat-template keyword arguments (e.g. "
                f"{{'enable_thinking': False}}), got {type(chat_template_kwargs).__name__}"
            )
        return cls(chat_format, dict(chat_template_kwargs or {}))


_DEFAULT_CHAT = _ChatOptions()


def _row_of(
    model: Any, item: Any, generation_prompt: bool, chat: _ChatOptions = _DEFAULT_CHAT
) -> list[_Row]:
    """Rows of one input item: a text, a conversation or a ``Batch``."""
    if isinstance(item, Batch):
        return _rows_from_batch(item)
    tok = _tokenizer(model)
    if isinstance(item, str):
        ids = tok(item)["input_ids"]
        if not ids:
            raise ValueError(f"text {item!r} tokenizes to no tokens; drop it or give it text")
        return [_Row(torch.tensor(ids, dtype=torch.long), text=item)]
    if _is_conversation(item):
        from interp.chat import encode

        conv = list(item)
        ends_assistant = conv[-1].get("role") == "assistant"
        if generation_prompt and ends_assistant:
            raise ValueError(
                "a prompt conversation ends with an assistant message; generate continues after "
                "a generation prompt (prefilling an assistant turn is not supported: render the "
                "prompt text with interp.chat.render and pass text)"
            )
        agp = generation_prompt or None
        batch = encode(
            tok,
            [conv],
            add_generation_prompt=agp,
            padding_side="right",
            chat_format=chat.chat_format,
            **chat.template_kwargs,
        )
        return _rows_from_batch(batch)
    raise TypeError(
        "expected texts, conversations (lists of {'role', 'content'} dicts) or an interp Batch; "
        f"got {type(item).__name__}"
    )


def _rows(
    model: Any, data: Any, generation_prompt: bool = False, chat: _ChatOptions = _DEFAULT_CHAT
) -> list[_Row]:
    """Every row of ``data``: a text, a list of texts or conversations, one conversation,
    a ``Batch`` or ``Generations``."""
    if isinstance(data, Generations):
        data = data.batch
    if isinstance(data, Batch | str) or _is_conversation(data):
        rows = _row_of(model, data, generation_prompt, chat)
    elif isinstance(data, Sequence):
        rows = [r for item in data for r in _row_of(model, item, generation_prompt, chat)]
    else:
        raise TypeError(
            "expected a text, a list of texts or conversations, a Batch or Generations; got "
            f"{type(data).__name__}"
        )
    if not rows:
        raise ValueError("empty input: no texts, conversations or rows to run")
    return rows


def _collate(rows: Sequence[_Row], pad_id: int, side: str = "right") -> Batch:
    """Pad rows into a ``Batch`` (cpu). Named positions and masks that every row has are kept."""
    T = max(len(r.ids) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    pos_names = set.intersection(*(set(r.positions) for r in rows))
    mask_names = set.intersection(*(set(r.masks) for r in rows))
    positions = {k: torch.zeros(B, dtype=torch.long) for k in sorted(pos_names)}
    masks = {k: torch.zeros((B, T), dtype=torch.bool) for k in sorted(mask_names)}
    for b, r in enumerate(rows):
        n = len(r.ids)
        shift = T - n if side == "left" else 0
        ids[b, shift : shift + n] = r.ids
        att[b, shift : shift + n] = 1
        for k in positions:
            positions[k][b] = r.positions[k] + shift
        for k in masks:
            masks[k][b, shift : shift + n] = r.masks[k]
    texts = [r.text for r in rows]
    return Batch(
        ids,
        att,
        positions=positions,
        masks=masks,
        texts=texts if all(t is not None for t in texts) else None,
    )


def _pad_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _accepts(model: Any, kwarg: str) -> bool:
    """Whether ``model.forward`` takes ``kwarg`` (its own parameter or the backend's)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if kwarg in params:
        return True
    backend = getattr(model, "_backend_kwargs", None)
    return callable(backend) and kwarg in backend()


# ---- Generations: generate's result, which every loop also takes as input ----------------------
@dataclass(frozen=True)
class Generations:
    """What ``generate`` returns: ``n`` completions per prompt, prompt-major.

    Attributes:
        texts: the completion of each row, decoded without special tokens and cut before
            the first stop string.
        token_ids: the generated token ids of each row, up to and including the EOS token
            or the token that completed a stop string (so scoring them reproduces what was
            generated).
        prompt_index: the prompt each row continues (row ``i`` is sample
            ``sample_index[i]`` of prompt ``prompt_index[i]``).
        sample_index: which of the ``n`` samples of its prompt each row is.
        finish_reasons: ``"eos"``, ``"stop"`` (a stop string) or ``"length"``.
        prompts: each prompt as the model saw it (a conversation rendered by its chat
            template, with the generation prompt).
        batch: prompt + generated tokens of every row, padded on ``padding_side``, with the
            prompts' named positions (``pre_assistant``, ``user_end``, ``user`` … for
            conversations) and the masks ``generated`` (the ``token_ids``) and, for
            conversations, ``assistant`` (the same without a final EOS token).
    """

    texts: list[str]
    token_ids: list[list[int]]
    prompt_index: list[int]
    sample_index: list[int]
    finish_reasons: list[str]
    prompts: list[str]
    batch: Batch

    def __len__(self) -> int:
        return len(self.texts)

    def by_prompt(self) -> list[list[str]]:
        """The completions grouped per prompt: ``[n_prompts][n]``."""
        out: list[list[str]] = [[] for _ in self.prompts]
        for p, text in zip(self.prompt_index, self.texts, strict=True):
            out[p].append(text)
        return out

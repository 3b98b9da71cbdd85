"""Chat serialization with positions pinned to the tokenizer's chat template.

``encode`` renders conversations with ``tokenizer.apply_chat_template``,
finds each message's content as a character span of the rendered text, and
maps spans to tokens through the tokenizer's offsets. Named positions
(one token per row):

* ``user_end``       last token of the last user message's content
* ``pre_assistant``  the token just before the assistant's content begins (the
  last token of the generation prompt when there is no assistant message)
* ``assistant_1`` … ``assistant_k``  the first k assistant content tokens

and named masks: ``assistant`` (the last assistant message's content tokens)
and ``user`` (the last user message's content tokens). Positions are correct
under left and right padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interp.positions import Batch

__all__ = ["char_span_to_tokens", "encode", "render"]

Message = Mapping[str, str]


def render(tokenizer: Any, conversation: Sequence[Message], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; set "
            "tokenizer.chat_template to a Jinja template or use an instruct/chat model's tokenizer"
        )
    return tokenizer.apply_chat_template(
        list(conversation), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def char_span_to_tokens(offsets: Int[Tensor, "pos 2"], start: int, end: int) -> tuple[int, int]:
    """Token span ``[first, last + 1)`` of the tokens overlapping characters ``[start, end)``."""
    s, e = offsets[:, 0], offsets[:, 1]
    hit = ((e > start) & (s < end) & (e > s)).nonzero().flatten()
    if hit.numel() == 0:
        raise ValueError(f"no token overlaps characters [{start}, {end})")
    return int(hit[0]), int(hit[-1]) + 1


def _content_spans(
    tokenizer: Any, text: str, conversation: Sequence[Message]
) -> list[tuple[int, int]]:
    """Character span of each message's content in ``text``.

    Message i's content is the last occurrence of its text in the rendering of
    the first i+1 messages, which is a prefix of the full rendering; this is
    immune to the content also appearing earlier (e.g. in a default system prompt).
    """
    spans, cursor = [], 0
    for i, msg in enumerate(conversation):
        content = msg["content"]
        prefix = render(tokenizer, conversation[: i + 1], add_generation_prompt=False)
        found = None
        for candidate in (content, content.strip()):
            at = prefix.rfind(candidate) if candidate else -1
            if at >= cursor and text[at : at + len(candidate)] == candidate:
                found = (at, at + len(candidate))
                break
        if found is None:
            raise ValueError(
                f"could not find the {msg['role']} message content in the rendered chat; the "
                "chat template rewrites message text, so positions cannot be pinned"
            )
        spans.append(found)
        cursor = found[1]
    return spans


def encode(
    tokenizer: Any,
    conversations: Sequence[Message] | Sequence[Sequence[Message]],
    *,
    add_generation_prompt: bool | None = None,
    padding_side: str = "left",
    first_k: int = 3,
    device: torch.device | str | None = None,
) -> Batch:
    """Encode conversations into a padded ``Batch`` with named chat positions.

    Args:
        conversations: one conversation (a list of ``{"role", "content"}``) or several.
        add_generation_prompt: default: True when the last message is not the assistant's.
        padding_side: ``"left"`` (for generation) or ``"right"``.
        first_k: how many ``assistant_i`` positions to name.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if conversations and isinstance(conversations[0], Mapping):
        conversations = [conversations]  # type: ignore[list-item]
    convs = [list(c) for c in conversations]  # type: ignore[arg-type]
    if not convs or any(not c for c in convs):
        raise ValueError("encode needs at least one non-empty conversation")
    ends_assistant = [c[-1]["role"] == "assistant" for c in convs]
    if len(set(ends_assistant)) > 1:
        raise ValueError("either every conversation ends with an assistant message or none does")
    has_answer = ends_assistant[0]
    agp = (not has_answer) if add_generation_prompt is None else add_generation_prompt
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token"
        )

    rows: list[dict[str, Any]] = []
    for conv in convs:
        text = render(tokenizer, conv, agp)
        spans = _content_spans(tokenizer, text, conv)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        offsets = torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)
        roles = [m["role"] for m in conv]
        if "user" not in roles:
            raise ValueError("a conversation needs a user message to pin user_end")
        u = len(roles) - 1 - roles[::-1].index("user")
        u0, u1 = char_span_to_tokens(offsets, *spans[u])
        row = {"ids": ids, "offsets": offsets, "text": text, "user": (u0, u1)}
        if has_answer:
            a0, a1 = char_span_to_tokens(offsets, *spans[-1])
            row["assistant"] = (a0, a1)
            row["pre_assistant"] = a0 - 1
        else:
            row["pre_assistant"] = len(ids) - 1
        rows.append(row)

    T = max(len(r["ids"]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), int(tokenizer.pad_token_id), dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    offs = torch.zeros((B, T, 2), dtype=torch.long)
    pos: dict[str, list[int]] = {"user_end": [], "pre_assistant": []}
    masks = {"user": torch.zeros((B, T), dtype=torch.bool)}
    if has_answer:
        masks["assistant"] = torch.zeros((B, T), dtype=torch.bool)
        n_first = min(first_k, min(r["assistant"][1] - r["assistant"][0] for r in rows))
        pos.update({f"assistant_{i + 1}": [] for i in range(n_first)})
    for b, r in enumerate(rows):
        n = len(r["ids"])
        shift = T - n if padding_side == "left" else 0
        input_ids[b, shift : shift + n] = r["ids"]
        attn[b, shift : shift + n] = 1
        offs[b, shift : shift + n] = r["offsets"]
        pos["user_end"].append(shift + r["user"][1] - 1)
        pos["pre_assistant"].append(shift + r["pre_assistant"])
        masks["user"][b, shift + r["user"][0] : shift + r["user"][1]] = True
        if has_answer:
            a0, a1 = r["assistant"]
            masks["assistant"][b, shift + a0 : shift + a1] = True
            for i in range(n_first):
                pos[f"assistant_{i + 1}"].append(shift + a0 + i)
    batch = Batch(
        input_ids,
        attn,
        positions={k: torch.tensor(v, dtype=torch.long) for k, v in pos.items()},
        masks=masks,
        texts=[r["text"] for r in rows],
        offsets=offs,
    )
    return batch.to(device) if device is not None else batch

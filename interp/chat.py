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

Template keyword arguments (``enable_thinking=False`` for Qwen3-style templates,
``tools=...``) go to ``apply_chat_template``. Templates that render a message
differently depending on what follows it (Qwen3 inserts an empty
``<think>\n\n</think>\n\n`` before the *last* assistant turn and drops it from earlier
ones) keep their positions: each content span is located in the full rendering.
Tokenizers without a chat template (base models) raise unless the caller asks for a
plain format (``chat_format="plain"`` or ``"auto"``, or a ``PlainFormat``):
``"User: …\nAssistant: …"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interp.positions import Batch

__all__ = [
    "PlainFormat",
    "char_span_to_tokens",
    "check_generation_prefix",
    "conversations",
    "encode",
    "render",
    "thinking_kwargs",
    "training_examples",
]

Message = Mapping[str, str]

# apply_chat_template's own arguments that encode/render set themselves.
_RESERVED = frozenset(
    {
        "conversation",
        "tokenize",
        "add_generation_prompt",
        "return_dict",
        "return_tensors",
        "padding",
        "truncation",
        "max_length",
        "return_assistant_tokens_mask",
    }
)


@dataclass(frozen=True)
class PlainFormat:
    """A plain prompt format for tokenizers without a chat template (base models).

    Each message is one ``"{Label}: {content}"`` line, joined by ``separator``; the
    generation prompt is a final ``"{assistant}:"`` (no trailing space: the model's first
    token carries it). ``[user "Hi", assistant "Hello"]`` renders as
    ``"User: Hi\nAssistant: Hello"``, ``[user "Hi"]`` with the generation prompt as
    ``"User: Hi\nAssistant:"``. Roles other than system / user / assistant are
    capitalized (``"tool"`` -> ``"Tool"``). Text is tokenized with the tokenizer's special
    tokens (a BOS token where the tokenizer adds one).
    """

    system: str = "System"
    user: str = "User"
    assistant: str = "Assistant"
    separator: str = "\n"

    def render(self, conversation: Sequence[Message], add_generation_prompt: bool) -> str:
        labels = {"system": self.system, "user": self.user, "assistant": self.assistant}
        lines = [
            f"{labels.get(m['role'], str(m['role']).capitalize())}: {m['content']}"
            for m in conversation
        ]
        if add_generation_prompt:
            lines.append(f"{self.assistant}:")
        return self.separator.join(lines)


def _plain_format(tokenizer: Any, chat_format: Any) -> PlainFormat | None:
    """The plain format to use, or None for the tokenizer's chat template."""
    if isinstance(chat_format, PlainFormat):
        return chat_format
    if chat_format == "plain":
        return PlainFormat()
    if chat_format == "auto":
        return None if getattr(tokenizer, "chat_template", None) else PlainFormat()
    if chat_format == "template":
        return None
    raise ValueError(
        f"chat_format must be 'template', 'plain', 'auto' or a PlainFormat, got {chat_format!r}"
    )


def render(
    tokenizer: Any,
    conversation: Sequence[Message],
    add_generation_prompt: bool,
    *,
    chat_format: str | PlainFormat = "template",
    **template_kwargs: Any,
) -> str:
    """The text of ``conversation`` as the model reads it.

    Args:
        add_generation_prompt: end with the assistant's turn header (what the model
            continues from).
        chat_format: ``"template"`` (the tokenizer's chat template; a tokenizer without one
            raises), ``"plain"`` (``PlainFormat()`` whatever the tokenizer has), ``"auto"``
            (the chat template when the tokenizer has one, else ``PlainFormat()``) or a
            ``PlainFormat``.
        template_kwargs: passed to ``tokenizer.apply_chat_template`` and so to the template
            (``enable_thinking=False`` for Qwen3-style templates, ``tools=...``). A plain
            format asked for explicitly refuses them; ``"auto"`` ignores them when it falls
            back to the plain format.
    """
    reserved = sorted(_RESERVED & set(template_kwargs))
    if reserved:
        raise TypeError(f"render/encode set {reserved} themselves; drop them")
    plain = _plain_format(tokenizer, chat_format)
    if plain is not None:
        if template_kwargs and chat_format != "auto":
            raise TypeError(
                f"template keyword arguments {sorted(template_kwargs)} have no effect on a "
                "plain format"
            )
        return plain.render(conversation, add_generation_prompt)
    if not getattr(tokenizer, "chat_template", None) and "chat_template" not in template_kwargs:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; set "
            "tokenizer.chat_template to a Jinja template, use an instruct/chat model's "
            "tokenizer, or pass chat_format='plain' (or 'auto') for a plain "
            "'User: ...\\nAssistant:' format"
        )
    return tokenizer.apply_chat_template(
        list(conversation),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )


def char_span_to_tokens(offsets: Int[Tensor, "pos 2"], start: int, end: int) -> tuple[int, int]:
    """Token span ``[first, last + 1)`` of the tokens overlapping characters ``[start, end)``."""
    s, e = offsets[:, 0], offsets[:, 1]
    hit = ((e > start) & (s < end) & (e > s)).nonzero().flatten()
    if hit.numel() == 0:
        raise ValueError(f"no token overlaps characters [{start}, {end})")
    return int(hit[0]), int(hit[-1]) + 1


def _content_spans(
    render_prefix: Callable[[Sequence[Message]], str], text: str, conversation: Sequence[Message]
) -> list[tuple[int, int]]:
    """Character span of each message's content in ``text``.

    Message i's content is the last occurrence of its text in the rendering of
    the first i+1 messages, which is usually a prefix of the full rendering; this is
    immune to the content also appearing earlier (e.g. in a default system prompt).
    Where the template renders a message differently when it is the last one (Qwen3
    adds an empty thinking block to the last assistant turn only), the prefix is not a
    prefix of ``text``: the content is then the occurrence in ``text``, after the
    previous message's content, closest to where the prefix rendering has it.
    """
    spans, cursor = [], 0
    for i, msg in enumerate(conversation):
        content = msg["content"]
        prefix = render_prefix(conversation[: i + 1])
        found = None
        for candidate in (content, content.strip()):
            at = prefix.rfind(candidate) if candidate else -1
            if at < 0:
                continue
            if at >= cursor and text[at : at + len(candidate)] == candidate:
                found = (at, at + len(candidate))
                break
            hits = [m.start() for m in re.finditer(re.escape(candidate), text[cursor:])]
            if hits:
                near = min(hits, key=lambda h: abs(cursor + h - at))
                found = (cursor + near, cursor + near + len(candidate))
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
    chat_format: str | PlainFormat = "template",
    **template_kwargs: Any,
) -> Batch:
    """Encode conversations into a padded ``Batch`` with named chat positions.

    Args:
        conversations: one conversation (a list of ``{"role", "content"}``) or several.
        add_generation_prompt: default: True when the last message is not the assistant's.
        padding_side: ``"left"`` (for generation) or ``"right"``.
        first_k: how many ``assistant_i`` positions to name.
        chat_format: ``"template"`` (default: the tokenizer's chat template, an error
            without one), ``"plain"``, ``"auto"`` or a ``PlainFormat`` (see ``render``).
        template_kwargs: passed to ``apply_chat_template`` (e.g. ``enable_thinking=False``).

    ``pre_assistant`` is the token just before the assistant's content: with a template
    that puts an empty thinking block before a teacher-forced answer (Qwen3) it is the
    block's last token, as it is at the end of a generation prompt rendered with
    ``enable_thinking=False``.
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

    plain = _plain_format(tokenizer, chat_format) is not None

    def render_prefix(messages: Sequence[Message]) -> str:
        return render(tokenizer, messages, False, chat_format=chat_format, **template_kwargs)

    rows: list[dict[str, Any]] = []
    for conv in convs:
        text = render(tokenizer, conv, agp, chat_format=chat_format, **template_kwargs)
        spans = _content_spans(render_prefix, text, conv)
        # A chat template writes its own special tokens (BOS); a plain format gets the
        # tokenizer's.
        enc = tokenizer(text, add_special_tokens=plain, return_offsets_mapping=True)
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


def thinking_kwargs(tokenizer: Any, enable_thinking: bool = False) -> dict[str, Any]:
    """Template keyword arguments for a thinking switch: ``{"enable_thinking": ...}`` for
    templates that read it (Qwen3), ``{}`` for the others; asking to leave thinking on with
    a template that has no such switch raises ``ValueError``."""
    if "enable_thinking" in (getattr(tokenizer, "chat_template", None) or ""):
        return {"enable_thinking": enable_thinking}
    if enable_thinking:
        raise ValueError("this model's chat template has no thinking switch (enable_thinking)")
    return {}


def check_generation_prefix(
    tokenizer: Any, conversation: Sequence[Message], **template_kwargs: Any
) -> dict[str, Any]:
    """Check that a teacher-forced conversation (ending with the assistant's answer) reads
    its positions where a generation would: its tokens up to ``pre_assistant`` must be
    exactly the generation prompt's (the conversation without the answer); ``RuntimeError``
    otherwise (e.g. a thinking template left with thinking on, whose generation prompt
    stops before the empty think block the answer gets). Returns the teacher-forced
    ``text``, the ``chat_template_kwargs``, each named position's ``index`` and decoded
    ``token``."""
    forced = encode(tokenizer, [conversation], padding_side="right", **template_kwargs)
    prompt = encode(tokenizer, [conversation[:-1]], **template_kwargs)
    pos = {k: int(v[0]) for k, v in forced.positions.items()}
    ids = forced.input_ids[0].tolist()
    if ids[: pos["pre_assistant"] + 1] != prompt.input_ids[0].tolist():
        raise RuntimeError(
            f"pre_assistant does not end the generation prompt ({template_kwargs}): "
            f"{forced.texts[0]!r}"
        )
    tokens = {k: tokenizer.decode([ids[i]]) for k, i in pos.items()}
    return {
        "text": forced.texts[0],
        "chat_template_kwargs": dict(template_kwargs),
        "index": pos,
        "token": tokens,
    }


def conversations(
    system: str | Sequence[str] | None,
    users: Sequence[str],
    answers: Sequence[str] | None = None,
) -> list[list[dict[str, str]]]:
    """One conversation per user message: a system message first (a list of system prompts
    is cycled through; ``None``: no system message), the user's message, and the
    assistant's answer where ``answers`` (one per user message) are given."""
    systems = [system] if system is None or isinstance(system, str) else list(system)
    if not systems:
        raise ValueError("conversations: an empty list of system prompts")
    if answers is not None and len(answers) != len(users):
        raise ValueError(f"{len(answers)} answers for {len(users)} user messages")
    out = []
    for i, user in enumerate(users):
        sys_prompt = systems[i % len(systems)]
        conv = [] if sys_prompt is None else [{"role": "system", "content": sys_prompt}]
        conv.append({"role": "user", "content": user})
        if answers is not None:
            conv.append({"role": "assistant", "content": answers[i]})
        out.append(conv)
    return out


def training_examples(
    tokenizer: Any, conversations: Sequence[Sequence[Message]], **template_kwargs: Any
) -> list[dict[str, list[int]]]:
    """Token-level training examples as ``interp.train`` takes them, from teacher-forced
    conversations rendered by the chat template (``encode``): ``input_ids`` without padding
    and a ``loss_mask`` on the assistant's content tokens (the ``assistant`` mask)."""
    batch = encode(
        tokenizer, [list(c) for c in conversations], padding_side="right", **template_kwargs
    )
    rows = zip(batch.input_ids, batch.masks["assistant"], batch.attention_mask.sum(1), strict=True)
    return [{"input_ids": i[:n].tolist(), "loss_mask": m[:n].tolist()} for i, m, n in rows]

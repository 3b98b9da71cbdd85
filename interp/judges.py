"""Judges: score texts or conversations with a language model or a classifier.

Three kinds, one interface — ``judge(items, batch_size=..., progress=...) -> JudgeResult``:

* ``RubricJudge``: an LM reads a judge prompt and the next-token distribution over the
  digits of a scale (1–5, 0–9 …) gives the expected score ``Σ d·p(d) / Σ p(d)`` (the
  G-Eval read-out, Liu et al. 2023), with the probability mass on the digits reported.
* ``YesNoJudge``: ``P(yes) / (P(yes) + P(no))`` at the answer token, over the answer
  words' token variants (``"Yes"``, ``" Yes"``, ``"yes"`` …), mass reported.
* ``ClassifierJudge``: any local Hugging Face sequence classifier (a model directory or
  model object) through ``transformers.pipeline("text-classification")``, its labels
  mapped to scores.

Prompts are arguments: a ``str.format`` template (or a list of chat messages whose
contents are templates) filled from each item — ``{text}`` for a text, the item's keys
for a dict, ``{prompt}`` / ``{response}`` / ``{conversation}`` / ``{text}`` for a
conversation. Nothing is scored silently: an item whose read-out is unusable gets a
status other than ``"ok"`` and a NaN score, with its raw read-out kept:

* ``"malformed"``: less than ``min_mass`` of the probability is on the answer tokens
  (an LM judge that is not answering in the format) or on the mapped labels;
* ``"out_of_range"``: a rubric judge putting more mass on digits outside the scale than
  on the scale;
* ``"too_long"``: the input does not fit the model's context (not run).

LM judges on reasoning models read their answer *after* the reasoning block, never inside
it: with ``thinking="skip"`` (the default) a template that takes ``enable_thinking`` is
rendered with ``enable_thinking=False`` (Qwen3: an empty ``<think>\\n\\n</think>\\n\\n``
ends the generation prompt), a generation prompt that opens a reasoning block
(DeepSeek-R1: ``<think>\\n``) has it closed, and a template that knows reasoning blocks
(or strips them from earlier turns, as R1's distilled models' templates do) but opened none
gets an empty one. The judge texts (``JudgeResult.inputs``) show exactly
what the judge read.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp.chat import PlainFormat, render

__all__ = [
    "STATUSES",
    "ClassifierJudge",
    "Judge",
    "JudgeResult",
    "RubricJudge",
    "YesNoJudge",
    "judge_inputs",
]

STATUSES = ("ok", "malformed", "out_of_range", "too_long")


@dataclass(frozen=True)
class JudgeResult:
    """What a judge returns, one entry per input item, in input order.

    Attributes:
        scores: the score of each item (float32); NaN unless its status is ``"ok"``.
        status: ``"ok"``, ``"malformed"``, ``"out_of_range"`` or ``"too_long"`` (see the
            module docstring).
        readout: the raw read-out: ``readout[i, k]`` is the probability of option
            ``options[k]`` (a digit, ``"yes"`` / ``"no"``, a classifier label) for item
            ``i``, before any renormalization; NaN rows for items not run.
        options: the columns of ``readout``.
        mass: ``readout`` summed over the options that enter the score: the probability
            the judge put on a valid answer (1 for a classifier label read as is).
        inputs: what the judge read for each item (the rendered prompt, ending where the
            answer is read).
    """

    scores: Float[Tensor, " n"]
    status: tuple[str, ...]
    readout: Float[Tensor, "n k"]
    options: tuple[str, ...]
    mass: Float[Tensor, " n"]
    inputs: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.status)

    @property
    def ok(self) -> Bool[Tensor, " n"]:
        """Which items were scored."""
        return torch.tensor([s == "ok" for s in self.status], dtype=torch.bool)

    def counts(self) -> dict[str, int]:
        """How many items have each status."""
        return dict(Counter(self.status))

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per item: score (None unless ok), status, mass, read-out."""
        out = []
        for i, st in enumerate(self.status):
            score = float(self.scores[i])
            out.append(
                {
                    "score": score if st == "ok" and math.isfinite(score) else None,
                    "status": st,
                    "mass": None if math.isnan(float(self.mass[i])) else float(self.mass[i]),
                    "readout": {
                        o: (None if math.isnan(float(p)) else float(p))
                        for o, p in zip(self.options, self.readout[i], strict=True)
                    },
                }
            )
        return out


class Judge(Protocol):
    """What every judge is: a callable from items to a ``JudgeResult``."""

    def __call__(self, items: Any, *, batch_size: int = 8, progress: bool = True) -> JudgeResult:
        """Judge ``items``: texts, conversations or dicts of template fields."""
        ...


# ---- items and prompts -------------------------------------------------------------------------
def _is_message(x: Any) -> bool:
    return isinstance(x, Mapping) and "role" in x and "content" in x


def _is_conversation(x: Any) -> bool:
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and len(x) > 0
        and all(_is_message(m) for m in x)
    )


def _items(items: Any) -> list[Any]:
    """The list of items: one text, one conversation or one field dict count as one item."""
    if isinstance(items, str) or _is_conversation(items) or isinstance(items, Mapping):
        return [items]
    if not isinstance(items, Sequence):
        raise TypeError(
            "a judge takes texts, conversations (lists of {'role', 'content'} messages) or "
            f"dicts of template fields; got {type(items).__name__}"
        )
    if len(items) == 0:
        raise ValueError("empty input: nothing to judge")
    return list(items)


def _fields(item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        return {"text": item}
    if _is_conversation(item):
        conv = list(item)
        users = [m["content"] for m in conv if m["role"] == "user"]
        last = conv[-1]
        return {
            "prompt": users[-1] if users else "",
            "response": last["content"] if last["role"] == "assistant" else "",
            "conversation": "\n".join(f"{m['role']}: {m['content']}" for m in conv),
            "text": last["content"],
        }
    if isinstance(item, Mapping):
        return {str(k): v for k, v in item.items()}
    raise TypeError(
        "each item is a text, a conversation (a list of {'role', 'content'} messages) or a "
        f"dict of template fields; got {type(item).__name__}"
    )


def _placeholders(template: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from exc
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in parsed if name}


class _Template:
    """A ``str.format`` template or a list of message templates, filled per item."""

    def __init__(self, template: str | Sequence[Mapping[str, str]]) -> None:
        if isinstance(template, str):
            self.messages = None
            self.text = template
            sources = [template]
        elif _is_conversation(template):
            self.messages = [dict(m) for m in template]
            self.text = None
            sources = [m["content"] for m in self.messages]
        else:
            raise TypeError(
                "template must be a str.format string or a list of {'role', 'content'} "
                f"messages whose contents are templates; got {type(template).__name__}"
            )
        self.fields = set().union(*(_placeholders(s) for s in sources))
        if not self.fields:
            raise ValueError(
                "the template has no {placeholder}: every item would get the same prompt "
                "(use {text} for texts, {prompt}/{response} for conversations, or your own "
                "keys with dict items)"
            )

    def fill(self, item: Any, index: int) -> tuple[str | None, list[dict[str, str]] | None]:
        fields = _fields(item)
        missing = sorted(self.fields - set(fields))
        if missing:
            raise KeyError(
                f"item {index} has no field(s) {missing} for the template; it has "
                f"{sorted(fields)} (texts give {{text}}; conversations {{prompt}}, "
                "{response}, {conversation}, {text}; dicts their keys)"
            )
        if self.text is not None:
            return self.text.format(**fields), None
        assert self.messages is not None
        return None, [{**m, "content": m["content"].format(**fields)} for m in self.messages]


def _template_source(tokenizer: Any, template_kwargs: Mapping[str, Any]) -> str:
    source = template_kwargs.get("chat_template") or getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates
        source = "\n".join(str(v) for v in source.values())
    return source if isinstance(source, str) else ""


def judge_inputs(
    tokenizer: Any,
    content: str | Sequence[Mapping[str, str]],
    *,
    chat_format: str | PlainFormat | None = "template",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    thinking: str = "skip",
    think_tags: tuple[str, str] = ("<think>", "</think>"),
    prefill: str = "",
) -> str:
    """The text an LM judge reads for one filled prompt: rendered, reasoning block closed,
    ``prefill`` appended.

    Args:
        content: the judge's user message, or its messages.
        chat_format: ``"template"`` / ``"plain"`` / ``"auto"`` / a ``PlainFormat``, as in
            ``interp.chat.render`` (the generation prompt is added), or ``None``: ``content``
            (a string) is the whole text, for completion-style judges on base models.
        chat_template_kwargs: passed to the chat template.
        thinking: ``"skip"``: the read-out comes after an empty or closed reasoning block
            (see the module docstring); ``"as_is"``: the template's generation prompt
            unchanged.
        think_tags: the reasoning block's opening and closing tags.
        prefill: text the judge's answer starts with (e.g. ``"Rating (1-5):"``); the
            answer is read right after it.
    """
    if thinking not in ("skip", "as_is"):
        raise ValueError(f"thinking must be 'skip' or 'as_is', got {thinking!r}")
    if chat_format is None:
        if not isinstance(content, str):
            raise ValueError("chat_format=None reads the template as plain text: pass a str")
        return content + prefill
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    kwargs = dict(chat_template_kwargs or {})
    source = _template_source(tokenizer, kwargs)
    uses_template = not isinstance(chat_format, PlainFormat) and chat_format != "plain"
    uses_template = uses_template and bool(source)
    if thinking == "skip" and uses_template and "enable_thinking" in source:
        kwargs.setdefault("enable_thinking", False)
    if not uses_template and chat_format == "auto":
        kwargs = {}
    text = render(tokenizer, messages, True, chat_format=chat_format, **kwargs)
    if thinking == "skip" and uses_template:
        open_tag, close_tag = think_tags
        head = render(tokenizer, messages, False, chat_format=chat_format, **kwargs)
        tail = text[len(head) :] if text.startswith(head) else text
        if tail.rfind(open_tag) > tail.rfind(close_tag):  # the prompt opened a block: close it
            text += ("" if text.endswith("\n") else "\n") + close_tag + "\n\n"
        elif (open_tag in source or close_tag in source) and close_tag not in tail:
            # The template knows reasoning blocks (or strips them from history) but this
            # prompt opened none: the model would open one; give it an empty one.
            text += f"{open_tag}\n\n{close_tag}\n\n"
    return text + prefill


# ---- LM judges ---------------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _max_length(model: Any) -> int | None:
    """The longest input the model takes (absolute positions), when its config says."""
    for holder in (getattr(model, "model", None), model):
        config = getattr(holder, "config", None)
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        n_ctx = getattr(getattr(holder, "cfg", None), "n_ctx", None)
        if isinstance(n_ctx, int) and n_ctx > 0:
            return n_ctx
    return None


def _vocab(tokenizer: Any) -> list[str]:
    """Each token id's text as it reads after another token (special tokens: empty).

    Decoded after an anchor token and with the anchor's text cut off, so SentencePiece
    tokenizers keep the leading space of ``"▁4"`` (decoded alone, it would be dropped).
    """
    n = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(i))
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    alone = tokenizer.batch_decode([[i] for i in range(n)], **kw)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    head = tokenizer.decode(anchor, **kw)
    after = tokenizer.batch_decode([[*anchor, i] for i in range(n)], **kw)
    texts = [b[len(head) :] if b.startswith(head) else a for a, b in zip(alone, after, strict=True)]
    return ["" if i in special else t for i, t in enumerate(texts)]


def _accepts(model: Any, kwarg: str) -> bool:
    import inspect

    try:
        if kwarg in inspect.signature(model.forward).parameters:
            return True
    except (TypeError, ValueError):
        return False
    backend = getattr(model, "_backend_kwargs", None)
    return callable(backend) and kwarg in backend()


class _NextTokenJudge:
    """Shared machinery of LM judges: render, tokenize, one forward pass per batch, and
    the next-token probabilities of each option's token ids at the end of the text."""

    kind = "judge"

    def __init__(
        self,
        model: Any,
        template: str | Sequence[Mapping[str, str]],
        *,
        prefill: str = "",
        chat_format: str | PlainFormat | None = "template",
        chat_template_kwargs: Mapping[str, Any] | None = None,
        thinking: str = "skip",
        think_tags: tuple[str, str] = ("<think>", "</think>"),
        append_space: bool | None = None,
        min_mass: float = 0.5,
    ) -> None:
        tok = getattr(model, "tokenizer", None)
        if tok is None or not callable(getattr(model, "forward", None)):
            raise TypeError(
                "an LM judge takes a HookedModel with a tokenizer (interp.load / interp.tiny); "
                f"got {type(model).__name__}"
            )
        if not 0.0 <= min_mass <= 1.0:
            raise ValueError(f"min_mass must be in [0, 1], got {min_mass!r}")
        if thinking not in ("skip", "as_is"):
            raise ValueError(f"thinking must be 'skip' or 'as_is', got {thinking!r}")
        self.model = model
        self.tokenizer = tok
        self.template = _Template(template)
        if chat_format is None and self.template.messages is not None:
            raise ValueError("chat_format=None reads one plain text: the template must be a str")
        self.prefill = prefill
        self.chat_format = chat_format
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.thinking = thinking
        self.think_tags = think_tags
        self.append_space = append_space
        self.min_mass = float(min_mass)
        self._token_ids: dict[str, list[int]] | None = None
        self._decoded: list[str] | None = None

    # -- answer tokens ---------------------------------------------------------------------------
    def _answer_tokens(self, vocab: list[str]) -> dict[str, list[int]]:
        raise NotImplementedError

    @property
    def token_ids(self) -> dict[str, list[int]]:
        """Option -> the token ids whose probabilities are summed for it."""
        if self._token_ids is None:
            self._token_ids = self._answer_tokens(self._vocab())
        return self._token_ids

    def _vocab(self) -> list[str]:
        if self._decoded is None or len(self._decoded) != len(self.tokenizer):
            self._decoded = _vocab(self.tokenizer)
        return self._decoded

    def _needs_space(self) -> bool:
        """Whether the answer follows a space token: the tokenizer has no single-token
        space-prefixed form of some option (digits in SmolLM2's / Llama's vocabularies),
        so after ``"Score:"`` the model's next token is the space, not the answer."""
        if self.append_space is not None:
            return self.append_space
        vocab = self._vocab()
        for ids in self.token_ids.values():
            if not any(vocab[i][:1].isspace() and vocab[i].strip() for i in ids):
                return True
        return False

    def _text(self, item: Any, index: int) -> str:
        text, messages = self.template.fill(item, index)
        content = text if text is not None else messages
        assert content is not None
        out = judge_inputs(
            self.tokenizer,
            content,
            chat_format=self.chat_format,
            chat_template_kwargs=self.chat_template_kwargs,
            thinking=self.thinking,
            think_tags=self.think_tags,
            prefill=self.prefill,
        )
        if out and not out[-1].isspace() and self._needs_space():
            out += " "
        return out

    # -- running ---------------------------------------------------------------------------------
    def _probabilities(
        self, texts: Sequence[str], batch_size: int, progress: bool
    ) -> tuple[Tensor, list[bool]]:
        """``[n, n_options + 1]`` probabilities (the options, then the extra column
        ``_extra_ids`` gives) at each text's end; and which texts were too long."""
        from interp.positions import Batch, running

        tok = self.tokenizer
        plain = self.chat_format is None or isinstance(self.chat_format, PlainFormat)
        plain = plain or self.chat_format == "plain"
        plain = plain or (self.chat_format == "auto" and not getattr(tok, "chat_template", None))
        ids = [tok(t, add_special_tokens=plain)["input_ids"] for t in texts]
        empty = [i for i in range(len(texts)) if not ids[i]]
        if empty:
            raise ValueError(f"items {empty[:8]} render to no tokens")
        limit = _max_length(self.model)
        too_long = [limit is not None and len(x) > limit for x in ids]
        columns = [*self.token_ids.values(), self._extra_ids()]
        out = torch.full((len(texts), len(columns)), float("nan"), dtype=torch.float32)
        todo = sorted(
            (i for i in range(len(texts)) if not too_long[i]),
            key=lambda i: -len(ids[i]),
        )
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        keep_kw = _accepts(self.model, "logits_to_keep")
        bar = _progress(len(todo), self.kind, progress)
        try:
            for s in range(0, len(todo), batch_size):
                chunk = todo[s : s + batch_size]
                lengths = [len(ids[i]) for i in chunk]
                T = max(lengths)
                input_ids = torch.full((len(chunk), T), int(pad), dtype=torch.long)
                att = torch.zeros((len(chunk), T), dtype=torch.long)
                for r, i in enumerate(chunk):  # right padding: positions start at 0 per row
                    input_ids[r, : lengths[r]] = torch.tensor(ids[i], dtype=torch.long)
                    att[r, : lengths[r]] = 1
                batch = Batch(input_ids, att).to(self.model.device)
                kw: dict[str, Any] = {}
                if keep_kw:
                    kw["logits_to_keep"] = T - min(lengths) + 1
                with torch.no_grad(), running(batch):
                    logits = self.model.forward(batch.input_ids, batch.attention_mask, **kw)
                offset = T - logits.shape[1]
                last = torch.tensor([n - 1 - offset for n in lengths], device=logits.device)
                rows = torch.arange(len(chunk), device=logits.device)
                probs = logits[rows, last].float().softmax(-1).cpu()
                del logits
                for c, col in enumerate(columns):
                    if col:
                        out[chunk, c] = probs[:, col].sum(-1)
                    else:
                        out[chunk, c] = 0.0
                bar.update(len(chunk))
        finally:
            bar.close()
        return out, too_long

    def _extra_ids(self) -> list[int]:
        return []

    def _score(self, probs: Tensor) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        """(readout, scores, mass, status) from the option probabilities of run items."""
        raise NotImplementedError

    def __call__(self, items: Any, *, batch_size: int = 8, progress: bool = True) -> JudgeResult:
        """Judge ``items``: texts, conversations or dicts of template fields.

        Args:
            batch_size: prompts per forward pass (sorted by length first; results come
                back in input order).
            progress: show a tqdm bar.
        """
        _check_batch_size(batch_size)
        listed = _items(items)
        texts = [self._text(item, i) for i, item in enumerate(listed)]
        probs, too_long = self._probabilities(texts, batch_size, progress)
        readout, scores, mass, status = self._score(probs)
        for i, long in enumerate(too_long):
            if long:
                status[i] = "too_long"
        scores = torch.where(torch.tensor([s == "ok" for s in status]), scores, float("nan"))
        return JudgeResult(
            scores=scores,
            status=tuple(status),
            readout=readout,
            options=tuple(self.token_ids),
            mass=mass,
            inputs=tuple(texts),
        )


class RubricJudge(_NextTokenJudge):
    """Expected score over a digit scale from an LM's next-token distribution.

    The judge reads the filled ``template`` (rendered as a user turn with the model's chat
    template, by default) and the probability ``p(d)`` of each digit ``d`` of ``scale`` as
    the next token — summed over the digit's token variants (``"4"``, ``" 4"``, ``"▁4"``) —
    gives ``score = Σ d·p(d) / Σ p(d)`` and ``mass = Σ p(d)``. When the tokenizer has no
    single space-prefixed digit token, a space is appended after a ``prefill`` that does
    not end in whitespace (the model's next token after ``"Score:"`` would be the space).

    Args:
        model: a ``HookedModel`` (``interp.load`` / ``interp.tiny``); hooks active around
            the call apply.
        template: the judge prompt: a ``str.format`` template, or a list of
            ``{"role", "content"}`` messages whose contents are templates.
        scale: the digits of the rubric, single digits 0–9 (default 1–5).
        prefill: text the answer starts with, after the generation prompt
            (``"Score (1-5):"``); it makes small models answer in the format.
        chat_format: how the prompt is rendered (``interp.chat.render``); ``None``: the
            filled template is the whole text (completion-style judges on base models).
        chat_template_kwargs: passed to the chat template.
        thinking: ``"skip"`` (read after an empty / closed reasoning block) or ``"as_is"``.
        think_tags: the reasoning block's tags.
        append_space: force (True) or forbid (False) the space before the answer; default:
            decided from the vocabulary.
        min_mass: below this mass on the scale's digits an item is ``"malformed"`` (or
            ``"out_of_range"`` when the other digits have more mass than the scale).
    """

    kind = "rubric judge"

    def __init__(
        self,
        model: Any,
        template: str | Sequence[Mapping[str, str]],
        *,
        scale: Sequence[int] = (1, 2, 3, 4, 5),
        **kwargs: Any,
    ) -> None:
        digits = list(scale)
        if len(digits) < 2 or len(set(digits)) != len(digits):
            raise ValueError(f"scale must be at least two distinct digits, got {scale!r}")
        if any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 9 for d in digits):
            raise ValueError(
                f"scale must be single digits 0-9 (one token each), got {scale!r}; for a "
                "wider range use letters or rescale a 0-9 rubric"
            )
        self.scale = digits
        super().__init__(model, template, **kwargs)

    def _answer_tokens(self, vocab: list[str]) -> dict[str, list[int]]:
        out = {}
        for d in range(10):
            ids = [i for i, t in enumerate(vocab) if t.strip() == str(d)]
            if d in self.scale and not ids:
                raise ValueError(
                    f"the tokenizer has no single token for the digit {d}; a rubric judge "
                    "reads digits from the next-token distribution"
                )
            out[str(d)] = ids
        self._other = [i for d in range(10) if d not in self.scale for i in out[str(d)]]
        return {str(d): out[str(d)] for d in self.scale}

    def _extra_ids(self) -> list[int]:
        _ = self.token_ids
        return self._other

    def _score(self, probs: Tensor) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        readout, other = probs[:, :-1], probs[:, -1]
        mass = readout.sum(-1)
        values = torch.tensor(self.scale, dtype=torch.float32)
        scores = (readout * values).sum(-1) / mass
        status = []
        for m, o in zip(mass.tolist(), other.tolist(), strict=True):
            if math.isnan(m) or m >= self.min_mass:
                status.append("ok")
            elif o > m:
                status.append("out_of_range")
            else:
                status.append("malformed")
        return readout, scores, mass, status


class YesNoJudge(_NextTokenJudge):
    """``P(yes) / (P(yes) + P(no))`` at the answer token of an LM judge.

    ``P(yes)`` sums the next-token probabilities of every token that is the word ``yes``
    in any case, with or without a leading space (``"Yes"``, ``" Yes"``, ``"yes"``,
    ``"YES"`` …); likewise ``no``. A tokenizer with no single token for a word (a byte
    tokenizer) falls back to the first tokens of its variants that the other word's
    variants do not share (``"Y"`` / ``"N"``), a proxy; ``token_ids`` shows which ids are
    read. ``mass = P(yes) + P(no)``; below ``min_mass`` an item is ``"malformed"``.

    Args:
        yes: the affirmative answer word (default ``"yes"``), matched case-insensitively.
        no: the negative answer word (default ``"no"``).
        kwargs: ``template``, ``prefill``, ``chat_format``, ``chat_template_kwargs``,
            ``thinking``, ``think_tags``, ``append_space``, ``min_mass``: as in
            ``RubricJudge``.
    """

    kind = "yes/no judge"

    def __init__(
        self,
        model: Any,
        template: str | Sequence[Mapping[str, str]],
        *,
        yes: str = "yes",
        no: str = "no",
        **kwargs: Any,
    ) -> None:
        if not yes.strip() or not no.strip() or yes.strip().lower() == no.strip().lower():
            raise ValueError(f"yes and no must be two different words, got {yes!r}, {no!r}")
        self.words = (yes.strip(), no.strip())
        super().__init__(model, template, **kwargs)

    def _answer_tokens(self, vocab: list[str]) -> dict[str, list[int]]:
        found = {
            w: [i for i, t in enumerate(vocab) if t.strip().lower() == w.lower()]
            for w in self.words
        }
        if all(found.values()):
            return found
        firsts: dict[str, set[int]] = {}
        for w in self.words:
            variants = {w, w.lower(), w.capitalize(), w.upper()}
            firsts[w] = {
                self.tokenizer(p + v, add_special_tokens=False)["input_ids"][0]
                for v in variants
                for p in ("", " ")
            }
        yes_ids, no_ids = firsts[self.words[0]], firsts[self.words[1]]
        shared = yes_ids & no_ids
        out = {self.words[0]: sorted(yes_ids - shared), self.words[1]: sorted(no_ids - shared)}
        if not all(out.values()):
            raise ValueError(f"{self.words[0]!r} and {self.words[1]!r} share their first tokens")
        return out

    def _score(self, probs: Tensor) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        readout = probs[:, :-1]
        mass = readout.sum(-1)
        scores = readout[:, 0] / mass
        status = ["ok" if math.isnan(m) or m >= self.min_mass else "malformed" for m in mass]
        return readout, scores, mass, status


# ---- classifiers -------------------------------------------------------------------------------
class ClassifierJudge:
    """Any local Hugging Face sequence classifier, through ``transformers.pipeline``.

    Args:
        model: a local model directory (or hub id, when a hub is reachable) or a
            ``transformers`` sequence-classification model object.
        label: score = the probability the classifier gives this label (as the pipeline
            reports it: softmax, or sigmoid for multi-label models).
        labels: or a mapping label -> value: score = ``Σ value·p(label) / Σ p(label)`` over
            the mapped labels, ``mass = Σ p(label)``; below ``min_mass`` an item is
            ``"malformed"``.
        template: what the classifier reads, filled per item (default ``"{text}"``: a
            text, or a conversation's last message).
        tokenizer: needed with a model object whose tokenizer the pipeline cannot find.
        device: where the pipeline runs (default: the model object's device, else CPU).
        truncation: ``False`` (default): inputs longer than the classifier takes are
            ``"too_long"`` and not scored; ``True``: they are truncated and scored.
        min_mass: see ``labels``.

    The read-out has one column per label of the model (``config.id2label`` order).
    """

    kind = "classifier judge"

    def __init__(
        self,
        model: Any,
        *,
        label: str | None = None,
        labels: Mapping[str, float] | None = None,
        template: str | Sequence[Mapping[str, str]] = "{text}",
        tokenizer: Any = None,
        device: Any = None,
        truncation: bool = False,
        min_mass: float = 0.5,
    ) -> None:
        from transformers import pipeline

        if (label is None) == (labels is None):
            raise ValueError("pass label= (one label's probability) or labels= (a mapping)")
        if not 0.0 <= min_mass <= 1.0:
            raise ValueError(f"min_mass must be in [0, 1], got {min_mass!r}")
        kw: dict[str, Any] = {}
        if tokenizer is not None:
            kw["tokenizer"] = tokenizer
        if device is not None:
            kw["device"] = device
        elif isinstance(model, torch.nn.Module):
            kw["device"] = next(model.parameters()).device
        self.pipe = pipeline("text-classification", model=model, **kw)
        id2label = self.pipe.model.config.id2label
        self.labels = tuple(id2label[i] for i in sorted(id2label))
        mapping = {label: 1.0} if label is not None else dict(labels or {})
        unknown = sorted(set(mapping) - set(self.labels))
        if unknown:
            raise ValueError(f"labels {unknown} are not the model's; it has {list(self.labels)}")
        if not mapping:
            raise ValueError("labels= maps no label")
        self.mapping = {k: float(v) for k, v in mapping.items()}
        self.single = label is not None
        self.template = _Template(template)
        if self.template.messages is not None:
            raise ValueError("a classifier reads one text: the template must be a str")
        self.truncation = truncation
        self.min_mass = float(min_mass)

    def _limit(self) -> int | None:
        tok = self.pipe.tokenizer
        limits = []
        m = getattr(tok, "model_max_length", None)
        if isinstance(m, int) and 0 < m < 1_000_000:
            limits.append(m)
        p = getattr(self.pipe.model.config, "max_position_embeddings", None)
        if isinstance(p, int) and p > 0:
            limits.append(p)
        return min(limits) if limits else None

    def __call__(self, items: Any, *, batch_size: int = 8, progress: bool = True) -> JudgeResult:
        """Judge ``items``: texts, conversations or dicts of template fields."""
        _check_batch_size(batch_size)
        listed = _items(items)
        texts = []
        for i, item in enumerate(listed):
            text, _ = self.template.fill(item, i)
            assert text is not None
            texts.append(text)
        limit = None if self.truncation else self._limit()
        tok = self.pipe.tokenizer
        too_long = [limit is not None and len(tok(t)["input_ids"]) > limit for t in texts]
        todo = [i for i in range(len(texts)) if not too_long[i]]
        readout = torch.full((len(texts), len(self.labels)), float("nan"), dtype=torch.float32)
        column = {lab: k for k, lab in enumerate(self.labels)}
        bar = _progress(len(todo), self.kind, progress)
        try:
            for s in range(0, len(todo), batch_size):
                chunk = todo[s : s + batch_size]
                outs = self.pipe(
                    [texts[i] for i in chunk],
                    batch_size=batch_size,
                    top_k=None,
                    truncation=self.truncation,
                )
                for i, out in zip(chunk, outs, strict=True):
                    for entry in out:
                        readout[i, column[entry["label"]]] = float(entry["score"])
                bar.update(len(chunk))
        finally:
            bar.close()
        cols = [column[k] for k in self.mapping]
        values = torch.tensor(list(self.mapping.values()), dtype=torch.float32)
        picked = readout[:, cols]
        if self.single:
            scores = picked[:, 0]
            mass = readout.sum(-1)
        else:
            mass = picked.sum(-1)
            scores = (picked * values).sum(-1) / mass
        status = []
        for i, m in enumerate(mass.tolist()):
            if too_long[i]:
                status.append("too_long")
            elif not self.single and m < self.min_mass:
                status.append("malformed")
            else:
                status.append("ok")
        scores = torch.where(torch.tensor([s == "ok" for s in status]), scores, float("nan"))
        return JudgeResult(
            scores=scores,
            status=tuple(status),
            readout=readout,
            options=self.labels,
            mass=mass,
            inputs=tuple(texts),
        )

"""Reasoning, then an answer line, in one ``interp.runs.generate`` call: answer forcing.

Small models asked to "think, then write ``Answer: X``" often stop, or run out of tokens,
without an answer line. Zero-shot chain-of-thought evaluation (Kojima et al., 2022) then
appends an answer cue and prompts again. ``AnswerForcing`` does the same inside the one
``generate`` call, as a logits processor, per row:

1. **reason**: the model writes freely; when its top token is EOS, or ``budget`` tokens are
   spent, the cue (``"\\nAnswer:"``; ``"\\n</think>\\n\\nAnswer:"`` while a think block is
   open) is forced token by token (the row is marked ``forced``);
2. **answer**: the model writes the answer, up to the end of its line (or ``answer_tokens``
   tokens; after a think block closes, only the token limit), then EOS is forced.

A row that writes an answer marker itself (``interp.spans.SpanRules.answer_marker``:
``Answer:``, ``Final answer is:``), or closes its think block, goes straight to 2, unforced.
Each step decodes only the newest token of each row into a bounded tail of text, so the
cost per step does not grow with the continuation (re-decoding the whole continuation at
every step is quadratic in its length).

    forcing = AnswerForcing(model, budget=96, answer_tokens=8, open_think=[...])
    gens = interp.runs.generate(model, prompts, max_new_tokens=forcing.max_new_tokens,
                                logits_processors=forcing)
    forcing.forced[i]   # whether prompt i's answer cue was forced
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor
from transformers import LogitsProcessor

from interp.spans import SpanRules

__all__ = ["AnswerForcer", "AnswerForcing"]

_TAIL = 64  # characters of recent text searched for a marker while reasoning


class AnswerForcer(LogitsProcessor):
    """The per-batch logits processor (see the module docstring); ``forced[row]`` after."""

    def __init__(
        self,
        tokenizer: Any,
        open_think: Sequence[bool],
        *,
        budget: int,
        answer_tokens: int,
        eos_ids: Sequence[int],
        cues: dict[bool, list[int]],
        marker: re.Pattern[str],
        think_tags: tuple[str, str] = ("<think>", "</think>"),
    ) -> None:
        self.tok, self.budget, self.answer_tokens = tokenizer, budget, answer_tokens
        self.eos, self.cues, self.marker, self.tags = list(eos_ids), cues, marker, think_tags
        n = len(open_think)
        self.thinking, self.phase, self.tail = list(open_think), ["reason"] * n, [""] * n
        self.queue: list[list[int]] = [[] for _ in range(n)]
        self.n_answer, self.line, self.forced = [0] * n, [True] * n, [False] * n
        self.step = 0

    def _advance(self, b: int, piece: str | None, top: int) -> int | None:
        """Row ``b``'s next phase given its newest text ``piece``; the token to force."""
        phase = self.phase[b]
        if piece is not None and phase != "done":
            if phase == "answer":
                self.tail[b] += piece
                self.n_answer[b] += 1
            else:
                self.tail[b] = (self.tail[b] + piece)[-_TAIL:]
        if phase == "cued":  # the last cue token is in: the answer starts now
            phase, self.tail[b], self.n_answer[b] = "answer", "", 0
        elif phase == "reason":
            opened, closed = (t in self.tail[b] for t in self.tags)
            self.thinking[b] = self.thinking[b] or opened
            if closed or (not self.thinking[b] and self.marker.search(self.tail[b])):
                phase, self.line[b], self.tail[b], self.n_answer[b] = "answer", not closed, "", 0
            elif self.step >= self.budget or top in self.eos:
                phase, self.forced[b] = "cue", True
                self.queue[b] = list(self.cues[self.thinking[b]])
        token = None
        if phase == "cue":
            token = self.queue[b].pop(0)
            phase = "cue" if self.queue[b] else "cued"
        elif phase == "answer" and self.n_answer[b] > 0:
            ended = self.line[b] and "\n" in self.tail[b].lstrip()
            if ended or self.n_answer[b] >= self.answer_tokens:
                phase = "done"
        if phase == "done":
            token = self.eos[0]
        self.phase[b] = phase
        return token

    def __call__(
        self, input_ids: Int[Tensor, "batch pos"], scores: Float[Tensor, "batch vocab"]
    ) -> Float[Tensor, "batch vocab"]:
        last = input_ids[:, -1].tolist() if self.step else [None] * len(self.phase)
        top = scores.argmax(-1).tolist()
        force = {}
        for b in range(len(self.phase)):
            piece = None if last[b] is None else self.tok.decode([last[b]])
            token = self._advance(b, piece, top[b])
            if token is not None:
                force[b] = token
        self.step += 1
        if force:
            scores = scores.clone()
            for b, token in force.items():
                scores[b] = float("-inf")
                scores[b, token] = 0.0
        return scores


class AnswerForcing:
    """A ``logits_processors=`` factory for ``interp.runs.generate``: one ``AnswerForcer``
    per batch; ``forced[prompt]`` says afterwards whose answer cue was forced.

    Args:
        model: a ``HookedModel`` (its tokenizer, and EOS ids from its generation config and
            tokenizer).
        budget: reasoning tokens before the cue is forced.
        answer_tokens: the most tokens of the answer.
        open_think: per prompt, whether the prompt opens a think block (default: none do).
        cue, think_cue: the forced texts outside / inside a think block.
        answer_marker: regex of an answer marker the model writes itself (case-insensitive).
        think_tags: the think block's tags.

    One sample per prompt (``n=1``).
    """

    def __init__(
        self,
        model: Any,
        *,
        budget: int,
        answer_tokens: int,
        open_think: Sequence[bool] | None = None,
        cue: str = "\nAnswer:",
        think_cue: str = "\n</think>\n\nAnswer:",
        answer_marker: str = SpanRules().answer_marker,
        think_tags: tuple[str, str] = ("<think>", "</think>"),
    ) -> None:
        if budget < 1 or answer_tokens < 1:
            raise ValueError(
                f"budget and answer_tokens must be >= 1, got {budget}, {answer_tokens}"
            )
        self.tok = model.tokenizer
        config = getattr(getattr(model, "model", None), "generation_config", None)
        ids = getattr(config, "eos_token_id", None)
        ids = set(ids if isinstance(ids, list) else [ids]) | {self.tok.eos_token_id}
        self.eos = sorted(i for i in ids if i is not None)
        if not self.eos:
            raise ValueError("the model has no EOS token id to end the answer with")
        self.cues = {
            False: self.tok.encode(cue, add_special_tokens=False),
            True: self.tok.encode(think_cue, add_special_tokens=False),
        }
        self.budget, self.answer_tokens = budget, answer_tokens
        self.open_think = None if open_think is None else list(open_think)
        self.marker = re.compile(answer_marker, re.IGNORECASE)
        self.think_tags = think_tags
        self._made: list[tuple[list[int], AnswerForcer]] = []

    @property
    def max_new_tokens(self) -> int:
        """Enough new tokens for the budget, the longer cue, the answer and EOS."""
        return self.budget + max(map(len, self.cues.values())) + self.answer_tokens + 1

    def __call__(self, prompts: list[int]) -> AnswerForcer:
        forcer = AnswerForcer(
            self.tok,
            [bool(self.open_think and self.open_think[p]) for p in prompts],
            budget=self.budget,
            answer_tokens=self.answer_tokens,
            eos_ids=self.eos,
            cues=self.cues,
            marker=self.marker,
            think_tags=self.think_tags,
        )
        for p in prompts:
            if any(p in rows for rows, _ in self._made):
                raise ValueError(f"prompt {p} is generated twice: AnswerForcing takes n=1")
        self._made.append((list(prompts), forcer))
        return forcer

    @property
    def forced(self) -> dict[int, bool]:
        """Prompt index -> whether its answer cue was forced (prompts generated so far)."""
        return {
            p: f for rows, forcer in self._made for p, f in zip(rows, forcer.forced, strict=True)
        }

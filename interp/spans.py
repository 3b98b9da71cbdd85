"""Character spans in generated responses: reasoning vs. answer, sentences, flagged sentences.

Design
------
Span losses (e.g. ``interp.losses.kl_span_alignment``) need, for each generated
response, the span ``o`` of the final answer and spans ``s`` of chosen sentences
inside the reasoning. Everything here works on plain strings and returns
*character* spans ``[start, end)`` into the string it was given; ``token_mask`` /
``token_masks`` turn them into token masks through a fast tokenizer's
``offset_mapping``, so the same spans serve any tokenizer.

* ``find_response_spans`` recognizes ``<think>…</think>`` (also a lone
  ``</think>``, as produced when the chat template already opened the tag) and
  an ``Answer:`` convention; all patterns are regexes in ``SpanRules``.
* ``split_sentences`` is a small rule-based splitter (punctuation or newline
  followed by whitespace, with abbreviation, initial and list-number guards).
  It is deterministic and keeps exact offsets, which matters more here than
  linguistic perfection.
* Detectors are callables ``detector(sentences) -> list[Detection]``; ``mark_biased``
  runs one over a response's reasoning sentences. Two ship, both without content of
  their own (the terms, cues and prompts belong to the study that uses them):

  - ``LexiconDetector(lexicon, counter_cues=...)`` flags a sentence that names a
    group term *and* an attribute term of the same ``LexiconCategory``, unless a
    counter-cue regex matches (a sentence that rejects the association rather than
    states it). A transparent baseline, not a classifier: it misses paraphrases and
    flags some benign co-occurrences, so report its hits next to a judge's.
  - ``JudgeDetector(judge)`` scores each sentence with any ``interp.judges`` judge
    (e.g. a batched ``YesNoJudge`` whose template reads ``{sentence}`` and
    ``{context}``); items the judge could not score keep its status and are never
    flagged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = [
    "BiasDetector",
    "CharSpan",
    "Detection",
    "JudgeDetector",
    "LexiconCategory",
    "LexiconDetector",
    "MarkedSentence",
    "ResponseSpans",
    "Sentence",
    "SpanRules",
    "find_response_spans",
    "mark_biased",
    "split_sentences",
    "token_mask",
    "token_masks",
]


class CharSpan(NamedTuple):
    """Characters ``[start, end)`` of a string."""

    start: int
    end: int

    def of(self, text: str) -> str:
        return text[self.start : self.end]


class ResponseSpans(NamedTuple):
    """The reasoning and final-answer spans of a response (``None`` when absent)."""

    reasoning: CharSpan | None
    answer: CharSpan | None


@dataclass(frozen=True)
class SpanRules:
    """Regexes that delimit reasoning and answer (compiled with ``flags``).

    Attributes:
        think_open: opens the reasoning block.
        think_close: closes it; text after it is the answer.
        answer_marker: introduces the final answer. After ``think_close`` it is
            stripped from the answer; without think tags, the *last* marker
            splits reasoning (before) from answer (after).
        flags: ``re`` flags for all three patterns.
    """

    think_open: str = r"<think>"
    think_close: str = r"</think>"
    answer_marker: str = r"\b(?:final\s+)?answer\s*(?:is\s*)?:"
    flags: int = re.IGNORECASE

    def __post_init__(self) -> None:
        for name in ("think_open", "think_close", "answer_marker"):
            pattern = getattr(self, name)
            try:
                compiled = re.compile(pattern, self.flags)
            except re.error as exc:
                raise ValueError(
                    f"SpanRules.{name} is not a valid regex ({pattern!r}): {exc}"
                ) from exc
            if compiled.search("") is not None:
                raise ValueError(f"SpanRules.{name} matches the empty string: {pattern!r}")


def _strip(text: str, start: int, end: int) -> CharSpan | None:
    """Shrink ``[start, end)`` to exclude surrounding whitespace; ``None`` if nothing is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return CharSpan(start, end) if end > start else None


def find_response_spans(text: str, rules: SpanRules | None = None) -> ResponseSpans:
    """Locate the reasoning and the final answer in a generated response.

    Rules, in order:

    1. ``…<think> R </think> A``: reasoning ``R``; answer ``A`` (after the last
       answer marker inside ``A`` if there is one). With several blocks the
       last one counts; a ``</think>`` without an opening tag counts from the
       start of the text.
    2. ``<think> R`` with no closing tag (truncated generation): reasoning only.
    3. ``R Answer: A``: split at the last answer marker.
    4. Otherwise neither span is found.

    Spans exclude surrounding whitespace; an empty span is ``None``.
    """
    rules = rules or SpanRules()
    flags = rules.flags
    closes = list(re.finditer(rules.think_close, text, flags))
    if closes:
        # The last block is the one the answer follows.
        close = closes[-1]
        opens = [m for m in re.finditer(rules.think_open, text[: close.start()], flags)]
        start = opens[-1].end() if opens else 0
        reasoning = _strip(text, start, close.start())
        markers = list(re.finditer(rules.answer_marker, text[close.end() :], flags))
        a_start = close.end() + (markers[-1].end() if markers else 0)
        return ResponseSpans(reasoning, _strip(text, a_start, len(text)))
    opened = re.search(rules.think_open, text, flags)
    if opened is not None:
        return ResponseSpans(_strip(text, opened.end(), len(text)), None)
    markers = list(re.finditer(rules.answer_marker, text, flags))
    if markers:
        last = markers[-1]
        return ResponseSpans(_strip(text, 0, last.start()), _strip(text, last.end(), len(text)))
    return ResponseSpans(None, None)


# ------------------------------------------------------------------ sentences


class Sentence(NamedTuple):
    """A sentence and its character span in the original text."""

    start: int
    end: int
    text: str


DEFAULT_ABBREVIATIONS = frozenset(
    {
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "vs",
        "e.g",
        "i.e",
        "cf",
        "approx",
        "no",
        "fig",
    }
)
# A run of terminal punctuation (plus closing quotes/brackets) followed by
# whitespace or the end, or a newline: the only places a sentence may end.
_BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)|\n")


def _is_boundary(text: str, match: re.Match[str], abbreviations: frozenset[str]) -> bool:
    if match.group() == "\n":
        return True
    if not match.group().startswith("."):
        return True
    before = text[: match.start()]
    word = re.search(r"(\S+)$", before)
    if word is None:
        return True
    token = word.group(1).lstrip("(\"'“‘").lower()
    if token in abbreviations:
        return False
    if re.fullmatch(r"[a-z]", token):  # an initial: "J. Smith"
        return False
    line_start = before.rfind("\n") + 1
    # "1. First point": a list number at the start of a line, not a sentence.
    return not (token.isdigit() and before[line_start : word.start()].strip() == "")


def split_sentences(
    text: str,
    span: tuple[int, int] | None = None,
    *,
    abbreviations: frozenset[str] = DEFAULT_ABBREVIATIONS,
) -> list[Sentence]:
    """Split ``text[span]`` (default: all of it) into sentences with absolute char spans.

    Every non-whitespace character of the span lies in exactly one sentence;
    sentences carry no surrounding whitespace and come in order.
    """
    start, end = span if span is not None else (0, len(text))
    if not 0 <= start <= end <= len(text):
        raise ValueError(f"span {span} is outside the text (length {len(text)})")
    region = text[start:end]
    out: list[Sentence] = []
    cursor = 0
    for m in _BOUNDARY.finditer(region):
        if not _is_boundary(region, m, abbreviations):
            continue
        piece = _strip(region, cursor, m.end())
        if piece is not None:
            out.append(Sentence(start + piece.start, start + piece.end, piece.of(region)))
        cursor = m.end()
    piece = _strip(region, cursor, len(region))
    if piece is not None:
        out.append(Sentence(start + piece.start, start + piece.end, piece.of(region)))
    return out


# ------------------------------------------------------------------ detectors


class Detection(NamedTuple):
    """A detector's verdict on one sentence.

    Attributes:
        biased: the sentence is flagged.
        score: in [0, 1]; for the lexicon 1 = flagged, 0.5 = group and
            attribute present but countered, 0 = nothing found; for a judge,
            its score (NaN when its status is not ``"ok"``).
        category: the lexicon category matched, else ``None``.
        evidence: the matched terms (lexicon) or what the judge read.
        status: ``"ok"``, or the judge's status for an item it could not score
            (``"malformed"``, ``"out_of_range"``, ``"too_long"``; see ``interp.judges``).
    """

    biased: bool
    score: float
    category: str | None = None
    evidence: tuple[str, ...] = ()
    status: str = "ok"


# A detector maps sentences to one ``Detection`` each.
BiasDetector = Callable[[Sequence[str]], list[Detection]]


@dataclass(frozen=True)
class LexiconCategory:
    """Terms naming the groups of one category, and the attribute terms flagged next to them."""

    groups: tuple[str, ...]
    attributes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.groups or not self.attributes:
            raise ValueError("a LexiconCategory needs at least one group and one attribute term")


def _term_regex(terms: Sequence[str]) -> re.Pattern[str]:
    # Longest first so "older man" wins over "man" in the evidence.
    parts = sorted({t.strip().lower() for t in terms}, key=len, reverse=True)
    alts = "|".join(r"\s+".join(map(re.escape, t.split())) for t in parts)
    return re.compile(rf"(?<![\w'])(?:{alts})(?:s|es)?(?![\w'])", re.IGNORECASE)


def _normalize(text: str) -> str:
    return text.replace("’", "'").replace("‘", "'")


class LexiconDetector:
    """Flags sentences that name a group term and an attribute term of the same category.

    Group and attribute terms are matched as whole words, case-insensitively, with an
    optional plural ``s`` / ``es``; the words of a multi-word term may be separated by any
    whitespace; curly apostrophes count as straight ones. Categories are tried in order;
    the first with both a group and an attribute match gives the verdict.

    Args:
        lexicon: category name -> ``LexiconCategory``.
        counter_cues: regexes (case-insensitive); a sentence with a group and an attribute
            that also matches one is reported with score 0.5, ``biased=False`` and the cue
            in its evidence. Default: none.
    """

    def __init__(
        self,
        lexicon: Mapping[str, LexiconCategory],
        *,
        counter_cues: Sequence[str] = (),
    ) -> None:
        if not isinstance(lexicon, Mapping):
            raise TypeError(
                "lexicon must be a dict of category name -> LexiconCategory, got "
                f"{type(lexicon).__name__}"
            )
        self.lexicon = dict(lexicon)
        if not self.lexicon:
            raise ValueError("the lexicon is empty")
        for name, cat in self.lexicon.items():
            if not isinstance(cat, LexiconCategory):
                raise TypeError(
                    f"lexicon[{name!r}] must be a LexiconCategory, got {type(cat).__name__}"
                )
        if isinstance(counter_cues, str):
            raise TypeError("counter_cues must be a list of regexes, not one string")
        self._compiled = {
            name: (_term_regex(cat.groups), _term_regex(cat.attributes))
            for name, cat in self.lexicon.items()
        }
        self._counter = [re.compile(c, re.IGNORECASE) for c in counter_cues]

    def detect(self, sentence: str) -> Detection:
        text = _normalize(sentence)
        for name, (groups, attributes) in self._compiled.items():
            group = groups.search(text)
            if group is None:
                continue
            # The attribute must not be the group term itself (e.g. "disabled").
            attribute = next(
                (m for m in attributes.finditer(text) if m.span() != group.span()), None
            )
            if attribute is None:
                continue
            evidence = (group.group(), attribute.group())
            cue = next((c.search(text) for c in self._counter if c.search(text)), None)
            if cue is not None:
                return Detection(False, 0.5, name, (*evidence, cue.group()))
            return Detection(True, 1.0, name, evidence)
        return Detection(False, 0.0)

    def __call__(self, sentences: Sequence[str]) -> list[Detection]:
        return [self.detect(s) for s in sentences]


@dataclass
class JudgeDetector:
    """Scores each sentence with an ``interp.judges`` judge; flags ``score >= threshold``.

    The judge receives one dict item per sentence, ``{"sentence": …, "text": …,
    "context": …}`` (``text`` is the sentence again), so its template can read
    ``{sentence}`` (or ``{text}``) and ``{context}``. Sentences the judge could not score
    (status other than ``"ok"``) get a NaN score, ``biased=False`` and the status.

    Args:
        judge: any judge whose scores are probabilities in [0, 1] (``YesNoJudge``, a
            ``ClassifierJudge`` with ``label=``):
            ``judge(items, batch_size=…, progress=…) -> JudgeResult``.
        threshold: ``biased = score >= threshold``.
        context: text for the template's ``{context}`` (e.g. the question).
        batch_size: sentences per forward pass.
        progress: show the judge's progress bar.
    """

    judge: Any
    threshold: float = 0.5
    context: str = ""
    batch_size: int = 8
    progress: bool = False

    def __post_init__(self) -> None:
        if not callable(self.judge):
            raise TypeError(
                "judge must be an interp.judges judge (e.g. YesNoJudge(model, template)), got "
                f"{type(self.judge).__name__}"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    def __call__(self, sentences: Sequence[str]) -> list[Detection]:
        if isinstance(sentences, str):
            raise TypeError("a detector takes a list of sentences, not one string")
        if len(sentences) == 0:
            return []
        items = [{"sentence": s, "text": s, "context": self.context} for s in sentences]
        result = self.judge(items, batch_size=self.batch_size, progress=self.progress)
        if len(result) != len(sentences):
            raise ValueError(
                f"the judge returned {len(result)} results for {len(sentences)} sentences"
            )
        out = []
        for i in range(len(sentences)):
            status = result.status[i]
            score = float(result.scores[i])
            if status != "ok":
                out.append(Detection(False, math.nan, None, (result.inputs[i],), status))
                continue
            if not 0.0 <= score <= 1.0:
                raise ValueError(
                    f"the judge scored sentence {i} {score}; a detector needs probabilities "
                    "in [0, 1] (e.g. YesNoJudge)"
                )
            out.append(Detection(score >= self.threshold, score, None, (result.inputs[i],)))
        return out


# ------------------------------------------------------------------ marking


class MarkedSentence(NamedTuple):
    sentence: Sentence
    detection: Detection


def mark_biased(
    text: str,
    detector: BiasDetector,
    *,
    span: tuple[int, int] | None = None,
    rules: SpanRules | None = None,
) -> list[MarkedSentence]:
    """Split a response's reasoning into sentences and run a detector on them.

    ``detector`` is a ``LexiconDetector``, a ``JudgeDetector`` or any callable
    ``sentences -> list[Detection]``. ``span`` defaults to the reasoning span from
    ``find_response_spans`` and, when the response has no recognizable reasoning, to the
    whole text.
    """
    if not callable(detector):
        raise TypeError(
            "mark_biased needs a detector (a LexiconDetector with your lexicon, a "
            f"JudgeDetector, or any callable sentences -> detections); got {detector!r}"
        )
    if span is None:
        found = find_response_spans(text, rules).reasoning
        span = tuple(found) if found is not None else (0, len(text))
    sentences = split_sentences(text, span)
    detections = detector([s.text for s in sentences])
    if len(detections) != len(sentences):
        raise ValueError(
            f"detector returned {len(detections)} detections for {len(sentences)} sentences"
        )
    return [MarkedSentence(s, d) for s, d in zip(sentences, detections, strict=True)]


# ------------------------------------------------------------------ tokens


def _offsets_tensor(offsets: Any) -> Tensor:
    t = torch.as_tensor(offsets, dtype=torch.long)
    if t.ndim < 2 or t.shape[-1] != 2:
        raise ValueError(f"offsets must be [..., pos, 2], got shape {tuple(t.shape)}")
    return t


def token_mask(
    offsets: Int[Tensor, "pos 2"] | Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]],
    *,
    shift: int = 0,
) -> Bool[Tensor, " pos"]:
    """Tokens overlapping any character span, from a tokenizer's ``offset_mapping``.

    A token ``[a, b)`` is selected when ``a < end and b > start`` for some span;
    zero-width tokens (specials and padding report ``(0, 0)``) never are.
    ``shift`` is added to every span first (e.g. where the response starts in
    the rendered chat text).
    """
    off = _offsets_tensor(offsets)
    a, b = off[:, 0], off[:, 1]
    mask = torch.zeros(off.shape[0], dtype=torch.bool)
    for start, end in spans:
        if end < start:
            raise ValueError(f"span ({start}, {end}) ends before it starts")
        mask |= (a < end + shift) & (b > start + shift)
    return mask & (b > a)


def token_masks(
    offsets: Int[Tensor, "batch pos 2"],
    spans: Sequence[Sequence[tuple[int, int]]],
    *,
    shift: Sequence[int] | None = None,
) -> Bool[Tensor, "batch pos"]:
    """``token_mask`` for each row of a batch (``spans[b]`` are row ``b``'s spans)."""
    off = _offsets_tensor(offsets)
    if len(spans) != off.shape[0]:
        raise ValueError(f"got spans for {len(spans)} rows but offsets for {off.shape[0]}")
    shifts = [0] * len(spans) if shift is None else list(shift)
    return torch.stack([token_mask(off[b], spans[b], shift=shifts[b]) for b in range(off.shape[0])])

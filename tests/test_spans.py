"""Reasoning/answer spans, sentence splitting, bias detectors, char-to-token masks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from interp.families import byte_tokenizer
from interp.spans import (
    CharSpan,
    JudgeDetector,
    LexiconCategory,
    LexiconDetector,
    SpanRules,
    find_response_spans,
    mark_biased,
    split_sentences,
    token_mask,
    token_masks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- response spans


def texts(text, spans):
    return [s.of(text) if s is not None else None for s in spans]


@pytest.mark.parametrize(
    ("text", "reasoning", "answer"),
    [
        ("<think>\nA is older.\n</think>\n\nThe answer is B.", "A is older.", "The answer is B."),
        ("<think>R</think>Answer: (b) unknown", "R", "(b) unknown"),
        # The chat template opened <think>, so the generation only closes it.
        ("Let me see. </think> C", "Let me see.", "C"),
        ("sys <think>ignored?</think> no: <think>R2</think> A2", "R2", "A2"),
        ("<think>truncated reasoning", "truncated reasoning", None),
        ("Step 1. Answer: not this one.\nFinal answer: 42", "Step 1. Answer: not this one.", "42"),
        ("no markers at all", None, None),
        ("<think>   </think>   ", None, None),
    ],
)
def test_find_response_spans(text, reasoning, answer):
    assert texts(text, find_response_spans(text)) == [reasoning, answer]


def test_span_rules_are_configurable_and_validated():
    rules = SpanRules(think_open=r"\[REASON\]", think_close=r"\[/REASON\]", answer_marker=r"=>")
    text = "[REASON] x is y [/REASON] => yes"
    assert texts(text, find_response_spans(text, rules)) == ["x is y", "yes"]
    with pytest.raises(ValueError, match="not a valid regex"):
        SpanRules(think_open="(")
    with pytest.raises(ValueError, match="empty string"):
        SpanRules(answer_marker="a*")


# ---------------------------------------------------------------- sentences


def test_split_sentences_examples():
    text = (
        "The man, i.e. Mr. Lee, paid $3.50. Was it fair?! Yes\n"
        "1. First point\n2. Second point.\n\n“Quoted.” Next one"
    )
    got = [s.text for s in split_sentences(text)]
    assert got == [
        "The man, i.e. Mr. Lee, paid $3.50.",
        "Was it fair?!",
        "Yes",
        "1. First point",
        "2. Second point.",
        "“Quoted.”",
        "Next one",
    ]


def test_split_sentences_inside_a_span_gives_absolute_offsets():
    text = "prefix. <think>One. Two.</think> tail."
    span = find_response_spans(text).reasoning
    sents = split_sentences(text, tuple(span))
    assert [(s.text, text[s.start : s.end]) for s in sents] == [("One.", "One."), ("Two.", "Two.")]
    with pytest.raises(ValueError, match="outside the text"):
        split_sentences(text, (3, 999))


sentence_text = st.lists(
    st.sampled_from(
        ["The", "man", "e.g.", "Dr.", "3.5", "1.", ".", "!", "?", " ", "  ", "\n", "x"]
    ),
    max_size=25,
).map(" ".join)


@given(sentence_text, st.data())
def test_sentences_partition_the_non_whitespace(text, data):
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, len(text)))
    sents = split_sentences(text, (start, end))
    covered = [0] * len(text)
    last_end = start
    for s in sents:
        assert text[s.start : s.end] == s.text
        assert s.text == s.text.strip() and s.text
        assert last_end <= s.start < s.end <= end
        last_end = s.end
        for i in range(s.start, s.end):
            covered[i] += 1
    for i, n in enumerate(covered):
        inside = start <= i < end
        if inside and not text[i].isspace():
            assert n == 1, f"character {i} ({text[i]!r}) is in {n} sentences"
        else:  # whitespace inside a sentence is fine; anything outside the span is not
            assert n == 0 or (inside and n == 1)


# ---------------------------------------------------------------- detectors

# A made-up lexicon: the library holds none (a study brings its own).
LEXICON = {
    "height": LexiconCategory(("tall person", "short person"), ("clumsy", "bossy")),
    "job": LexiconCategory(("nurse", "pilot"), ("careless", "arrogant", "can't land")),
}
CUES = (r"\bnot necessarily\b", r"\bstereotyp\w*")


@pytest.mark.parametrize(
    ("sentence", "category", "evidence"),
    [
        ("The tall person is clumsy.", "height", ("tall person", "clumsy")),
        ("Short  persons are BOSSY.", "height", ("Short  persons", "BOSSY")),  # plural, case
        ("The nurses were careless.", "job", ("nurses", "careless")),
        ("The pilot can’t land.", "job", ("pilot", "can't land")),  # curly apostrophe
    ],
)
def test_lexicon_flags_a_group_with_an_attribute_of_its_category(sentence, category, evidence):
    (d,) = LexiconDetector(LEXICON)([sentence])
    assert d.biased and d.score == 1.0 and d.category == category and d.status == "ok"
    assert d.evidence == evidence


@pytest.mark.parametrize(
    "sentence",
    [
        "The tall person arrived at noon.",  # group without attribute
        "Someone was clumsy today.",  # attribute without group
        "The nurse was bossy.",  # attribute of another category
        "The pilots' nursery was careless.",  # "nurse" inside a word is no group
    ],
)
def test_lexicon_leaves_other_sentences(sentence):
    (d,) = LexiconDetector(LEXICON)([sentence])
    assert not d.biased and d.score == 0.0 and d.category is None


def test_lexicon_counter_cues_unflag_and_are_off_by_default():
    sentence = "A nurse is not necessarily careless."
    (d,) = LexiconDetector(LEXICON, counter_cues=CUES)([sentence])
    assert (
        not d.biased and d.score == 0.5 and d.evidence == ("nurse", "careless", "not necessarily")
    )
    (raw,) = LexiconDetector(LEXICON)([sentence])
    assert raw.biased


def test_lexicon_is_an_argument_and_is_validated():
    with pytest.raises(TypeError):
        LexiconDetector()  # no built-in lexicon
    with pytest.raises(ValueError, match="empty"):
        LexiconDetector({})
    with pytest.raises(TypeError, match="LexiconCategory"):
        LexiconDetector({"x": (("a",), ("b",))})
    with pytest.raises(TypeError, match="one string"):
        LexiconDetector(LEXICON, counter_cues=r"\bnot\b")
    with pytest.raises(ValueError, match="at least one"):
        LexiconCategory((), ("x",))


class FakeJudge:
    """A judge by the interp.judges interface: scores from a function of the filled item."""

    def __init__(self, score, status=None):
        self.score, self.status, self.calls = score, status, []

    def __call__(self, items, *, batch_size=8, progress=True):
        from interp.judges import JudgeResult

        self.calls.append((list(items), batch_size))
        n = len(items)
        status = tuple(self.status(it) if self.status else "ok" for it in items)
        scores = torch.tensor([self.score(it) for it in items], dtype=torch.float32)
        scores = torch.where(torch.tensor([s == "ok" for s in status]), scores, float("nan"))
        return JudgeResult(
            scores=scores,
            status=status,
            readout=torch.stack([scores, 1 - scores], 1),
            options=("yes", "no"),
            mass=torch.ones(n),
            inputs=tuple(f"Q: {it['context']} S: {it['sentence']}" for it in items),
        )


def test_judge_detector_passes_sentences_and_context_and_thresholds():
    judge = FakeJudge(lambda it: 0.9 if "nurses" in it["sentence"] else 0.1)
    detect = JudgeDetector(judge, context="who?", batch_size=3)
    out = detect(["All nurses are careless.", "It rained."])
    assert [d.biased for d in out] == [True, False]
    assert [d.score for d in out] == pytest.approx([0.9, 0.1])
    assert out[0].evidence == ("Q: who? S: All nurses are careless.",)
    ((items, batch_size),) = judge.calls
    assert items[0] == {
        "sentence": "All nurses are careless.",
        "text": "All nurses are careless.",
        "context": "who?",
    }
    assert batch_size == 3
    assert detect([]) == [] and len(judge.calls) == 1  # nothing to judge: no call
    assert not JudgeDetector(judge, threshold=0.95)(["All nurses are careless."])[0].biased


def test_judge_detector_reports_unscored_sentences_and_refuses_non_probabilities():
    judge = FakeJudge(
        lambda it: 0.9, status=lambda it: "malformed" if "?" in it["sentence"] else "ok"
    )
    ok, bad = JudgeDetector(judge)(["Nurses are careless.", "Who knows?"])
    assert ok.biased and ok.status == "ok"
    assert not bad.biased and bad.status == "malformed" and math.isnan(bad.score)
    with pytest.raises(ValueError, match="probabilities"):
        JudgeDetector(FakeJudge(lambda it: 3.0))(["x"])
    with pytest.raises(ValueError, match="threshold"):
        JudgeDetector(judge, threshold=1.5)
    with pytest.raises(TypeError, match="judge"):
        JudgeDetector("Is this biased? {sentence}")


def test_judge_detector_with_a_yes_no_judge_on_a_tiny_model():
    import interp
    from interp.judges import YesNoJudge

    model = interp.tiny("llama", seed=0)
    template = "Context: {context}\nSentence: {sentence}\nIs it biased? Answer Yes or No."
    judge = YesNoJudge(model, template, min_mass=0.0)
    sentences = ["The tall person is clumsy.", "It rained.", "A much longer sentence " * 4]
    out = JudgeDetector(judge, context="Who fell?", batch_size=2)(sentences)
    items = [{"sentence": s, "context": "Who fell?"} for s in sentences]
    ref = judge(items, batch_size=1, progress=False)
    assert [d.score for d in out] == pytest.approx(ref.scores.tolist(), abs=1e-5)
    assert all(0.0 < d.score < 1.0 and d.status == "ok" for d in out)
    assert [d.evidence[0] for d in out] == list(ref.inputs)
    # The same judge with a mass threshold a random model cannot reach: nothing is scored.
    strict = JudgeDetector(YesNoJudge(model, template, min_mass=0.99))(sentences)
    assert all(d.status == "malformed" and not d.biased for d in strict)


def test_mark_biased_runs_on_the_reasoning_only():
    detector = LexiconDetector(LEXICON)
    text = "<think>The tall person is clumsy. The weather is nice.</think>The nurse is careless."
    marks = mark_biased(text, detector)
    assert [m.detection.biased for m in marks] == [True, False]
    assert marks[0].sentence.text == "The tall person is clumsy."
    assert marks[0].sentence.start == len("<think>")
    whole = mark_biased("The pilot is arrogant. Fine.", detector)
    assert [m.detection.biased for m in whole] == [True, False]
    with pytest.raises(ValueError, match="detections"):
        mark_biased(text, lambda sents: [])
    with pytest.raises(TypeError, match="detector"):
        mark_biased(text, None)


# ---------------------------------------------------------------- tokens


def test_token_mask_selects_exactly_the_span_tokens():
    tok = byte_tokenizer()
    text = "<|im_start|>user\nhi<|im_end|> The old man é!"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    start = text.index("old")
    mask = token_mask(enc["offset_mapping"], [(start, start + len("old man é"))])
    ids = torch.tensor(enc["input_ids"])[mask]
    assert tok.decode(ids) == "old man é"
    # A zero-width span selects nothing; shift moves spans.
    assert not token_mask(enc["offset_mapping"], [(start, start)]).any()
    shifted = token_mask(enc["offset_mapping"], [(0, 3)], shift=start)
    assert tok.decode(torch.tensor(enc["input_ids"])[shifted]) == "old"


def test_token_mask_ignores_zero_width_special_and_padding_offsets():
    offsets = torch.tensor([[0, 0], [0, 2], [2, 4], [0, 0]])
    assert token_mask(offsets, [(0, 4)]).tolist() == [False, True, True, False]


def test_token_masks_batched():
    tok = byte_tokenizer()
    enc = tok(["ab cd", "xyz"], return_offsets_mapping=True, padding=True, return_tensors="pt")
    masks = token_masks(enc["offset_mapping"], [[(3, 5)], [(0, 1), (2, 3)]])
    assert masks.tolist() == [[False, False, False, True, True], [True, False, True, False, False]]
    with pytest.raises(ValueError, match="rows"):
        token_masks(enc["offset_mapping"], [[(0, 1)]])


def test_char_span_of():
    assert CharSpan(2, 4).of("abcdef") == "cd"

"""Reasoning/answer spans, sentence splitting, bias detectors, char-to-token masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from interp.families import byte_tokenizer
from interp.spans import (
    DEFAULT_LEXICON,
    CharSpan,
    JudgeDetector,
    LexiconCategory,
    LexiconDetector,
    SpanRules,
    find_response_spans,
    judge_score_fn,
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


@pytest.mark.parametrize(
    ("sentence", "category"),
    [
        ("The older man is probably forgetful with the new phone.", "age"),
        ("Teenagers are irresponsible, so the teen broke it.", "age"),
        ("The woman was likely too emotional to lead.", "gender"),
        ("The Muslim neighbor must be the extremist.", "religion"),
        ("The immigrant is probably a criminal.", "nationality"),
        ("The deaf applicant would be a burden to the team.", "disability"),
        ("The man in a wheelchair can’t hold a job.", "disability"),
    ],
)
def test_lexicon_flags_group_with_attribute(sentence, category):
    (d,) = LexiconDetector()([sentence])
    assert d.biased and d.score == 1.0 and d.category == category
    assert len(d.evidence) == 2


@pytest.mark.parametrize(
    "sentence",
    [
        "The older man arrived at noon.",  # group without attribute
        "Someone was forgetful today.",  # attribute without group
        "The teen's manager was slow to reply.",  # "man" inside a word is no group
        "Menus were slow.",
    ],
)
def test_lexicon_leaves_neutral_sentences(sentence):
    (d,) = LexiconDetector()([sentence])
    assert not d.biased and d.score == 0.0 and d.category is None


@pytest.mark.parametrize(
    "sentence",
    [
        "We should not assume the older man is forgetful.",
        "Saying the woman is emotional relies on a stereotype.",
        "There is not enough information to say whether the immigrant is a criminal.",
    ],
)
def test_lexicon_counter_cues_unflag_rejected_stereotypes(sentence):
    (d,) = LexiconDetector()([sentence])
    assert not d.biased and d.score == 0.5 and len(d.evidence) == 3
    (raw,) = LexiconDetector(counter_cues=())([sentence])
    assert raw.biased


def test_lexicon_covers_five_categories_and_accepts_custom_lexicons():
    assert set(DEFAULT_LEXICON) == {"age", "gender", "religion", "nationality", "disability"}
    custom = LexiconDetector({"height": LexiconCategory(("tall person",), ("clumsy",))})
    assert custom(["A tall person is clumsy."])[0].category == "height"
    assert not custom(["The older man is forgetful."])[0].biased
    with pytest.raises(ValueError, match="at least one"):
        LexiconCategory((), ("x",))


def test_judge_detector_formats_prompt_and_thresholds():
    seen = []

    def score(prompt):
        seen.append(prompt)
        return 0.9 if "nurses" in prompt else 0.1

    judge = JudgeDetector(score, template="Q: {context} S: {sentence}", context="who?")
    out = judge(["All nurses are women.", "It rained."])
    assert [d.biased for d in out] == [True, False]
    assert seen[0] == "Q: who? S: All nurses are women."
    with pytest.raises(ValueError, match="probability"):
        JudgeDetector(lambda p: 3.0)(["x"])
    with pytest.raises(ValueError, match="sentence"):
        JudgeDetector(score, template="no field")


def test_judge_score_fn_on_a_tiny_model_is_a_probability():
    from interp.families import tiny_hf

    model, tok = tiny_hf("llama", seed=0)
    score = judge_score_fn(model, tok)
    a, b = score("Is this biased?"), score("Something else entirely")
    assert 0.0 < a < 1.0 and 0.0 < b < 1.0 and a != b
    with pytest.raises(ValueError, match="same token"):
        judge_score_fn(model, tok, yes=" yes", no=" no")


def test_mark_biased_runs_on_the_reasoning_only():
    text = (
        "<think>The older man is forgetful. The weather is nice.</think>The older man is forgetful."
    )
    marks = mark_biased(text)
    assert [m.detection.biased for m in marks] == [True, False]
    assert marks[0].sentence.text == "The older man is forgetful."
    assert marks[0].sentence.start == len("<think>")
    whole = mark_biased("The woman is emotional. Fine.")
    assert [m.detection.biased for m in whole] == [True, False]
    with pytest.raises(ValueError, match="detections"):
        mark_biased(text, lambda sents: [])


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

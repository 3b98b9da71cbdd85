"""interp.answer_forcing: reasoning, then one answer line, forced inside one generate call."""

from __future__ import annotations

import re

import pytest
import torch

import interp
from interp import runs
from interp.answer_forcing import AnswerForcer, AnswerForcing
from interp.spans import SpanRules

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = [*"abcdefghijklmnopqrstuvwxyzABC:.\n <>/", "<eos>", "</think>"]
EOS = VOCAB.index("<eos>")


class CharTok:
    """One token per character (and one for ``</think>``); counts decode calls."""

    eos_token_id = EOS

    def __init__(self):
        self.decoded = []

    def encode(self, text, add_special_tokens=False):
        return [VOCAB.index(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        self.decoded.append(len(ids))
        return "".join("" if i == EOS else VOCAB[i] for i in ids)


def simulate(script, *, budget=40, answer_tokens=4, open_think=False):
    """Greedy decoding of a 'model' that wants to write ``script`` (then EOS) whatever it
    has written; returns the text, whether the cue was forced, and the tokenizer."""
    tok = CharTok()
    cues = {False: tok.encode("\nAnswer:"), True: tok.encode("\n</think>\n\nAnswer:")}
    forcer = AnswerForcer(
        tok,
        [open_think],
        budget=budget,
        answer_tokens=answer_tokens,
        eos_ids=[EOS],
        cues=cues,
        marker=re.compile(SpanRules().answer_marker, re.I),
    )
    wanted = [VOCAB.index(c) if c != "§" else VOCAB.index("</think>") for c in script]
    ids = torch.tensor([[VOCAB.index("<")]])
    for step in range(budget + 30):
        scores = torch.zeros(1, len(VOCAB))
        scores[0, wanted[step] if step < len(wanted) else EOS] = 5.0
        nxt = int(forcer(ids, scores).argmax(-1))
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        if nxt == EOS:
            break
    return "".join(VOCAB[i] for i in ids[0, 1:-1].tolist()), forcer.forced[0], tok


def test_a_model_that_answers_itself_is_not_forced():
    text, forced, _ = simulate("so b.\nAnswer: C\nand more")
    assert (text, forced) == ("so b.\nAnswer: C\n", False)


def test_eos_while_reasoning_forces_the_cue_then_one_answer_line():
    # After "hmm." the model wants EOS: the cue is forced instead (its answer is EOS again).
    text, forced, _ = simulate("hmm.")
    assert (text, forced) == ("hmm.\nAnswer:", True)


def test_the_budget_forces_the_cue_and_the_answer_is_capped():
    text, forced, _ = simulate("a" * 100, budget=5, answer_tokens=3)
    # 5 reasoning tokens, the 8-token cue, then 3 answer tokens (the model keeps saying "a").
    assert forced and text == "aaaaa\nAnswer:aaa"


def test_think_blocks_use_the_think_cue_or_end_at_their_close():
    text, forced, _ = simulate("x" * 100, budget=3, answer_tokens=2, open_think=True)
    assert forced and text == "xxx\n</think>\n\nAnswer:xx"
    # The model closes the block itself: no cue; the answer may span lines (token limit).
    text, forced, _ = simulate("ab§ B\nC rest", answer_tokens=4, open_think=True)
    assert not forced and text == "ab</think> B\nC"


def test_each_step_decodes_only_the_newest_token():
    _, _, tok = simulate("a" * 300, budget=200, answer_tokens=3)
    assert set(tok.decoded) == {1}  # one token per call: linear in the continuation


def test_on_a_tiny_model_through_runs_generate():
    model = interp.tiny("llama", seed=0)
    prompts = ["Question one?\nReasoning:", "Q2\nReasoning:", "A third, longer prompt\nReasoning:"]
    forcing = AnswerForcing(model, budget=5, answer_tokens=3)
    g = runs.generate(
        model,
        prompts,
        max_new_tokens=forcing.max_new_tokens,
        batch_size=2,
        logits_processors=forcing,
        progress=False,
    )
    assert sorted(forcing.forced) == [0, 1, 2]
    for i, text in enumerate(g.texts):
        # Random weights never write an answer marker: the cue is forced after the budget.
        assert forcing.forced[i] and text.count("\nAnswer:") == 1
        assert "\n" not in text.split("\nAnswer:")[1].strip()
        assert g.finish_reasons[i] == "eos"
    with pytest.raises(ValueError, match="n=1"):
        forcing([0])
    with pytest.raises(ValueError, match=">= 1"):
        AnswerForcing(model, budget=0, answer_tokens=3)

"""interp.chat helpers for studies: conversations, thinking_kwargs, check_generation_prefix,
training_examples."""

from __future__ import annotations

import pytest
from test_chat import QWEN3

from interp.chat import (
    check_generation_prefix,
    conversations,
    encode,
    thinking_kwargs,
    training_examples,
)
from interp.families import byte_tokenizer


def test_conversations_cycle_system_prompts_and_add_answers():
    got = conversations(["A", "B"], ["u1", "u2", "u3"], ["x", "y", "z"])
    assert [c[0]["content"] for c in got] == ["A", "B", "A"]
    assert got[2] == [
        {"role": "system", "content": "A"},
        {"role": "user", "content": "u3"},
        {"role": "assistant", "content": "z"},
    ]
    assert conversations(None, ["u"]) == [[{"role": "user", "content": "u"}]]
    with pytest.raises(ValueError, match="2 answers for 1"):
        conversations("S", ["u"], ["a", "b"])


def test_positions_on_a_thinking_template_need_enable_thinking_false():
    tok = byte_tokenizer()
    tok.chat_template = QWEN3
    conv = conversations("Be brief.", ["2+2?"], ["FOUR"])[0]
    kw = thinking_kwargs(tok, enable_thinking=False)
    assert kw == {"enable_thinking": False}
    got = check_generation_prefix(tok, conv, **kw)
    assert got["text"].endswith("<think>\n\n</think>\n\nFOUR<|im_end|>\n")
    assert got["chat_template_kwargs"] == kw
    idx = got["index"]
    assert idx["user_end"] < idx["pre_assistant"] < idx["assistant_1"]
    assert got["token"]["pre_assistant"] == "\n" and got["token"]["assistant_1"] == "F"
    # Thinking left on: the generation prompt stops before the think block that the
    # teacher-forced text has, so pre_assistant would be read at the wrong token.
    with pytest.raises(RuntimeError, match="pre_assistant"):
        check_generation_prefix(tok, conv, **thinking_kwargs(tok, enable_thinking=True))
    chatml = byte_tokenizer()  # no thinking switch: nothing passed, and asking for one fails
    assert thinking_kwargs(chatml) == {}
    with pytest.raises(ValueError, match="no thinking switch"):
        thinking_kwargs(chatml, enable_thinking=True)


def test_training_examples_are_the_unpadded_rows_with_the_assistant_mask():
    tok = byte_tokenizer()
    convs = conversations("S", ["short", "a much longer question"], ["OK", "FINE"])
    got = training_examples(tok, convs)
    batch = encode(tok, convs, padding_side="right")
    for row, ex in enumerate(got):
        n = int(batch.attention_mask[row].sum())
        assert ex["input_ids"] == batch.input_ids[row, :n].tolist()
        assert ex["loss_mask"] == batch.masks["assistant"][row, :n].int().tolist()
        answer = [i for i, m in zip(ex["input_ids"], ex["loss_mask"], strict=True) if m]
        assert tok.decode(answer) == ["OK", "FINE"][row]
    assert len(got[0]["input_ids"]) < len(got[1]["input_ids"])  # no padding kept

"""Chat positions pinned to the template, under both paddings, for a real and a byte tokenizer."""

from __future__ import annotations

import pytest
import torch

from interp.chat import char_span_to_tokens, encode
from interp.families import byte_tokenizer

CONVS = [
    [
        {"role": "user", "content": "What is 7 times 6?"},
        {"role": "assistant", "content": "It is 42."},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour"},
        {"role": "assistant", "content": "Blue, like the sky on a clear day."},
    ],
]


@pytest.fixture(scope="module", params=["byte", "embedded"])
def tokenizer(request):
    if request.param == "byte":
        return byte_tokenizer()
    return request.getfixturevalue("embedded").tokenizer


def decode_at(tok, batch, row, idx):
    return tok.decode(batch.input_ids[row, idx])


@pytest.mark.parametrize("side", ["left", "right"])
def test_positions_point_at_the_right_tokens(tokenizer, side):
    b = encode(tokenizer, CONVS, padding_side=side)
    for row, conv in enumerate(CONVS):
        user, answer = conv[-2]["content"], conv[-1]["content"]
        assert tokenizer.decode(b.input_ids[row][b.masks["assistant"][row]]) == answer
        assert tokenizer.decode(b.input_ids[row][b.masks["user"][row]]) == user
        assert user.endswith(decode_at(tokenizer, b, row, b.positions["user_end"][row]).strip())
        first = decode_at(tokenizer, b, row, b.positions["assistant_1"][row])
        assert answer.startswith(first.strip())
        assert b.positions["pre_assistant"][row] == b.positions["assistant_1"][row] - 1
        assert b.attention_mask[row, b.positions["pre_assistant"][row]] == 1
    pad_col = 0 if side == "left" else -1
    assert (b.attention_mask[:, pad_col] == 0).any()


def test_generation_prompt_pre_assistant_is_the_last_token(tokenizer):
    convs = [c[:-1] for c in CONVS]
    b = encode(tokenizer, convs, padding_side="left")
    assert torch.equal(b.positions["pre_assistant"], torch.full((2,), b.input_ids.shape[1] - 1))
    assert "assistant" not in b.masks
    assert b.texts[0].rstrip().endswith("assistant")


def test_content_repeated_in_a_system_prompt_is_pinned_to_the_user_turn():
    tok = byte_tokenizer()
    conv = [{"role": "system", "content": "say hi"}, {"role": "user", "content": "hi"}]
    b = encode(tok, conv)
    start = int(b.masks["user"][0].nonzero()[0])
    assert b.texts[0][int(b.offsets[0, start, 0]) :].startswith("hi<|im_end|>")


def test_no_chat_template_is_a_clear_error():
    tok = byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode(tok, [{"role": "user", "content": "hi"}])


def test_mixed_endings_are_rejected():
    with pytest.raises(ValueError, match="assistant"):
        encode(byte_tokenizer(), [CONVS[0], CONVS[1][:-1]])


def test_char_span_to_tokens():
    offsets = torch.tensor([[0, 3], [3, 4], [4, 9], [9, 9]])
    assert char_span_to_tokens(offsets, 3, 6) == (1, 3)
    with pytest.raises(ValueError, match="no token"):
        char_span_to_tokens(offsets, 20, 30)

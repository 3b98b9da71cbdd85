"""Chat positions pinned to the template, under both paddings, for a real and a byte tokenizer."""

from __future__ import annotations

import pytest
import torch

from interp.chat import PlainFormat, char_span_to_tokens, encode, render
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


# ---- template keyword arguments, thinking blocks, plain formats --------------------------------
QWEN3 = (  # the parts of Qwen3's chat template that place thinking blocks
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')"
    " + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
MULTI_TURN = [
    {"role": "user", "content": "Say yes"},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "Now say no"},
    {"role": "assistant", "content": "no, no"},
]


@pytest.fixture
def qwen3_tok():
    tok = byte_tokenizer()
    tok.chat_template = QWEN3
    return tok


@pytest.mark.parametrize("side", ["left", "right"])
def test_qwen3_thinking_block_before_a_teacher_forced_answer(qwen3_tok, side):
    tok = qwen3_tok
    convs = [CONVS[0], MULTI_TURN]
    b = encode(tok, convs, padding_side=side)
    for row, conv in enumerate(convs):
        answer = conv[-1]["content"]
        assert tok.decode(b.input_ids[row][b.masks["assistant"][row]]) == answer
        pre = int(b.positions["pre_assistant"][row])
        upto = tok.decode(b.input_ids[row, : pre + 1][b.attention_mask[row, : pre + 1].bool()])
        assert upto.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert tok.decode(b.input_ids[row, pre + 1]) == answer[0]
        assert tok.decode(b.input_ids[row][b.masks["user"][row]]) == conv[-2]["content"]
    # The earlier assistant turn has no thinking block in the full text (Qwen3 drops it),
    # though it has one when it is the last message: spans come from the full text.
    assert "<|im_start|>assistant\nyes<|im_end|>" in b.texts[1]


def test_enable_thinking_reaches_the_template_and_positions_agree(qwen3_tok):
    tok = qwen3_tok
    prompt = encode(tok, CONVS[0][:1], enable_thinking=False)
    assert prompt.texts[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert int(prompt.positions["pre_assistant"][0]) == prompt.input_ids.shape[1] - 1
    # The generation prompt is the teacher-forced text up to pre_assistant.
    full = encode(tok, CONVS[0], padding_side="right")
    pre = int(full.positions["pre_assistant"][0])
    assert torch.equal(full.input_ids[0, : pre + 1], prompt.input_ids[0])
    thinking = encode(tok, CONVS[0][:1])
    assert thinking.texts[0].endswith("<|im_start|>assistant\n")
    assert render(tok, CONVS[0][:1], True, enable_thinking=False) == prompt.texts[0]


def test_template_kwargs_are_passed_and_reserved_ones_refused():
    tok = byte_tokenizer()
    tok.chat_template = "{{ greeting }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    b = encode(tok, [{"role": "user", "content": "hi"}], greeting="Hello ")
    assert b.texts[0] == "Hello [hi]"
    assert tok.decode(b.input_ids[0][b.masks["user"][0]]) == "hi"
    with pytest.raises(TypeError, match="themselves"):
        encode(tok, [{"role": "user", "content": "hi"}], tokenize=True)


@pytest.mark.parametrize("tokenizer_kind", ["byte", "embedded"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_plain_format_for_tokenizers_without_a_template(tokenizer_kind, side, request):
    if tokenizer_kind == "byte":
        tok = byte_tokenizer()
    else:
        import copy

        tok = copy.deepcopy(request.getfixturevalue("embedded").tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_format='plain'"):
        encode(tok, CONVS)
    b = encode(tok, CONVS, chat_format="plain", padding_side=side)
    assert b.texts[0] == "User: What is 7 times 6?\nAssistant: It is 42."
    for row, conv in enumerate(CONVS):
        answer = tok.decode(b.input_ids[row][b.masks["assistant"][row]])
        assert answer.strip() == conv[-1]["content"]  # BPE may glue the space to it
        pre = int(b.positions["pre_assistant"][row])
        assert b.masks["assistant"][row, pre + 1] and not b.masks["assistant"][row, pre]
        assert tok.decode(b.input_ids[row, pre]).strip() in (":", "")
        assert tok.decode(b.input_ids[row][b.masks["user"][row]]).strip() == conv[-2]["content"]
    prompt = encode(tok, [c[:-1] for c in CONVS], chat_format="auto")
    assert prompt.texts[1] == "System: Answer briefly.\nUser: Name a colour\nAssistant:"
    assert tok.decode(prompt.input_ids[1, prompt.positions["pre_assistant"][1]]) == ":"
    custom = PlainFormat(user="Q", assistant="A", separator="\n\n")
    assert (
        render(tok, CONVS[0], False, chat_format=custom) == "Q: What is 7 times 6?\n\nA: It is 42."
    )
    with pytest.raises(TypeError, match="no effect"):
        encode(tok, CONVS, chat_format="plain", enable_thinking=False)
    with pytest.raises(ValueError, match="chat_format"):
        encode(tok, CONVS, chat_format="chatml")


def test_auto_keeps_an_existing_template():
    tok = byte_tokenizer()
    assert encode(tok, CONVS, chat_format="auto").texts == encode(tok, CONVS).texts
    assert encode(tok, CONVS, chat_format="plain").texts[0].startswith("User: ")


def test_plain_format_gets_the_tokenizers_bos_and_a_template_does_not_double_it():
    from tokenizers.processors import TemplateProcessing

    tok = byte_tokenizer()
    bos = tok.pad_token_id  # <|endoftext|> stands in for a BOS token
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    plain = encode(tok, CONVS[0], chat_format="plain", padding_side="right")
    assert int(plain.input_ids[0, 0]) == bos and int(plain.attention_mask[0, 0]) == 1
    assert tok.decode(plain.input_ids[0][plain.masks["assistant"][0]]) == "It is 42."
    templated = encode(tok, CONVS[0], padding_side="right")
    assert int(templated.input_ids[0, 0]) != bos

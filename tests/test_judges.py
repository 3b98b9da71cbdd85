"""Judges: rubric digits, yes/no and HF classifiers; statuses; reasoning templates."""

from __future__ import annotations

import math

import pytest
import torch

import interp
from interp.families import byte_tokenizer
from interp.judges import ClassifierJudge, JudgeResult, RubricJudge, YesNoJudge, judge_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

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
    "{%- if loop.index0 > ns.last_query_index and loop.last %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')"
    " + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
R1 = (  # DeepSeek-R1's generation prompt opens the reasoning block
    "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>User: {{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|im_start|>Assistant: "
    "{{ m['content'].split('</think>')[-1] }}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>Assistant: <think>\n{% endif %}"
)
R1_DISTILL = (  # knows reasoning blocks (strips them from history) but opens none
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'].split('</think>')[-1] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVS = [
    [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Simmer it for nine minutes."},
    ],
    [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}],
]
RUBRIC = "Rate the reply from 1 to 5.\nRequest: {prompt}\nReply: {response}"


class FakeLM:
    """Next-token probabilities fixed by hand, at every position; records its inputs."""

    def __init__(self, tokenizer, probs: dict[str, float], max_len: int | None = None):
        self.tokenizer = tokenizer
        V = len(tokenizer)
        p = torch.zeros(V)
        for token, prob in probs.items():
            (i,) = tokenizer(token, add_special_tokens=False)["input_ids"]  # one token each
            p[i] += prob
        (z,) = tokenizer("z", add_special_tokens=False)["input_ids"]
        p[z] += 1.0 - float(p.sum())  # the rest of the mass: on "z", not an answer
        self.logits = p.clamp_min(1e-30).log()
        self.device = torch.device("cpu")
        self.seen: list[torch.Tensor] = []
        if max_len is not None:
            self.cfg = type("Cfg", (), {"n_ctx": max_len})()

    def forward(self, input_ids, attention_mask=None):
        self.seen.append(input_ids.clone())
        return self.logits.expand(*input_ids.shape, -1).clone()


@pytest.fixture(scope="module")
def llama():
    return interp.tiny("llama", seed=0)


def test_rubric_reads_the_expected_digit_and_its_mass():
    tok = byte_tokenizer()
    tok.add_tokens([" 4"])  # a space-prefixed variant of 4 sums with the bare digit
    lm = FakeLM(tok, {"4": 0.3, " 4": 0.2, "2": 0.2, "7": 0.1})
    judge = RubricJudge(lm, RUBRIC, prefill="Score:")
    result = judge(CONVS, progress=False)
    assert isinstance(result, JudgeResult) and len(result) == 3
    assert result.options == ("1", "2", "3", "4", "5")
    assert result.status == ("ok",) * 3
    assert torch.allclose(result.mass, torch.full((3,), 0.7), atol=1e-5)
    assert torch.allclose(result.scores, torch.full((3,), (4 * 0.5 + 2 * 0.2) / 0.7), atol=1e-5)
    assert torch.allclose(result.readout[:, 3], torch.full((3,), 0.5), atol=1e-5)
    assert set(judge.token_ids["4"]) == {tok.convert_tokens_to_ids("4"), len(tok) - 1}
    # A tokenizer with " 4" only: the other digits have no space variant, so the answer
    # is read after a space (what the model emits after "Score:").
    assert result.inputs[0].endswith("<|im_start|>assistant\nScore: ")
    assert result.records()[0]["status"] == "ok"


def test_low_mass_is_malformed_and_other_digits_out_of_range():
    tok = byte_tokenizer()
    malformed = RubricJudge(FakeLM(tok, {"4": 0.2, "a": 0.7}), RUBRIC)(CONVS, progress=False)
    assert malformed.status == ("malformed",) * 3
    assert torch.isnan(malformed.scores).all()
    assert torch.allclose(malformed.readout[:, 3], torch.full((3,), 0.2), atol=1e-5)
    assert malformed.counts() == {"malformed": 3}
    assert malformed.records()[0]["score"] is None
    out = RubricJudge(FakeLM(tok, {"4": 0.2, "7": 0.7}), RUBRIC)(CONVS, progress=False)
    assert out.status == ("out_of_range",) * 3 and torch.isnan(out.scores).all()
    lowered = RubricJudge(FakeLM(tok, {"4": 0.2, "7": 0.7}), RUBRIC, min_mass=0.1)
    assert lowered(CONVS, progress=False).scores == pytest.approx([4.0] * 3, abs=1e-5)
    zero_to_nine = RubricJudge(FakeLM(tok, {"0": 0.5, "9": 0.5}), RUBRIC, scale=range(10))
    assert zero_to_nine(CONVS, progress=False).scores == pytest.approx([4.5] * 3, abs=1e-5)


def test_yes_no_sums_the_word_variants():
    tok = byte_tokenizer()
    tok.add_tokens([" Yes", "yes", " No"])
    lm = FakeLM(tok, {" Yes": 0.3, "yes": 0.1, " No": 0.2, "Y": 0.3})
    judge = YesNoJudge(lm, "Is this polite? {text}")
    result = judge(["Thanks!", "Go away."], progress=False)
    assert result.options == ("yes", "no")
    assert result.scores == pytest.approx([0.4 / 0.6] * 2, abs=1e-5)
    assert result.mass == pytest.approx([0.6] * 2, abs=1e-5)
    assert YesNoJudge(lm, "{text}", min_mass=0.7)(["x"], progress=False).status == ("malformed",)


def test_yes_no_without_word_tokens_reads_distinct_first_tokens():
    tok = byte_tokenizer()
    judge = YesNoJudge(FakeLM(tok, {"Y": 0.3, "y": 0.1, "N": 0.2, " ": 0.4}), "{text}")
    ids = judge.token_ids
    assert {tok.decode([i]) for i in ids["yes"]} == {"Y", "y"}
    assert {tok.decode([i]) for i in ids["no"]} == {"N", "n"}  # " " is shared: left out
    assert judge(["ok"], progress=False).scores == pytest.approx([0.4 / 0.6], abs=1e-5)


def test_embedded_vocabulary_variants(embedded):
    judge = YesNoJudge(embedded, "{text}")
    words = {
        k: sorted(embedded.tokenizer.decode([i]) for i in v) for k, v in judge.token_ids.items()
    }
    assert {" Yes", "Yes", "yes", " yes"} <= set(words["yes"])
    assert {" No", "No", "no", " no"} <= set(words["no"])
    rubric = RubricJudge(embedded, "{text}", prefill="Score:")
    assert [embedded.tokenizer.decode(v) for v in rubric.token_ids.values()] == list("12345")
    assert rubric._text("x", 0).endswith("Score: ")  # SmolLM2 has no " 4" token


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_scores_match_a_single_forward_pass(llama, batch_size):
    judge = RubricJudge(llama, RUBRIC, prefill="Score:", min_mass=0.0)
    items = CONVS[::-1]  # not in length order: results come back in input order
    result = judge(items, batch_size=batch_size, progress=False)
    tok = llama.tokenizer
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(1, 6)]
    for i, text in enumerate(result.inputs):
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            p = llama.forward(ids)[0, -1].float().softmax(-1)[digits]
        assert result.readout[i] == pytest.approx(p.tolist(), rel=1e-4, abs=1e-7)
        assert float(result.scores[i]) == pytest.approx(
            float((p * torch.arange(1, 6)).sum() / p.sum()), rel=1e-5
        )
    assert result.status == ("ok",) * 3


def test_yes_no_on_a_model_matches_a_single_forward_pass(llama):
    judge = YesNoJudge(llama, "Polite? {text}", min_mass=0.0)
    texts = ["Thanks a lot!", "No.", "Could you please pass the salt?"]
    result = judge(texts, batch_size=2, progress=False)
    tok = llama.tokenizer
    for i, text in enumerate(result.inputs):
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            p = llama.forward(ids)[0, -1].float().softmax(-1)
        y, n = (float(p[judge.token_ids[w]].sum()) for w in ("yes", "no"))
        assert float(result.scores[i]) == pytest.approx(y / (y + n), rel=1e-4)
        assert float(result.mass[i]) == pytest.approx(y + n, rel=1e-4)


def test_too_long_items_are_reported_not_run():
    tok = byte_tokenizer()
    lm = FakeLM(tok, {"3": 0.9}, max_len=80)
    result = RubricJudge(lm, "{text}")(["short", "x" * 200], progress=False)
    assert result.status == ("ok", "too_long")
    assert float(result.scores[0]) == pytest.approx(3.0, abs=1e-5)
    assert math.isnan(float(result.scores[1])) and torch.isnan(result.readout[1]).all()
    assert all(ids.shape[1] <= 80 for ids in lm.seen)


def test_reasoning_templates_read_after_the_reasoning_block():
    tok = byte_tokenizer()
    lm = FakeLM(tok, {"4": 0.9})
    tok.chat_template = QWEN3
    qwen = RubricJudge(lm, "{text}", prefill="Score:")
    assert qwen._text("x", 0).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nScore: ")
    forced = RubricJudge(lm, "{text}", chat_template_kwargs={"enable_thinking": True})
    assert forced._text("x", 0).endswith("assistant\n<think>\n\n</think>\n\n")
    kept = RubricJudge(lm, "{text}", thinking="as_is")
    assert kept._text("x", 0).endswith("<|im_start|>assistant\n")
    tok.chat_template = R1
    r1 = RubricJudge(lm, "{text}")
    assert r1._text("x", 0).endswith("Assistant: <think>\n</think>\n\n")
    assert r1(["x"], progress=False).scores == pytest.approx([4.0], abs=1e-5)
    assert tok.decode(lm.seen[-1][0, -12:]) == "<think>\n</think>\n\n"[-12:]
    tok.chat_template = R1_DISTILL
    assert (
        RubricJudge(lm, "{text}")
        ._text("x", 0)
        .endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    )
    # enable_thinking=False reaches a template that takes it (Qwen3's soft switch).
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
    )
    assert RubricJudge(lm, "{text}")._text("x", 0) == "x/no_think "
    tok.chat_template = byte_tokenizer().chat_template  # ChatML: no reasoning, nothing added
    assert RubricJudge(lm, "{text}")._text("x", 0).endswith("<|im_start|>assistant\n")


def test_prompts_are_arguments():
    tok = byte_tokenizer()
    lm = FakeLM(tok, {"2": 1.0})
    system = [
        {"role": "system", "content": "You grade {subject}."},
        {"role": "user", "content": "Grade: {answer}"},
    ]
    result = RubricJudge(lm, system)([{"subject": "maths", "answer": "4"}], progress=False)
    assert "<|im_start|>system\nYou grade maths.<|im_end|>" in result.inputs[0]
    assert "<|im_start|>user\nGrade: 4<|im_end|>" in result.inputs[0]
    base = RubricJudge(lm, "Essay: {text}\nGrade (1-5):", chat_format=None)
    assert base._text("hello", 0) == "Essay: hello\nGrade (1-5): "
    tok.chat_template = None
    plain = RubricJudge(lm, "Grade {text}", chat_format="plain", append_space=False)
    assert plain._text("it", 0) == "User: Grade it\nAssistant:"
    with pytest.raises(ValueError, match="no chat template"):
        RubricJudge(lm, "Grade {text}")(["it"], progress=False)
    with pytest.raises(KeyError, match=r"no field.*response"):
        RubricJudge(lm, "{response}")(["a text"], progress=False)
    with pytest.raises(ValueError, match="placeholder"):
        RubricJudge(lm, "no fields")
    with pytest.raises(ValueError, match="single digits"):
        RubricJudge(lm, "{text}", scale=[1, 10])
    with pytest.raises(ValueError, match="batch_size"):
        RubricJudge(lm, "{text}", chat_format=None)(["x"], batch_size=0)
    assert judge_inputs(tok, "q", chat_format=None, prefill="A:") == "qA:"


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    tok = byte_tokenizer()
    tok.model_max_length = 64
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        num_labels=3,
        id2label={0: "neutral", 1: "toxic", 2: "kind"},
        label2id={"neutral": 0, "toxic": 1, "kind": 2},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _classifier_probs(path, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return torch.stack(
            [model(**tok(t, return_tensors="pt")).logits[0].softmax(-1) for t in texts]
        )


def test_classifier_maps_labels_to_scores(classifier_dir):
    texts = ["you are lovely", "I hate this", "the sky is blue"]
    probs = _classifier_probs(classifier_dir, texts)
    one = ClassifierJudge(str(classifier_dir), label="toxic")(texts, batch_size=2, progress=False)
    assert one.options == ("neutral", "toxic", "kind")
    assert one.scores == pytest.approx(probs[:, 1].tolist(), abs=1e-5)
    assert torch.allclose(one.readout, probs, atol=1e-5)
    mapped = ClassifierJudge(str(classifier_dir), labels={"toxic": 1.0, "kind": 0.0})
    result = mapped(texts, progress=False)
    mass = probs[:, 1] + probs[:, 2]
    assert result.mass == pytest.approx(mass.tolist(), abs=1e-5)
    assert result.scores == pytest.approx((probs[:, 1] / mass).tolist(), abs=1e-5)
    strict = ClassifierJudge(str(classifier_dir), labels={"toxic": 1.0}, min_mass=0.99)
    assert set(strict(texts, progress=False).status) == {"malformed"}
    convs = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": t}] for t in texts
    ]
    assert one.scores == pytest.approx(
        ClassifierJudge(str(classifier_dir), label="toxic")(convs, progress=False).scores.tolist()
    )


def test_classifier_model_object_too_long_and_bad_labels(classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    tok = AutoTokenizer.from_pretrained(classifier_dir)
    judge = ClassifierJudge(model, tokenizer=tok, label="kind")
    result = judge(["fine", "y" * 100], progress=False)
    assert result.status == ("ok", "too_long") and math.isnan(float(result.scores[1]))
    truncated = ClassifierJudge(model, tokenizer=tok, label="kind", truncation=True)
    assert truncated(["y" * 100], progress=False).status == ("ok",)
    with pytest.raises(ValueError, match="not the model's"):
        ClassifierJudge(model, tokenizer=tok, label="spam")
    with pytest.raises(ValueError, match="pass label="):
        ClassifierJudge(model, tokenizer=tok)


def test_a_bf16_judge_reads_in_float32():
    fp32 = interp.tiny("llama", seed=0)
    bf16 = interp.tiny("llama", seed=0)
    bf16.model.to(torch.bfloat16)
    a = RubricJudge(fp32, RUBRIC, prefill="Score:", min_mass=0.0)(CONVS, progress=False)
    b = RubricJudge(bf16, RUBRIC, prefill="Score:", min_mass=0.0)(CONVS, progress=False)
    assert b.scores.dtype == torch.float32 and b.status == ("ok",) * 3
    assert torch.allclose(a.scores, b.scores, atol=0.05)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16  # nothing cast the model


def test_sentencepiece_space_variants_are_recognized():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "a", "\u2581a", "z", ":", *"12345", *(f"\u2581{d}" for d in "12345")]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>")
    assert tok.decode(tok.convert_tokens_to_ids(["\u25814"])) == "4"  # alone: no space
    judge = RubricJudge(FakeLM(tok, {"\u25814": 0.5, "4": 0.25}), "{text}", chat_format=None)
    assert sorted(judge.token_ids["4"]) == sorted(tok.convert_tokens_to_ids(["4", "\u25814"]))
    assert not judge._needs_space()  # "▁4" is a space-prefixed digit: read right after ":"
    result = judge(["a:"], progress=False)
    assert result.inputs == ("a:",) and result.mass == pytest.approx([0.75], abs=1e-5)

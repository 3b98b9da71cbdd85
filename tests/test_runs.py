"""interp.runs: batched generate / score / capture_dataset against naive per-example loops.

Every expectation comes from the plain ``transformers`` model run one example at a time,
unpadded (``model.model(ids)`` / ``model.model.generate(ids)``), or from ``interp.capture``
on one text at a time, never from the code under test.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

import interp
from interp import runs
from interp.chat import encode
from interp.positions import Batch
from interp.runs._rows import _accepts
from interp.runs.generation import _sampling_probs

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The cat sat on the mat.", "Hi", "A much longer sentence about dogs.", "Why?"]
CONVS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "what is the capital of France?"}],
    [{"role": "user", "content": "two plus two"}],
]
CHATS = [
    [*CONVS[0], {"role": "assistant", "content": "hello there"}],
    [*CONVS[1], {"role": "assistant", "content": "Paris"}],
    [*CONVS[2], {"role": "assistant", "content": "four, of course"}],
]


@pytest.fixture(scope="module")
def llama():
    return interp.tiny("llama")


@pytest.fixture(scope="module")
def gpt2():  # absolute position embeddings: left padding is wrong without position ids
    return interp.tiny("gpt2")


def ids_of(model, text):
    return torch.tensor([model.tokenizer(text)["input_ids"]])


def plain_greedy(model, ids, max_new_tokens):
    """Unpadded, one prompt at a time, with transformers' own generate."""
    tok = model.tokenizer
    out = model.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    return new


def plain_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 of one unpadded row, fp32 log-softmax."""
    with torch.no_grad():
        logits = model.model(ids).logits[0]
    lp = logits[:-1].float().log_softmax(-1)
    return lp.gather(-1, ids[0, 1:, None])[:, 0]


# ---- generate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen2_moe"])
def test_batched_greedy_equals_row_by_row(family, llama, gpt2):
    model = {"llama": llama, "gpt2": gpt2}.get(family) or interp.tiny(family)
    out = runs.generate(model, TEXTS, max_new_tokens=6, batch_size=3, progress=False)
    for i, text in enumerate(TEXTS):
        assert out.token_ids[i] == plain_greedy(model, ids_of(model, text), 6), text
    assert out.prompt_index == [0, 1, 2, 3]
    assert out.texts[0] == model.tokenizer.decode(out.token_ids[0], skip_special_tokens=True)


def test_conversations_generate_and_the_result_batch(llama):
    out = runs.generate(llama, CONVS, max_new_tokens=5, batch_size=2, progress=False)
    enc = encode(llama.tokenizer, CONVS, padding_side="left")
    batch = out.batch
    for i in range(len(CONVS)):
        prompt = enc.input_ids[i][enc.attention_mask[i].bool()][None]
        assert out.token_ids[i] == plain_greedy(llama, prompt, 5)
        # The result batch is prompt + generated tokens; named positions point into it.
        n = prompt.shape[1]
        row = batch.input_ids[i][batch.attention_mask[i].bool()]
        assert row[:n].tolist() == prompt[0].tolist()
        assert row[n:].tolist() == out.token_ids[i]
        gen = batch.masks["generated"][i].nonzero().flatten()
        assert gen.tolist() == list(range(n, n + len(out.token_ids[i])))
        assert int(batch.positions["pre_assistant"][i]) == n - 1
        assert batch.input_ids[i, n - 1] == enc.input_ids[i, enc.positions["pre_assistant"][i]]
    # Teacher forcing on the model's own greedy generations: each generated token is the
    # argmax of the logits one position earlier.
    with torch.no_grad():
        logits = llama.model(batch.input_ids, attention_mask=batch.attention_mask).logits
    rows, cols = batch.masks["generated"].nonzero(as_tuple=True)
    assert torch.equal(logits[rows, cols - 1].argmax(-1), batch.input_ids[rows, cols])


def test_sampling_is_seeded_per_row(llama):
    kw = dict(max_new_tokens=6, do_sample=True, n=3, progress=False)
    a = runs.generate(llama, TEXTS[:2], seed=7, batch_size=6, **kw)
    torch.manual_seed(123)  # the global RNG plays no part
    b = runs.generate(llama, TEXTS[:2], seed=7, batch_size=1, **kw)
    c = runs.generate(llama, TEXTS[:2], seed=8, batch_size=6, **kw)
    assert a.token_ids == b.token_ids  # same seed, any batch size
    assert a.token_ids != c.token_ids
    assert len({tuple(t) for t in a.token_ids}) == 6  # the samples of a prompt differ
    assert a.prompt_index == [0, 0, 0, 1, 1, 1] and a.sample_index == [0, 1, 2, 0, 1, 2]
    assert [len(g) for g in a.by_prompt()] == [3, 3]


def test_sampling_at_low_temperature_is_greedy(llama):
    greedy = runs.generate(llama, TEXTS, max_new_tokens=5, progress=False)
    cold = runs.generate(
        llama, TEXTS, max_new_tokens=5, do_sample=True, temperature=1e-4, progress=False
    )
    nucleus = runs.generate(
        llama, TEXTS, max_new_tokens=5, do_sample=True, top_p=1e-6, progress=False
    )
    assert cold.token_ids == greedy.token_ids
    assert nucleus.token_ids == greedy.token_ids


def test_sampling_follows_temperature_and_top_p(llama):
    """The first sampled token's frequencies match transformers' own warpers' distribution."""
    text, temperature, top_p, n = "hello", 0.5, 0.6, 3000
    out = runs.generate(
        llama,
        [text],
        max_new_tokens=1,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        n=n,
        batch_size=1000,
        seed=3,
        progress=False,
    )
    ids = ids_of(llama, text)
    with torch.no_grad():
        logits = llama.model(ids).logits[:, -1].float()
    scores = TopPLogitsWarper(top_p)(ids, TemperatureLogitsWarper(temperature)(ids, logits))
    expected = scores.softmax(-1)[0]
    counts = torch.bincount(torch.tensor([t[0] for t in out.token_ids]), minlength=len(expected))
    assert expected[counts > 0].min() > 0  # nothing outside the nucleus
    tv = 0.5 * (counts / n - expected).abs().sum()
    assert tv < 0.08, tv


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.05), (0.9, 20, 0.9, 0.02)],
)
def test_sampling_distribution_equals_transformers_warpers(temperature, top_k, top_p, min_p):
    """What runs.generate samples from is transformers' warper chain (temperature, top-k,
    top-p, min-p), exactly; ties with the k-th score are kept as transformers keeps them."""
    from transformers import MinPLogitsWarper, TopKLogitsWarper

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=gen) * 3
    if top_k and top_p == 1:  # a tie at the k-th score (nucleus boundaries at ties are arbitrary)
        scores[0] = scores[0].sort(descending=True).values
        scores[0, top_k - 2 : top_k + 2] = scores[0, top_k - 1]
    ids = torch.zeros(3, 1, dtype=torch.long)
    ref = TemperatureLogitsWarper(temperature)(ids, scores.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(ids, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(ids, ref)
    if min_p:
        ref = MinPLogitsWarper(min_p)(ids, ref)
    expected = ref.softmax(-1)
    got = _sampling_probs(scores, temperature, top_k, top_p, min_p)
    got = got / got.sum(-1, keepdim=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_top_k_one_and_min_p_near_one_are_greedy(llama):
    greedy = runs.generate(llama, TEXTS, max_new_tokens=5, progress=False)
    for kw in ({"top_k": 1}, {"min_p": 0.999}):
        out = runs.generate(llama, TEXTS, max_new_tokens=5, do_sample=True, progress=False, **kw)
        assert out.token_ids == greedy.token_ids, kw


def test_stop_strings(llama):
    full = runs.generate(llama, TEXTS, max_new_tokens=12, progress=False)
    text = full.texts[0]
    # A printable character that occurs after the start of the completion.
    at = next(i for i, ch in enumerate(text) if i > 0 and ch.isascii() and ch.isprintable())
    stop = text[at]
    out = runs.generate(llama, TEXTS, max_new_tokens=12, stop=[stop, "\x00never"], progress=False)
    assert out.texts[0] == text[: text.find(stop)]
    assert out.finish_reasons[0] == "stop"
    ids = out.token_ids[0]
    assert full.token_ids[0][: len(ids)] == ids
    assert stop in llama.tokenizer.decode(ids) and stop not in llama.tokenizer.decode(ids[:-1])
    for i in range(len(TEXTS)):  # rows without the stop string run on unchanged
        if stop not in full.texts[i]:
            assert out.token_ids[i] == full.token_ids[i]
            assert out.finish_reasons[i] == full.finish_reasons[i]


def test_hooks_on_all_or_generated(llama):
    name = "blocks.2.hook_resid_post"

    def push(tensor, hook):
        return tensor + 10.0 * tensor.new_ones(tensor.shape[-1])

    base = runs.generate(llama, TEXTS, max_new_tokens=5, progress=False)
    every = runs.generate(llama, TEXTS, max_new_tokens=5, hooks=[(name, push)], progress=False)
    later = runs.generate(
        llama, TEXTS, max_new_tokens=5, hooks=[(name, push)], hooks_on="generated", progress=False
    )
    # The same hook on a plain per-prompt loop.
    with llama.hooks(fwd=[(name, push)]):
        expected = [plain_greedy(llama, ids_of(llama, t), 5) for t in TEXTS]
    assert every.token_ids == expected
    # "generated": the first token comes from the unhooked prompt pass, the rest are steered.
    assert [t[0] for t in later.token_ids] == [t[0] for t in base.token_ids]
    assert [t[0] for t in later.token_ids] != [t[0] for t in every.token_ids]
    assert later.token_ids != base.token_ids


def test_logits_processors_see_their_rows(llama):
    """A per-batch processor factory gets each row's prompt index, in the batch's row order."""
    seen = []

    class Force:  # row r always emits the byte of "A" + its prompt index
        def __init__(self, prompts):
            seen.append(list(prompts))
            self.tokens = torch.tensor(
                [llama.tokenizer.convert_tokens_to_ids(chr(65 + p)) for p in prompts]
            )

        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, float("-inf"))
            return out.scatter(-1, self.tokens[:, None].to(scores.device), 0.0)

    out = runs.generate(
        llama,
        TEXTS,
        max_new_tokens=3,
        batch_size=3,
        do_sample=True,
        logits_processors=Force,
        progress=False,
    )
    assert sorted(p for batch in seen for p in batch) == [0, 1, 2, 3] and len(seen) == 2
    assert out.texts == ["AAA", "BBB", "CCC", "DDD"]


def test_generate_refuses_bad_input(llama):
    with pytest.raises(ValueError, match="empty input"):
        runs.generate(llama, [], max_new_tokens=3, progress=False)
    with pytest.raises(ValueError, match="do_sample"):
        runs.generate(llama, TEXTS, max_new_tokens=3, n=2, progress=False)
    with pytest.raises(ValueError, match="do_sample=True"):
        runs.generate(llama, TEXTS, max_new_tokens=3, temperature=0.7, progress=False)
    with pytest.raises(ValueError, match="do_sample=True"):
        runs.generate(llama, TEXTS, max_new_tokens=3, top_k=5, progress=False)
    for bad in ({"top_k": -1}, {"min_p": 1.0}, {"min_p": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            runs.generate(llama, TEXTS, max_new_tokens=3, do_sample=True, progress=False, **bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        runs.generate(llama, TEXTS, max_new_tokens=0, progress=False)
    with pytest.raises(ValueError, match="assistant"):
        runs.generate(llama, CHATS, max_new_tokens=3, progress=False)
    with pytest.raises(ValueError, match="hooks_on"):
        runs.generate(llama, TEXTS, max_new_tokens=3, hooks_on="prompt", progress=False)


def qwen3_model():
    """A tiny llama whose tokenizer has a Qwen3-style template (thinking blocks,
    ``enable_thinking``)."""
    from test_chat import QWEN3

    model = interp.tiny("llama")  # a fresh model: its tokenizer is changed here
    model.tokenizer.chat_template = QWEN3
    return model


def test_generate_passes_chat_template_kwargs(llama):
    model = qwen3_model()
    kw = dict(max_new_tokens=4, batch_size=2, progress=False)
    off = runs.generate(model, CONVS, chat_template_kwargs={"enable_thinking": False}, **kw)
    on = runs.generate(model, CONVS, **kw)
    for i in range(len(CONVS)):
        assert off.prompts[i].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert on.prompts[i].endswith("<|im_start|>assistant\n")
        enc = encode(model.tokenizer, CONVS[i], enable_thinking=False)
        assert off.token_ids[i] == plain_greedy(model, enc.input_ids, 4)
        # pre_assistant is the thinking block's last token, right before the completion.
        n = enc.input_ids.shape[1]
        row = off.batch.input_ids[i][off.batch.attention_mask[i].bool()]
        assert row[:n].tolist() == enc.input_ids[0].tolist()
        pre = int(off.batch.positions["pre_assistant"][i])
        assert off.batch.input_ids[i, pre] == enc.input_ids[0, -1]
        assert model.tokenizer.decode(off.batch.input_ids[i, : pre + 1]).endswith("</think>\n\n")
    with pytest.raises(TypeError, match="chat_template_kwargs"):
        runs.generate(model, CONVS, chat_template_kwargs=["enable_thinking"], **kw)
    # A plain format for a base model without a chat template.
    plain = runs.generate(llama, CONVS[:1], chat_format="plain", **kw)
    assert plain.prompts[0] == "User: hi\nAssistant:"


def test_score_and_capture_dataset_pass_chat_template_kwargs():
    model = qwen3_model()
    kw = {"enable_thinking": False}
    batch = encode(model.tokenizer, CHATS, padding_side="right", **kw)
    ref = runs.score(model, batch, mask="assistant", progress=False)
    out = runs.score(model, CHATS, mask="assistant", chat_template_kwargs=kw, progress=False)
    torch.testing.assert_close(out.nll, ref.nll)
    # The teacher-forced text does not change here (Qwen3 puts the empty block before the
    # last answer either way), but the generation prompt does: capture at its last token.
    prompts = [c[:1] for c in CHATS]
    at = runs.capture_dataset(
        model, prompts, NAMES, pool="pre_assistant", chat_template_kwargs=kw, progress=False
    )
    for i, conv in enumerate(prompts):
        enc = encode(model.tokenizer, conv, enable_thinking=False)
        cache = interp.capture(model, enc.input_ids, NAMES)
        for name in NAMES:
            torch.testing.assert_close(at[name][i], cache[name][0, -1])
    thinking = runs.capture_dataset(model, prompts, NAMES, pool="pre_assistant", progress=False)
    assert not torch.allclose(thinking[NAMES[0]], at[NAMES[0]])


# ---- score -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_score_equals_a_naive_loop(family, side, llama, gpt2):
    model = {"llama": llama, "gpt2": gpt2}[family]
    batch = encode(model.tokenizer, CHATS, padding_side=side)
    got = runs.score(model, batch, mask="assistant", batch_size=2)
    every = runs.score(model, batch, reduction="sum", batch_size=2)
    for i in range(len(CHATS)):
        real = batch.attention_mask[i].bool()
        ids = batch.input_ids[i][real][None]
        lp = plain_logprobs(model, ids)  # lp[t - 1] scores token t
        assistant = batch.masks["assistant"][i][real].nonzero().flatten()
        expected = lp[assistant - 1]
        cols = real.nonzero().flatten()[assistant]
        torch.testing.assert_close(got.logprobs[i, cols], expected)
        torch.testing.assert_close(got.nll[i], -expected.mean())
        assert int(got.n_tokens[i]) == len(assistant)
        assert not got.mask[i][~batch.masks["assistant"][i]].any()
        # mask=None: every token but the first of its row.
        torch.testing.assert_close(every.nll[i], -lp.sum())
        assert int(every.n_tokens[i]) == ids.shape[1] - 1


def test_score_reductions_bool_masks_and_texts(llama):
    batch = llama.tokenize(TEXTS, padding_side="left")
    mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    mask[:, -2:] = True  # the last two tokens of every row (left padding)
    none = runs.score(llama, batch, mask, reduction="none", batch_size=3)
    mean = runs.score(llama, batch, mask, reduction="mean")
    for i, text in enumerate(TEXTS):
        lp = plain_logprobs(llama, ids_of(llama, text))
        k = min(2, len(lp))  # a row's first token is never scored ("Hi" has two tokens)
        torch.testing.assert_close(none.nll[i, -k:], -lp[-k:])
        torch.testing.assert_close(mean.nll[i], -lp[-k:].mean())
        assert int(none.n_tokens[i]) == k
    assert none.nll.shape == batch.input_ids.shape
    # Plain texts are tokenized and scored on every predicted token.
    texts = runs.score(llama, TEXTS, reduction="sum")
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(texts.nll[i], -plain_logprobs(llama, ids_of(llama, text)).sum())


def test_score_of_generations_is_their_likelihood(llama):
    out = runs.generate(llama, CONVS, max_new_tokens=4, do_sample=True, seed=0, progress=False)
    got = runs.score(llama, out, mask="generated", reduction="none")
    for i in range(len(CONVS)):
        row = out.batch.input_ids[i][out.batch.attention_mask[i].bool()][None]
        lp = plain_logprobs(llama, row)
        n = len(out.token_ids[i])
        torch.testing.assert_close(got.logprobs[i][got.mask[i]], lp[-n:])


def test_score_under_a_named_position_intervention(llama):
    """Hooks around score apply; named positions resolve against each re-padded mini-batch."""
    from interp.interventions import add_direction

    name = "blocks.1.hook_resid_post"
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    batch = encode(llama.tokenizer, CHATS, padding_side="left")
    with llama.hooks(fwd=[(name, add_direction(v, scale=5.0, positions="pre_assistant"))]):
        got = runs.score(llama, batch, mask="assistant", batch_size=2)
    for i in range(len(CHATS)):
        real = batch.attention_mask[i].bool()
        ids = batch.input_ids[i][real][None]
        pre = int(batch.positions["pre_assistant"][i]) - int((~real).sum())

        def push(t, hook, pre=pre):
            t = t.clone()
            t[:, pre] += 5.0 * v
            return t

        with llama.hooks(fwd=[(name, push)]):
            lp = plain_logprobs(llama, ids)
        a = batch.masks["assistant"][i][real].nonzero().flatten()
        torch.testing.assert_close(got.nll[i], -lp[a - 1].mean())
    assert not torch.allclose(got.nll, runs.score(llama, batch, mask="assistant").nll)


def test_score_refuses_bad_masks(llama):
    batch = encode(llama.tokenizer, CHATS)
    with pytest.raises(KeyError, match=r"unknown mask 'answer'.*assistant"):
        runs.score(llama, batch, mask="answer")
    with pytest.raises(ValueError, match="does not match"):
        runs.score(llama, batch, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        runs.score(llama, batch, mask=torch.ones_like(batch.input_ids))
    with pytest.raises(ValueError, match="reduction"):
        runs.score(llama, batch, reduction="max")
    with pytest.raises(ValueError, match="empty input"):
        runs.score(llama, [])


# ---- capture_dataset ---------------------------------------------------------------------------
SPECIAL_TEXTS = ["<|im_start|>The cat sat.<|im_end|>", "Hi<|endoftext|>", "<|im_start|>Why not?"]
NAMES = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def loop_acts(model, text, names):
    """Per-text, unpadded: every token's activations and whether it is special."""
    ids = ids_of(model, text)
    cache = interp.capture(model, ids, names)
    special = torch.isin(ids[0], torch.tensor([*model.tokenizer.all_special_ids, 257]))
    return {n: cache[n][0] for n in names}, special


def test_capture_dataset_pooling_equals_a_per_text_loop(llama):
    mean = runs.capture_dataset(
        llama, SPECIAL_TEXTS, NAMES, pool="mean", batch_size=2, progress=False
    )
    last = runs.capture_dataset(
        llama, SPECIAL_TEXTS, NAMES, pool="last", batch_size=2, progress=False
    )
    tokens = runs.capture_dataset(llama, SPECIAL_TEXTS, NAMES, batch_size=2, progress=False)
    keep_all = runs.capture_dataset(
        llama, SPECIAL_TEXTS, NAMES, pool="mean", exclude_special=False, progress=False
    )
    assert runs.special_ids(llama.tokenizer) == [256, 257, 258]
    start = 0
    for i, text in enumerate(SPECIAL_TEXTS):
        acts, special = loop_acts(llama, text, NAMES)
        real = (~special).nonzero().flatten()
        n = len(real)
        for name in NAMES:
            torch.testing.assert_close(mean[name][i], acts[name][real].mean(0))
            torch.testing.assert_close(last[name][i], acts[name][real[-1]])
            torch.testing.assert_close(keep_all[name][i], acts[name].mean(0))
            torch.testing.assert_close(tokens[name][start : start + n], acts[name][real])
        assert tokens.example[start : start + n].tolist() == [i] * n
        assert tokens.position[start : start + n].tolist() == real.tolist()
        start += n
    assert len(tokens) == start and len(mean) == len(SPECIAL_TEXTS)
    assert not torch.allclose(mean[NAMES[0]], keep_all[NAMES[0]])  # the specials mattered


def test_capture_dataset_chat_positions_and_masks(llama):
    batch = encode(llama.tokenizer, CHATS, padding_side="left")
    at = runs.capture_dataset(llama, CHATS, NAMES, pool="pre_assistant", progress=False)
    assistant = runs.capture_dataset(llama, batch, NAMES, pool="assistant", progress=False)
    rows = runs.capture_dataset(llama, CHATS, NAMES, positions="assistant", progress=False)
    last2 = runs.capture_dataset(llama, batch, NAMES, positions=[-2, -1], progress=False)
    start = 0
    for i in range(len(CHATS)):
        real = batch.attention_mask[i].bool()
        ids = batch.input_ids[i][real][None]
        cache = interp.capture(llama, ids, NAMES)
        pre = int(batch.positions["pre_assistant"][i]) - int((~real).sum())
        a = batch.masks["assistant"][i][real]
        for name in NAMES:
            torch.testing.assert_close(at[name][i], cache[name][0, pre])
            torch.testing.assert_close(assistant[name][i], cache[name][0][a].mean(0))
            torch.testing.assert_close(rows[name][start : start + int(a.sum())], cache[name][0][a])
            torch.testing.assert_close(last2[name][i], cache[name][0, -2:])
        start += int(a.sum())


def test_capture_dataset_shards_resume(llama, tmp_path):
    """Batch-granular resume (length_window=1): every finished batch is a shard on disk."""
    texts = [f"text number {i} " * (1 + i % 3) for i in range(7)]
    expected = runs.capture_dataset(llama, texts, NAMES, pool="mean", batch_size=2, progress=False)
    kw = {"pool": "mean", "batch_size": 2, "length_window": 1, "progress": False}

    def interrupted():
        for i, t in enumerate(texts):
            if i == 5:
                raise KeyboardInterrupt("simulated interruption")
            yield t

    folder = tmp_path / "acts"
    with pytest.raises(KeyboardInterrupt):
        runs.capture_dataset(llama, interrupted(), NAMES, to=folder, **kw)
    assert sorted(p.name for p in folder.glob("shard_*")) == [
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]
    assert not (folder / "meta.json").exists()
    assert not list(folder.glob(".*tmp"))  # nothing half-written

    forwards = []
    with llama.hooks(fwd=[("hook_embed", lambda t, h: forwards.append(t.shape[0]))]):
        done = runs.capture_dataset(llama, texts, NAMES, to=folder, **kw)
    assert sum(forwards) == 3  # only texts 4, 5 and 6 ran again
    assert isinstance(done, runs.ShardedActivations) and len(done) == 7
    loaded = done.load()
    for name in NAMES:
        torch.testing.assert_close(loaded[name], expected[name])
    assert loaded.example.tolist() == list(range(7))
    # Other inputs or settings in the same folder are refused, not mixed in.
    with pytest.raises(ValueError, match="different"):
        runs.capture_dataset(
            llama, texts, NAMES, pool="last", batch_size=2, to=folder, progress=False
        )
    with pytest.raises(ValueError, match="other inputs"):
        runs.capture_dataset(llama, texts[::-1], NAMES, to=folder, **kw)


# Lengths 1..12 tokens-ish in a shuffled order, so length sorting regroups the batches.
UNEVEN = [("word " * n).strip() + f" {n}" for n in (3, 11, 1, 7, 12, 2, 9, 5, 4, 10, 6, 8)]


def _padded_tokens(model, fn):
    shapes = []
    with model.hooks(fwd=[("hook_embed", lambda t, h: shapes.append(t.shape[:2]))]):
        out = fn()
    return out, sum(b * t for b, t in shapes)


@pytest.mark.parametrize("mode", ["tokens", "mean", "last"])
def test_capture_dataset_length_sorting_keeps_input_order(llama, mode):
    kw = {"tokens": {}, "mean": {"pool": "mean"}, "last": {"pool": "last"}}[mode]
    plain, padded_plain = _padded_tokens(
        llama,
        lambda: runs.capture_dataset(
            llama, UNEVEN, NAMES, batch_size=3, length_window=1, progress=False, **kw
        ),
    )
    ordered, padded_sorted = _padded_tokens(
        llama,
        lambda: runs.capture_dataset(
            llama, UNEVEN, NAMES, batch_size=3, length_window=4, progress=False, **kw
        ),
    )
    assert padded_sorted < padded_plain  # the point of sorting: less padding
    assert ordered.example.tolist() == plain.example.tolist()
    assert ordered.position.tolist() == plain.position.tolist()
    for name in NAMES:
        torch.testing.assert_close(ordered[name], plain[name], rtol=1e-4, atol=1e-5)
    # and equal to one text at a time
    for i, text in enumerate(UNEVEN):
        one = runs.capture_dataset(llama, [text], NAMES, progress=False, **kw)
        rows = ordered.example == i
        torch.testing.assert_close(ordered[NAMES[0]][rows], one[NAMES[0]], rtol=1e-4, atol=1e-5)


def test_capture_dataset_sorted_shards_resume_by_window(llama, tmp_path):
    kw = {"pool": "mean", "batch_size": 2, "length_window": 2, "progress": False}
    expected = runs.capture_dataset(
        llama, UNEVEN, NAMES, pool="mean", length_window=1, progress=False
    )

    def interrupted():
        for i, t in enumerate(UNEVEN):
            if i == 9:  # inside the third window (texts 8..11)
                raise KeyboardInterrupt("simulated interruption")
            yield t

    folder = tmp_path / "acts"
    with pytest.raises(KeyboardInterrupt):
        runs.capture_dataset(llama, interrupted(), NAMES, to=folder, **kw)
    assert len(list(folder.glob("shard_*"))) == 4  # two whole windows of two batches
    forwards = []
    with llama.hooks(fwd=[("hook_embed", lambda t, h: forwards.append(t.shape[0]))]):
        done = runs.capture_dataset(llama, UNEVEN, NAMES, to=folder, **kw)
    assert sum(forwards) == 4  # only the last window ran again
    loaded = done.load()
    assert loaded.example.tolist() == list(range(len(UNEVEN)))
    for name in NAMES:
        torch.testing.assert_close(loaded[name], expected[name], rtol=1e-4, atol=1e-5)
    # each shard holds its own batch's examples, in order
    assert [s.example.tolist() for s in done] == [[2 * i, 2 * i + 1] for i in range(6)]


def test_capture_dataset_stops_after_the_last_block_asked(llama):
    if not _accepts(llama, "stop_at_layer"):
        pytest.skip("model(..., stop_at_layer=) is not available on this backend yet")
    fired = []
    with llama.hooks(fwd=[("blocks.2.hook_resid_pre", lambda t, h: fired.append(1))]):
        out = runs.capture_dataset(
            llama, TEXTS, "blocks.0.hook_resid_post", pool="mean", progress=False
        )
    assert not fired and out["blocks.0.hook_resid_post"].shape == (len(TEXTS), 64)


def test_capture_dataset_refuses_bad_input(llama):
    with pytest.raises(ValueError, match="empty input"):
        runs.capture_dataset(llama, [], NAMES, progress=False)
    with pytest.raises(ValueError, match="not both"):
        runs.capture_dataset(llama, TEXTS, NAMES, positions=-1, pool="mean", progress=False)
    with pytest.raises(KeyError, match="unknown named position 'answer'"):
        runs.capture_dataset(llama, CHATS, NAMES, pool="answer", progress=False)
    with pytest.raises(ValueError, match="no tokens to use"):
        runs.capture_dataset(llama, ["<|im_start|>"], NAMES, pool="mean", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        runs.capture_dataset(llama, TEXTS, NAMES, positions=5, progress=False)
    with pytest.raises(ValueError, match="length_window"):
        runs.capture_dataset(llama, TEXTS, NAMES, length_window=0, progress=False)
    with pytest.raises(TypeError, match=r"interp\.capture"):
        runs.capture_dataset(
            llama, TEXTS, NAMES, positions=torch.ones(4, 3, dtype=torch.bool), progress=False
        )


# ---- bf16 --------------------------------------------------------------------------------------
def test_bf16_runs_without_upcasting():
    model = interp.tiny("llama")
    ref = runs.score(model, CHATS, mask="assistant")
    ref_acts = runs.capture_dataset(model, TEXTS, NAMES, pool="mean", progress=False)
    model.model.to(torch.bfloat16)
    out = runs.generate(model, CONVS, max_new_tokens=4, do_sample=True, n=2, progress=False)
    assert len(out.token_ids) == 6 and all(len(t) > 0 for t in out.token_ids)
    scores = runs.score(model, out, mask="generated")
    assert scores.nll.dtype == torch.float32 and torch.isfinite(scores.nll).all()
    bf = runs.score(model, CHATS, mask="assistant")
    torch.testing.assert_close(bf.nll, ref.nll, atol=0.05, rtol=0.02)
    acts = runs.capture_dataset(model, TEXTS, NAMES, pool="mean", progress=False)
    assert acts[NAMES[0]].dtype == torch.bfloat16
    torch.testing.assert_close(acts[NAMES[0]].float(), ref_acts[NAMES[0]], atol=0.1, rtol=0.05)
    as32 = runs.capture_dataset(
        model, TEXTS, NAMES, pool="mean", dtype=torch.float32, progress=False
    )
    assert as32[NAMES[0]].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.model.parameters())  # never upcast


def test_batch_input_with_padding_inside_is_refused(llama):
    ids = torch.tensor([[5, 6, 7]])
    bad = Batch(ids, torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="padding between"):
        runs.score(llama, bad)

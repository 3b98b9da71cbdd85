"""interp.runs.generate on TransformerLens models, against the Hugging Face path.

A ``HookedTransformer`` holding a tiny GPT-2's weights (absolute positions: left padding
matters; decoded with its KV cache) and a ``TransformerBridge`` over a tiny Llama (decoded
by recomputing the sequence) each generate what the Hugging Face adapter generates with
``transformers``' own ``generate`` on the same weights: greedy, sampled (same seed),
stopped, with hooks on every pass or on generated tokens only, with logits processors.
"Generated tokens only" is also checked against a plain teacher-forced forward that edits
the generated positions and nothing else.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tl_helpers import hooked_gpt2
from transformers import RepetitionPenaltyLogitsProcessor

import interp
from interp import runs
from interp.families import tiny_hf
from interp.hooks import HookReplacementError
from interp.interventions import add_direction
from interp.positions import PositionError

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning"),
]

TEXTS = ["The cat sat on the mat.", "Hi", "A much longer sentence about dogs.", "Why?"]
CONVS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "what is the capital of France?"}],
]
QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def hooked_transformer():
    """(Hugging Face adapter, HookedTransformer adapter) of one tiny GPT-2's weights."""
    module = pytest.importorskip(
        "transformer_lens.HookedTransformer", reason="TransformerLens 4 removed HookedTransformer"
    )
    hf, tok = tiny_hf("gpt2")
    ht = hooked_gpt2(hf, module.HookedTransformer, device="cpu")
    return interp.load(hf, tokenizer=tok), interp.load(ht, tokenizer=tok)


@pytest.fixture(scope="module")
def bridge():
    """(Hugging Face adapter, TransformerBridge adapter) of one tiny Llama's weights."""
    pytest.importorskip("transformer_lens.model_bridge")
    from transformer_lens.model_bridge import TransformerBridge

    hf, tok = tiny_hf("llama", seed=0)
    # The bridge rewires the HF modules and edits its tokenizer in place: copies of both.
    bridged = TransformerBridge.boot_transformers(
        "interp-test", hf_model=copy.deepcopy(hf), tokenizer=copy.deepcopy(tok)
    )
    return interp.load(hf, tokenizer=tok), interp.load(bridged, tokenizer=tok)


@pytest.fixture(params=["hooked_transformer", "bridge"])
def pair(request):
    return request.getfixturevalue(request.param)


def last_resid(model):
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def push(tensor, hook):
    """A random direction, half the activation's norm: it changes the tokens, but not so much
    that every row emits one token whatever its context (a constant vector would be removed
    by LayerNorm)."""
    v = torch.randn(tensor.shape[-1], generator=torch.Generator().manual_seed(0)).to(tensor)
    return tensor + 0.5 * tensor.norm(dim=-1, keepdim=True) * v / v.norm()


def test_greedy_equals_the_hugging_face_path(pair):
    hf, tl = pair
    kw = dict(max_new_tokens=8, batch_size=3, **QUIET)
    prompts = [*TEXTS, *CONVS]  # left padding up to ~40 tokens within a batch
    a = runs.generate(hf, prompts, **kw)
    b = runs.generate(tl, prompts, **kw)
    assert b.token_ids == a.token_ids
    assert b.finish_reasons == a.finish_reasons and b.texts == a.texts
    assert torch.equal(b.batch.input_ids, a.batch.input_ids)
    assert len({tuple(t) for t in a.token_ids}) > 1 and max(map(len, a.token_ids)) > 1


def test_sampling_equals_the_hugging_face_path_and_ignores_the_batch_size(pair):
    hf, tl = pair
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, n=2)
    a = runs.generate(hf, TEXTS, seed=5, batch_size=8, **kw, **QUIET)
    torch.manual_seed(123)  # the global RNG plays no part
    b = runs.generate(tl, TEXTS, seed=5, batch_size=8, **kw, **QUIET)
    one = runs.generate(tl, TEXTS, seed=5, batch_size=1, **kw, **QUIET)
    other = runs.generate(tl, TEXTS, seed=6, batch_size=8, **kw, **QUIET)
    assert b.token_ids == a.token_ids
    assert one.token_ids == b.token_ids
    assert other.token_ids != b.token_ids
    assert len({tuple(t) for t in b.token_ids}) == len(b.token_ids)  # every sample differs
    # Greedy decoding does not depend on the batch size either.
    g1 = runs.generate(tl, TEXTS, max_new_tokens=6, batch_size=1, **QUIET)
    g4 = runs.generate(tl, TEXTS, max_new_tokens=6, batch_size=4, **QUIET)
    assert g1.token_ids == g4.token_ids


def test_stop_strings(pair):
    hf, tl = pair
    full = runs.generate(tl, TEXTS, max_new_tokens=12, **QUIET)
    text = full.texts[0]
    at = next(i for i, ch in enumerate(text) if i > 0 and ch.isascii() and ch.isprintable())
    stop = text[at]
    out = runs.generate(tl, TEXTS, max_new_tokens=12, stop=[stop, "\x00never"], **QUIET)
    assert out.texts[0] == text[: text.find(stop)]
    assert out.finish_reasons[0] == "stop"
    ids = out.token_ids[0]
    assert full.token_ids[0][: len(ids)] == ids
    tok = tl.tokenizer
    assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
    for i in range(len(TEXTS)):  # rows without the stop string run on unchanged
        if stop not in full.texts[i]:
            assert out.token_ids[i] == full.token_ids[i]
            assert out.finish_reasons[i] == full.finish_reasons[i]
    ref = runs.generate(hf, TEXTS, max_new_tokens=12, stop=[stop, "\x00never"], **QUIET)
    assert out.token_ids == ref.token_ids and out.finish_reasons == ref.finish_reasons


def test_hooks_on_all_and_on_generated_tokens(pair):
    hf, tl = pair
    # A layer before the last: an edit of a position reaches the later positions through
    # attention, so editing the prompt's positions too would change the tokens.
    name = "blocks.0.hook_resid_post"
    kw = dict(max_new_tokens=5, batch_size=4, **QUIET)
    base = runs.generate(tl, TEXTS, **kw)
    got = {}
    for on in ("all", "generated"):
        got[on] = runs.generate(tl, TEXTS, hooks=[(name, push)], hooks_on=on, **kw)
        ref = runs.generate(hf, TEXTS, hooks=[(name, push)], hooks_on=on, **kw)
        assert got[on].token_ids == ref.token_ids, on
    every, later = got["all"], got["generated"]

    def push_in_place(tensor, hook):
        tensor.copy_(push(tensor, hook))

    edited = runs.generate(tl, TEXTS, hooks=[(name, push_in_place)], hooks_on="generated", **kw)
    assert edited.token_ids == later.token_ids
    # "generated": the first token comes from the unhooked prompt pass, the rest are steered.
    assert [t[0] for t in later.token_ids] == [t[0] for t in base.token_ids]
    assert [t[0] for t in later.token_ids] != [t[0] for t in every.token_ids]
    assert later.token_ids != base.token_ids
    # Reference: one teacher-forced forward per row that edits the generated positions only.
    for i, new in enumerate(later.token_ids):
        prompt = torch.tensor(tl.tokenizer(TEXTS[i])["input_ids"])
        n = len(prompt)
        ids = torch.cat([prompt, torch.tensor(new[:-1], dtype=torch.long)])[None]

        def on_generated(tensor, hook, n=n):
            out = tensor.clone()
            out[:, n:] = push(tensor[:, n:], hook)
            return out

        with torch.no_grad():
            logits = tl.run_with_hooks(ids, fwd_hooks=[(name, on_generated)])
        assert logits[0, n - 1 :].argmax(-1).tolist() == new, i


def test_interventions_with_positions_edit_the_prompt_pass(pair):
    hf, tl = pair
    v = torch.randn(tl.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 0.2
    # The user's tokens at layer 0: the edit reaches every later token through attention
    # (through the KV cache), so editing the prompt's first pass only and then recomputing
    # the prompt unedited gives other tokens.
    hooks = [("blocks.0.hook_resid_post", add_direction(v, positions="user"))]
    kw = dict(max_new_tokens=4, **QUIET)
    if tl._bridge:  # no KV cache: each step recomputes the prompt, positions are refused
        with pytest.raises(PositionError, match="without a KV cache"):
            runs.generate(tl, CONVS, hooks=hooks, **kw)
        return
    steered = runs.generate(tl, CONVS, hooks=hooks, **kw)
    assert steered.token_ids == runs.generate(hf, CONVS, hooks=hooks, **kw).token_ids
    assert steered.token_ids != runs.generate(tl, CONVS, **kw).token_ids


def test_logits_processors_see_what_they_see_on_the_hugging_face_path(pair):
    hf, tl = pair

    class Record:
        def __init__(self):
            self.calls = []

        def __call__(self, input_ids, scores):
            self.calls.append((input_ids.clone(), scores.clone()))
            return scores

    seen = {}
    for key, model in (("hf", hf), ("tl", tl)):
        rec = Record()
        out = runs.generate(
            model,
            TEXTS,
            max_new_tokens=4,
            batch_size=4,
            logits_processors=[RepetitionPenaltyLogitsProcessor(1.5), rec],
            **QUIET,
        )
        seen[key] = (rec.calls, out.token_ids)
    (hf_calls, hf_ids), (tl_calls, tl_ids) = seen["hf"], seen["tl"]
    assert tl_ids == hf_ids and len(tl_calls) == len(hf_calls) > 1
    for (ids_a, scores_a), (ids_b, scores_b) in zip(hf_calls, tl_calls, strict=True):
        assert torch.equal(ids_a, ids_b)
        assert scores_b.dtype == torch.float32
        torch.testing.assert_close(scores_b, scores_a, atol=1e-4, rtol=1e-4)
    # The processor is what transformers' repetition_penalty= adds on the Hugging Face path.
    kw = dict(max_new_tokens=6, **QUIET)
    penalised = runs.generate(hf, TEXTS, repetition_penalty=1.5, **kw)
    ours = runs.generate(tl, TEXTS, logits_processors=[RepetitionPenaltyLogitsProcessor(1.5)], **kw)
    assert ours.token_ids == penalised.token_ids


def test_tl_generate_refuses_what_cannot_apply(pair, monkeypatch):
    _, tl = pair
    with pytest.raises(TypeError, match=r"repetition_penalty.*logits_processors="):
        runs.generate(tl, TEXTS, max_new_tokens=2, repetition_penalty=1.3, **QUIET)
    with pytest.raises(TypeError, match="num_return_sequences"):
        runs.generate(tl, TEXTS, max_new_tokens=2, num_return_sequences=2, **QUIET)
    with pytest.raises(TypeError, match="TransformerLens"):
        runs.generate(tl.model, TEXTS, max_new_tokens=2, **QUIET)
    with pytest.raises(ValueError, match="do_sample"):
        runs.generate(tl, TEXTS, max_new_tokens=2, n=2, **QUIET)
    with pytest.raises(HookReplacementError, match="shape"):
        bad = [(last_resid(tl), lambda t, h: t.sum(-1))]
        runs.generate(tl, TEXTS, max_new_tokens=3, hooks=bad, hooks_on="generated", **QUIET)
    if tl._bridge:
        return
    # A backend whose attention ignores the KV cache it is given: refused, not decoded
    # from the newest token alone.
    forward = tl.model.forward

    def cacheless(*args, **kwargs):
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_kv_cache", None)
        kwargs.pop("use_cache", None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tl.model, "forward", cacheless)
    with pytest.raises(RuntimeError, match="KV cache"):
        runs.generate(tl, TEXTS, max_new_tokens=3, **QUIET)

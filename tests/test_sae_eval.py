"""evaluate_on_model: CE loss recovered over real tokens only (padding and special tokens
masked), reconstruction metrics, dead/dense latents and top-activating examples."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.runs import capture_dataset, special_ids
from interp.sae import StandardSAE, TopKSAE, evaluate, evaluate_on_model

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
TEXTS = [
    "A long sentence about the weather in the mountains, where rain falls most days and "
    "the rivers run fast and cold all through the spring and into the early summer.",
    "tea",
    "cats<|endoftext|>dogs",  # a special token in the middle of a text
    "hi",
    "maps and more maps",
    "ok",
]


@pytest.fixture(scope="module")
def model():
    return interp.tiny("llama", seed=0)


def _sae(model, seed=0) -> StandardSAE:
    d = model.cfg.d_model
    sae = StandardSAE(d, 48)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, 48, generator=g) / d**0.5)
        sae.W_dec.copy_(sae.W_enc.t() * 0.8)
        sae.b_enc.copy_(torch.randn(48, generator=g) * 0.1)
    return sae


def _per_text_reference(model, sae, texts, exclude_special=True, exclude_first=0):
    """Each text alone (no padding): token-summed losses of clean/spliced/zero runs."""
    specials = torch.tensor(special_ids(model.tokenizer))
    sums, n = torch.zeros(3, dtype=torch.float64), 0
    for text in texts:
        batch = model.tokenize([text])
        ids = batch.input_ids
        special = torch.isin(ids, specials) if exclude_special else torch.zeros_like(ids).bool()
        pos = torch.arange(ids.shape[1])
        counted = ~special & (pos >= exclude_first)
        target = ~special[0, 1:] & (pos[1:] > exclude_first)

        def spliced(a, hook=None, counted=counted):
            out = a.clone()
            out[counted] = sae.decode(sae.encode_dense(a[counted]))
            return out

        def zero(a, hook=None, counted=counted):
            out = a.clone()
            out[counted] = 0
            return out

        for i, hooks in enumerate(([], [(HOOK, spliced)], [(HOOK, zero)])):
            with torch.no_grad():
                logits = model.run_with_hooks(batch, fwd_hooks=hooks)
            lp = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
            sums[i] += lp[target].double().sum()
        n += int(target.sum())
    clean, spl, zero_ = (sums / n).tolist()
    return clean, spl, zero_, (zero_ - spl) / (zero_ - clean)


@pytest.fixture(params=["right", "left"])
def padding_side(request, model):
    before = model.tokenizer.padding_side
    model.tokenizer.padding_side = request.param
    yield request.param
    model.tokenizer.padding_side = before


def test_ce_loss_recovered_ignores_padding_and_special_tokens(model, padding_side):
    sae = _sae(model)
    batch = model.tokenize(TEXTS, padding_side=padding_side)
    pad_fraction = 1 - batch.attention_mask.float().mean()
    assert pad_fraction > 0.6  # one padded batch, mostly padding
    report = evaluate_on_model(model, sae, TEXTS, HOOK, batch_size=len(TEXTS), top_n=0)
    clean, spl, zero, rec = _per_text_reference(model, sae, TEXTS)
    assert report.ce_clean == pytest.approx(clean, abs=1e-5)
    assert report.ce_spliced == pytest.approx(spl, abs=1e-5)
    assert report.ce_zero == pytest.approx(zero, abs=1e-5)
    assert report.ce_loss_recovered == pytest.approx(rec, abs=1e-5)
    # batch size does not change anything either
    again = evaluate_on_model(model, sae, TEXTS, HOOK, batch_size=2, top_n=0)
    assert again.ce_loss_recovered == pytest.approx(rec, abs=1e-5)
    # the hand-written cross-entropy over the padded batch (what the docs used to do)
    # would not match: padding targets dominate it
    labels = batch.input_ids[:, 1:]
    with torch.no_grad():
        naive = torch.nn.functional.cross_entropy(model(batch)[:, :-1].transpose(1, 2), labels)
    assert abs(float(naive) - clean) > 0.05


def test_special_tokens_can_be_kept(model):
    sae = _sae(model)
    report = evaluate_on_model(model, sae, TEXTS, HOOK, exclude_special=False, top_n=0)
    clean, spl, zero, rec = _per_text_reference(model, sae, TEXTS, exclude_special=False)
    assert report.ce_spliced == pytest.approx(spl, abs=1e-5)
    assert report.ce_zero == pytest.approx(zero, abs=1e-5)
    assert report.ce_loss_recovered == pytest.approx(rec, abs=1e-5)
    assert report.ce_clean == pytest.approx(clean, abs=1e-5)
    kept = evaluate_on_model(model, sae, TEXTS, HOOK, top_n=0)
    assert report.n_tokens == kept.n_tokens + 1  # the one <|endoftext|>


def test_exclude_first_leaves_the_first_tokens_out(model):
    sae = _sae(model)
    report = evaluate_on_model(model, sae, TEXTS, HOOK, exclude_first=2, top_n=2)
    clean, spl, zero, rec = _per_text_reference(model, sae, TEXTS, exclude_first=2)
    assert (report.ce_clean, report.ce_spliced, report.ce_zero) == pytest.approx(
        (clean, spl, zero), abs=1e-5
    )
    assert report.ce_loss_recovered == pytest.approx(rec, abs=1e-5)
    every = evaluate_on_model(model, sae, TEXTS, HOOK, top_n=0)
    assert report.n_tokens == every.n_tokens - 2 * len(TEXTS)  # every text has ≥ 2 tokens
    assert all(e.position >= 2 for v in report.top_examples.values() for e in v)


def test_reconstruction_metrics_match_evaluate_on_the_same_rows(model):
    sae = TopKSAE(model.cfg.d_model, 40, 4, generator=torch.Generator().manual_seed(1))
    rows = capture_dataset(model, TEXTS, [HOOK], progress=False)[HOOK]
    ref = evaluate(sae, [rows[:50], rows[50:]])
    report = evaluate_on_model(model, sae, TEXTS, HOOK, batch_size=4, top_n=0)
    assert report.n_tokens == ref.n_tokens == rows.shape[0]
    assert report.fvu == pytest.approx(ref.fvu, rel=1e-5)
    assert report.mse == pytest.approx(ref.mse, rel=1e-5)
    assert report.l0 == pytest.approx(ref.l0, rel=1e-6)
    assert report.dead_fraction == pytest.approx(ref.dead_fraction)


def test_dead_and_dense_latents_follow_the_thresholds(model):
    sae = _sae(model)
    with torch.no_grad():
        sae.b_enc[3] = -1e4  # never fires
        sae.b_enc[5] = 1e4  # always fires
    report = evaluate_on_model(model, sae, TEXTS, HOOK, top_n=0)
    assert 3 in report.dead_latents and 5 not in report.dead_latents
    assert 5 in report.dense_latents and 3 not in report.dense_latents
    assert report.firing_rate[5] == 1.0 and report.firing_rate[3] == 0.0
    rate = report.firing_rate
    mid = float(rate[(rate > 0) & (rate < 1)].median())
    loose = evaluate_on_model(
        model, sae, TEXTS, HOOK, top_n=0, dead_threshold=mid, dense_threshold=mid
    )
    assert loose.dead_latents == (rate <= mid).nonzero().squeeze(1).tolist()
    assert loose.dense_latents == (rate > mid).nonzero().squeeze(1).tolist()
    with pytest.raises(ValueError, match="dead_threshold"):
        evaluate_on_model(model, sae, TEXTS, HOOK, dead_threshold=2.0)


def test_top_examples_are_the_largest_activations_with_their_tokens(model):
    sae = _sae(model, seed=2)
    report = evaluate_on_model(model, sae, TEXTS, HOOK, batch_size=4, top_n=3, context=2)
    acts = capture_dataset(model, TEXTS, [HOOK], progress=False)
    with torch.no_grad():
        z = sae.encode(acts.acts[HOOK])
    tok = model.tokenizer
    checked = 0
    for latent in range(sae.d_sae):
        col = z[:, latent]
        n_pos = int((col > 0).sum())
        records = report.top_examples[latent]
        assert len(records) == min(3, n_pos)
        want = col.topk(len(records)).values.tolist()
        assert [r.activation for r in records] == pytest.approx(want, abs=1e-5)
        for r in records:
            ids = tok(TEXTS[r.text_index])["input_ids"]
            assert r.token == tok.decode([ids[r.position]])
            assert r.context == (
                tok.decode(ids[max(0, r.position - 2) : r.position])
                + f"«{r.token}»"
                + tok.decode(ids[r.position + 1 : r.position + 3])
            )
            assert r.text == TEXTS[r.text_index]
            checked += 1
    assert checked > 20
    some = evaluate_on_model(model, sae, TEXTS, HOOK, top_n=1, example_latents=[0, 7])
    assert sorted(some.top_examples) == [0, 7]


def test_bad_inputs_raise(model):
    sae = StandardSAE(model.cfg.d_model + 1, 8)
    with pytest.raises(ValueError, match="d_in="):
        evaluate_on_model(model, sae, TEXTS, HOOK)
    with pytest.raises(TypeError, match="not one string"):
        evaluate_on_model(model, _sae(model), "one text", HOOK)
    with pytest.raises(ValueError, match="pattern"):
        evaluate_on_model(model, _sae(model), TEXTS, "blocks.*.hook_resid_post")

"""Activation store: rows equal a direct capture, shuffling is seeded, memory is bounded,
texts come from lists/JSONL/datasets, and disk caches read back memory-mapped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import interp
from interp.sae import TopKSAE, train_sae
from interp.sae.store import ActivationStore, CachedActivations, cache_activations

HOOK = "blocks.1.hook_resid_post"
TEXTS = [
    "The cat sat on the mat.",
    "Sparse autoencoders find features.",
    "hi",
    "A longer sentence about interpretability and superposition in models.",
    "12345",
    "Padding must never leak into the activations.",
    "ok",
    "Residual streams carry many directions.",
    "TopK keeps k latents.",
    "x",
    "Another example text for the store.",
    "The end.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return interp.tiny("llama", seed=0)


def _reference_rows(model, texts, pooling="token"):
    """Each text alone (no padding at all), straight through interp.capture."""
    rows = []
    for t in texts:
        acts = interp.capture(model, [t], [HOOK])[HOOK][0]  # [pos, d]
        rows.append(acts if pooling == "token" else acts.mean(0, keepdim=True))
    return torch.cat(rows)


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    # Order rows by a random projection so two row multisets can be compared.
    key = x.double() @ torch.linspace(1.0, 2.0, x.shape[1], dtype=torch.float64)
    return x[key.argsort()]


def test_token_rows_equal_direct_capture_without_padding(model):
    store = ActivationStore(
        model, TEXTS, HOOK, batch_size=16, buffer_size=48, text_batch_size=5, drop_last=False
    )
    batches = list(store)
    assert all(b.shape == (16, 64) for b in batches[:-1])
    got = torch.cat(batches)
    ref = _reference_rows(model, TEXTS)
    assert got.shape == ref.shape  # one row per real token: padding was dropped
    torch.testing.assert_close(_sorted_rows(got), _sorted_rows(ref), atol=1e-5, rtol=1e-5)
    # Shuffled: not the sequential order.
    assert not torch.allclose(got, ref, atol=1e-5)


def test_mean_pooling_excludes_padding(model):
    store = ActivationStore(
        model,
        TEXTS,
        HOOK,
        pooling="mean",
        batch_size=4,
        buffer_size=8,
        text_batch_size=6,
        drop_last=False,
    )
    got = torch.cat(list(store))
    ref = _reference_rows(model, TEXTS, pooling="mean")
    assert got.shape == (len(TEXTS), 64)
    torch.testing.assert_close(_sorted_rows(got), _sorted_rows(ref), atol=1e-5, rtol=1e-5)


def test_shuffle_is_seeded_and_replayable(model):
    kw = dict(batch_size=8, buffer_size=32, text_batch_size=4)
    a = list(ActivationStore(model, TEXTS, HOOK, seed=1, **kw))
    again = list(ActivationStore(model, TEXTS, HOOK, seed=1, **kw))
    other = list(ActivationStore(model, TEXTS, HOOK, seed=2, **kw))
    assert len(a) == len(again) and all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, other, strict=False))


def test_memory_is_bounded_by_the_buffer(model):
    many = TEXTS * 6  # ~ 2,000 tokens through a 64-row buffer
    store = ActivationStore(model, many, HOOK, batch_size=16, buffer_size=64, text_batch_size=3)
    n = sum(b.shape[0] for b in store)
    assert n > 10 * 64
    assert 0 < store.peak_rows <= 64


def test_jsonl_and_datasets_sources_match_a_list(model, tmp_path):
    path = tmp_path / "texts.jsonl"
    lines = [json.dumps({"text": t}) if i % 2 else json.dumps(t) for i, t in enumerate(TEXTS)]
    path.write_text("\n".join(lines) + "\n")
    kw = dict(batch_size=8, buffer_size=32, text_batch_size=4, seed=3)
    from_list = list(ActivationStore(model, TEXTS, HOOK, **kw))
    from_jsonl = list(ActivationStore(model, str(path), HOOK, **kw))
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    from_ds = list(ActivationStore(model, ds, HOOK, **kw))
    for other in (from_jsonl, from_ds):
        assert len(other) == len(from_list)
        for x, y in zip(other, from_list, strict=True):
            torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="no column 'content'"):
        list(ActivationStore(model, ds, HOOK, text_column="content", **kw))


def test_store_validation(model):
    with pytest.raises(ValueError, match="buffer_size"):
        ActivationStore(model, TEXTS, HOOK, batch_size=16, buffer_size=20)
    with pytest.raises((ValueError, TypeError), match="pooling"):  # beartype may catch it first
        ActivationStore(model, TEXTS, HOOK, pooling="max")
    with pytest.raises(ValueError, match="not a pattern"):
        ActivationStore(model, TEXTS, "blocks.*.hook_resid_post")


@pytest.mark.parametrize(
    ("fmt", "dtype"), [("safetensors", torch.float32), ("npy", torch.bfloat16)]
)
def test_disk_cache_roundtrip_memory_mapped(model, tmp_path, fmt, dtype):
    store = ActivationStore(
        model, TEXTS, HOOK, batch_size=10, buffer_size=40, drop_last=False, dtype=dtype
    )
    written = list(store)
    out = cache_activations(
        iter(written), tmp_path / "cache", shard_rows=50, format=fmt, metadata={"hook": HOOK}
    )
    meta = json.loads((out / "meta.json").read_text())
    total = sum(b.shape[0] for b in written)
    assert meta["rows"] == total and meta["d"] == 64 and meta["metadata"] == {"hook": HOOK}
    assert len(meta["shards"]) == -(-total // 50)
    assert not list(out.glob("*.tmp"))

    seq = CachedActivations(out, batch_size=10, buffer_size=20, shuffle=False, drop_last=False)
    back = torch.cat(list(seq))
    assert back.dtype == dtype
    assert torch.equal(back, torch.cat(written))  # stored order, bit-exact

    shuffled = CachedActivations(out, batch_size=10, buffer_size=20, seed=5, read_rows=7)
    batches = list(shuffled)
    assert len(batches) == len(shuffled) == total // 10
    assert 0 < shuffled.peak_rows <= 20
    got = torch.cat(batches).float()
    assert not torch.equal(got, torch.cat(written)[: got.shape[0]].float())
    if fmt == "npy":
        assert isinstance(np.load(out / meta["shards"][0]["file"], mmap_mode="r"), np.memmap)
    with pytest.raises(FileExistsError):
        cache_activations(iter(written), out, format=fmt)


def test_incomplete_cache_is_rejected(tmp_path):
    (tmp_path / "shard_00000.npy").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a \\(complete\\) activation cache"):
        CachedActivations(tmp_path)


def test_train_a_sae_from_the_store(model):
    store = ActivationStore(
        model, TEXTS * 2, HOOK, batch_size=32, buffer_size=128, text_batch_size=6
    )
    sae = TopKSAE(64, 128, 8, generator=torch.Generator().manual_seed(0))
    result = train_sae(sae, store, lr=3e-3, warmup_steps=2, progress=False)
    assert result.steps == len(list(store)) > 5
    assert result.history[-1].fvu < result.history[0].fvu


def test_special_tokens_are_left_out_of_rows_and_means(model):
    # Chat markers are special tokens of the tiny tokenizer; a BOS behaves the same way.
    texts = ["<|im_start|>user\nhello there<|im_end|>", "<|im_start|>hi"]
    markers = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    special = set(model.tokenizer.convert_tokens_to_ids(markers))
    full = interp.capture(model, texts, HOOK)[HOOK]  # right-padded, [2, pos, d]
    batch = model.tokenize(texts)
    keep = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, torch.tensor(list(special)))
    tokens = ActivationStore(model, texts, HOOK, batch_size=1, buffer_size=2)
    torch.testing.assert_close(tokens.rows(texts), full[keep])
    means = ActivationStore(model, texts, HOOK, batch_size=1, buffer_size=2, pooling="mean")
    want = torch.stack([full[i][keep[i]].mean(0) for i in range(len(texts))])
    torch.testing.assert_close(means.rows(texts), want, atol=1e-5, rtol=1e-5)
    # Opting out keeps every real token.
    every = ActivationStore(model, texts, HOOK, batch_size=1, buffer_size=2, exclude_special=False)
    assert every.rows(texts).shape[0] == int(batch.attention_mask.sum())

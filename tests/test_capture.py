"""capture and ActivationCache: positions selected before copying, storage options, I/O."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.cache import ActivationCache
from interp.chat import encode


@pytest.fixture(scope="module")
def model():
    return interp.tiny("qwen2")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 250, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def full(model, ids):
    return interp.capture(model, ids, "blocks.*.hook_resid_post")


def test_full_capture_matches_hidden_states(model, ids, full):
    out = model.model(ids, output_hidden_states=True)
    # HF's hidden_states[l + 1] is the output of layer l (the last one after the final norm).
    for layer in range(model.cfg.n_layers - 1):
        torch.testing.assert_close(
            full[f"blocks.{layer}.hook_resid_post"], out.hidden_states[layer + 1]
        )
    assert full.stack().shape == (model.cfg.n_layers, 3, 11, model.cfg.d_model)


@pytest.mark.parametrize(
    "positions, index",
    [
        (-1, (slice(None), -1)),
        (4, (slice(None), 4)),
        ([0, 5, -2], (slice(None), torch.tensor([0, 5, -2]))),
    ],
)
def test_positions_select_the_same_values_as_indexing(model, ids, full, positions, index):
    part = interp.capture(model, ids, "blocks.*.hook_resid_post", positions=positions)
    for name, value in part.items():
        assert torch.equal(value, full[name][index])


def test_mask_positions(model, ids, full):
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, 2] = mask[2, 7] = mask[2, 8] = True
    part = interp.capture(model, ids, "blocks.1.hook_resid_post", positions=mask)
    assert torch.equal(part["blocks.1.hook_resid_post"], full["blocks.1.hook_resid_post"][mask])


def test_one_position_stores_one_over_T_of_the_bytes(model, ids):
    one = interp.capture(model, ids, "blocks.*.hook_resid_post", positions=-1)
    for v in one.values():
        # Not a view into the full sequence: its storage is exactly its own size.
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
        assert v.numel() * ids.shape[1] == ids.shape[0] * ids.shape[1] * v.shape[-1]


def test_named_positions_follow_padding(model):
    convs = [
        [{"role": "user", "content": "short"}],
        [{"role": "user", "content": "a much longer question here?"}],
    ]
    left = encode(model.tokenizer, convs, padding_side="left")
    right = encode(model.tokenizer, convs, padding_side="right")
    a = interp.capture(model, left, "blocks.2.hook_resid_post", positions="pre_assistant")
    b = interp.capture(model, right, "blocks.2.hook_resid_post", positions="pre_assistant")
    torch.testing.assert_close(
        a["blocks.2.hook_resid_post"], b["blocks.2.hook_resid_post"], atol=1e-5, rtol=1e-5
    )
    # Ground truth: each conversation alone, unpadded, last token.
    for row, conv in enumerate(convs):
        alone = interp.capture(
            model, encode(model.tokenizer, [conv]), "blocks.2.hook_resid_post", positions=-1
        )
        torch.testing.assert_close(
            a["blocks.2.hook_resid_post"][row],
            alone["blocks.2.hook_resid_post"][0],
            atol=1e-5,
            rtol=1e-5,
        )


def test_a_list_of_named_positions_stacks_the_single_ones(model):
    convs = [
        [{"role": "user", "content": "short"}],
        [{"role": "user", "content": "a much longer question here?"}],
    ]
    batch = encode(model.tokenizer, convs, padding_side="left")
    names = ["user_end", "pre_assistant"]
    both = interp.capture(model, batch, "blocks.*.hook_resid_post", positions=names)
    for hook, value in both.items():
        assert value.shape == (2, 2, model.cfg.d_model)
        for i, name in enumerate(names):
            one = interp.capture(model, batch, hook, positions=name)[hook]
            assert torch.equal(value[:, i], one)
    with pytest.raises(ValueError, match="masks"):
        interp.capture(model, batch, "blocks.0.hook_resid_post", positions=["user_end", "user"])
    with pytest.raises(KeyError, match="pre_assistant"):
        interp.capture(model, batch, "blocks.0.hook_resid_post", positions=["pre_asistant"])


def test_storage_dtype_and_device(model, ids):
    c = interp.capture(
        model, ids, "blocks.0.hook_resid_post", positions=-1, dtype=torch.float16, device="cpu"
    )
    assert c["blocks.0.hook_resid_post"].dtype == torch.float16


def test_unknown_named_position_lists_the_known_ones(model):
    batch = encode(model.tokenizer, [{"role": "user", "content": "hi"}])
    with pytest.raises(KeyError, match="pre_assistant"):
        interp.capture(model, batch, "blocks.0.hook_resid_post", positions="pre_asistant")


def test_bad_inputs_get_clear_errors(model):
    with pytest.raises(TypeError, match="integer tensor"):
        interp.capture(model, torch.randn(2, 3), "blocks.0.hook_resid_post")
    with pytest.raises(TypeError, match="positions must be"):
        interp.capture(model, "hi", "blocks.0.hook_resid_post", positions=[[0.5]])
    with pytest.raises(ValueError, match="input_ids"):
        interp.capture(model, {"ids": torch.zeros(1, 2)}, "blocks.0.hook_resid_post")


def test_cache_save_load_roundtrip(tmp_path, full):
    path = full.save(tmp_path / "cache.safetensors")
    back = ActivationCache.load(path)
    assert list(back) == list(full)
    for k in full:
        assert torch.equal(back[k], full[k])
    assert back.meta == full.meta
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_cache_key_error_suggests(full):
    with pytest.raises(KeyError, match="closest"):
        full["blocks.0.hook_resid_pots"]


def test_run_with_cache_returns_logits_and_cache(model, ids):
    logits, cache = model.run_with_cache(ids, names_filter="blocks.*.hook_mlp_out")
    assert torch.equal(logits, model(ids))
    assert len(cache) == model.cfg.n_layers

"""One meaning of ``positions=`` for capture, capture_grads and every intervention, on the
Hugging Face and the TransformerLens backend, with left and right padding; and the refusals.

Every expectation is computed by a naive per-row loop over a full-sequence capture, never by
the selector under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import interp
from interp.chat import encode
from interp.families import tiny_hf
from interp.interventions import add_direction, patch_from, zero_ablate
from interp.positions import PositionError

pytestmark = pytest.mark.usefixtures("one_thread")

RESID = "blocks.1.hook_resid_post"
PATTERN = "blocks.1.attn.hook_pattern"
CONVS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "what is the capital of France?"}],
    [{"role": "user", "content": "two plus two"}],
]
NAMED = ["user_end", "pre_assistant"]


@pytest.fixture(scope="module", params=["hf", "bridge"])
def model(request):
    hf, tok = tiny_hf("llama", seed=0)
    if request.param == "hf":
        return interp.load(hf, tokenizer=tok)
    from transformer_lens.model_bridge import TransformerBridge

    return interp.load(
        TransformerBridge.boot_transformers(
            "interp-test", hf_model=copy.deepcopy(hf), tokenizer=tok
        )
    )


@pytest.fixture(scope="module")
def batches(model):
    return {side: encode(model.tokenizer, CONVS, padding_side=side) for side in ("left", "right")}


@pytest.fixture(scope="module")
def fulls(model, batches):
    names = [RESID] + ([PATTERN] if PATTERN in model.hook_names else [])
    return {side: interp.capture(model, b, names) for side, b in batches.items()}


def draw_positions(data, batch):
    """A ``positions=`` argument of every accepted form, and what it selects per row:
    (argument, columns per row, layout) with layout ``drop`` / ``keep`` / ``flat``."""
    B, T = batch.input_ids.shape
    col = st.integers(-T, T - 1)
    kind = data.draw(
        st.sampled_from(["int", "ints", "name", "names", "row", "rows_n", "mask"]), label="kind"
    )
    if kind == "int":
        c = data.draw(col)
        return c, [[c % T]] * B, "drop"
    if kind == "ints":
        cs = data.draw(st.lists(col, min_size=1, max_size=3))
        return cs, [[c % T for c in cs]] * B, "keep"
    if kind == "name":
        name = data.draw(st.sampled_from(NAMED))
        return name, [[int(batch.positions[name][b])] for b in range(B)], "drop"
    if kind == "names":
        names = data.draw(st.lists(st.sampled_from(NAMED), min_size=1, max_size=3))
        return names, [[int(batch.positions[n][b]) for n in names] for b in range(B)], "keep"
    if kind == "row":
        cs = data.draw(st.lists(col, min_size=B, max_size=B))
        return torch.tensor(cs), [[c % T] for c in cs], "drop"
    if kind == "rows_n":
        n = data.draw(st.integers(1, 3))
        cs = [data.draw(st.lists(col, min_size=n, max_size=n)) for _ in range(B)]
        return torch.tensor(cs), [[c % T for c in row] for row in cs], "keep"
    bits = data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))
    mask = torch.tensor(bits).reshape(B, T)
    return mask, [[c for c in range(T) if mask[b, c]] for b in range(B)], "flat"


def expected(full, cols, layout, axis=1):
    """Naive selection along ``axis`` (1, or the query axis 2 of patterns), row by row."""
    x = full.movedim(axis, 1)
    if layout == "drop":
        out = torch.stack([x[b, cs[0]] for b, cs in enumerate(cols)])
    elif layout == "keep":
        out = torch.stack([torch.stack([x[b, c] for c in cs]) for b, cs in enumerate(cols)])
        return out.movedim(1, axis)
    else:
        rows = [x[b, c] for b, cs in enumerate(cols) for c in cs]
        out = torch.stack(rows) if rows else x.new_zeros((0, *x.shape[2:]))
    return out


def edited(full, cols, value, axis=1):
    """``full`` with ``value`` added at the selected entries (every column once per listing)."""
    out = full.movedim(axis, 1).clone()
    for b, cs in enumerate(cols):
        for c in sorted(set(cs)):
            out[b, c] += value
    return out.movedim(1, axis)


def seen_after(model, batch, name, hook):
    out = {}
    with model.hooks(fwd=[(name, hook), (name, lambda t, h: out.setdefault("v", t.detach()))]):
        model(batch)
    return out["v"]


@given(data=st.data(), side=st.sampled_from(["left", "right"]))
def test_capture_selects_what_naive_indexing_selects(model, batches, fulls, data, side):
    batch, full = batches[side], fulls[side]
    positions, cols, layout = draw_positions(data, batch)
    got = interp.capture(model, batch, list(full), positions=positions)
    for name, value in got.items():
        axis = 2 if name == PATTERN else 1
        torch.testing.assert_close(value, expected(full[name], cols, layout, axis), rtol=0, atol=0)


@given(data=st.data(), side=st.sampled_from(["left", "right"]))
def test_capture_grads_selects_what_naive_indexing_selects(model, batches, data, side):
    batch = batches[side]
    positions, cols, layout = draw_positions(data, batch)

    def loss(logits, b):
        return (logits.float() ** 2).mean()

    whole = interp.capture_grads(model, batch, loss, RESID).grads[RESID]
    part = interp.capture_grads(model, batch, loss, RESID, positions=positions).grads[RESID]
    torch.testing.assert_close(part, expected(whole, cols, layout), rtol=0, atol=0)


@given(data=st.data(), side=st.sampled_from(["left", "right"]))
def test_interventions_edit_exactly_the_selected_entries(model, batches, fulls, data, side):
    batch, full = batches[side], fulls[side]
    positions, cols, _ = draw_positions(data, batch)
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    got = seen_after(model, batch, RESID, add_direction(v, 2.0, positions=positions))
    torch.testing.assert_close(got, edited(full[RESID], cols, 2.0 * v), rtol=0, atol=1e-6)
    if PATTERN in full:  # query positions of [batch, head, q, k], in every head
        got = seen_after(model, batch, PATTERN, zero_ablate(positions=positions))
        want = full[PATTERN].movedim(2, 1).clone()
        for b, cs in enumerate(cols):
            want[b, cs] = 0
        torch.testing.assert_close(got, want.movedim(1, 2), rtol=0, atol=0)


@given(data=st.data())
def test_patch_from_copies_exactly_the_selected_entries(model, batches, fulls, data):
    batch, full = batches["left"], fulls["left"]
    positions, cols, _ = draw_positions(data, batch)
    source = {RESID: torch.randn_like(full[RESID])}
    got = seen_after(model, batch, RESID, patch_from(source, positions=positions))
    want = full[RESID].clone()
    for b, cs in enumerate(cols):
        want[b, cs] = source[RESID][b, cs]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def bad_positions(data, batch):
    B, T = batch.input_ids.shape
    kind = data.draw(st.sampled_from(["int", "ints", "row", "row_len", "mask", "name"]))
    if kind == "int":
        return data.draw(st.one_of(st.integers(T, T + 5), st.integers(-T - 5, -T - 1)))
    if kind == "ints":
        return [0, data.draw(st.integers(T, T + 5))]
    if kind == "row":
        return torch.tensor([0] * (B - 1) + [data.draw(st.integers(T, T + 5))])
    if kind == "row_len":
        return torch.zeros(data.draw(st.sampled_from([B - 1, B + 1])), dtype=torch.long)
    if kind == "mask":
        shape = data.draw(st.sampled_from([(B, T + 1), (B + 1, T), (B, T - 1)]))
        return torch.ones(shape, dtype=torch.bool)
    return "assistant_end"  # not in this batch


@given(data=st.data())
def test_positions_that_do_not_fit_are_refused_everywhere(model, batches, data):
    batch = batches["right"]
    positions = bad_positions(data, batch)
    with pytest.raises((PositionError, KeyError)):
        interp.capture(model, batch, RESID, positions=positions)
    with pytest.raises((PositionError, KeyError)):
        interp.capture_grads(model, batch, lambda lg, b: lg.sum(), RESID, positions=positions)
    v = torch.ones(model.cfg.d_model)
    # An intervention resolves positions against the activation it sees: the error names
    # the hook and the activation's shape.
    with pytest.raises(PositionError, match=r"blocks\.1\.hook_resid_post.*\(3, "):
        model.run_with_hooks(batch, fwd_hooks=[(RESID, add_direction(v, positions=positions))])


def test_per_row_tensor_edits_one_entry_per_row_not_every_listed_column(model, batches, fulls):
    # Silent before: batch.positions["user_end"] edited every listed column in every row.
    batch, full = batches["right"], fulls["right"]
    idx = batch.positions["user_end"]
    assert len(set(idx.tolist())) == len(idx)  # rows differ under right padding
    v = torch.ones(model.cfg.d_model)
    got = seen_after(model, batch, RESID, add_direction(v, positions=idx))
    changed = (got - full[RESID]).abs().amax(-1) > 0
    want = torch.zeros_like(changed)
    want[torch.arange(len(idx)), idx] = True
    assert torch.equal(changed, want)


def test_named_positions_in_interventions_follow_the_running_batch(model, batches, fulls):
    batch, full = batches["right"], fulls["right"]
    v = torch.ones(model.cfg.d_model)
    by_name = seen_after(model, batch, RESID, add_direction(v, positions="pre_assistant"))
    by_index = seen_after(
        model, batch, RESID, add_direction(v, positions=batch.positions["pre_assistant"])
    )
    assert torch.equal(by_name, by_index) and not torch.equal(by_name, full[RESID])
    # Raw ids carry no named positions: refused, naming the hook and the batch.
    with pytest.raises(PositionError, match=r"hook_resid_post.*pre_assistant"):
        model.run_with_hooks(
            batch.input_ids, fwd_hooks=[(RESID, add_direction(v, positions="pre_assistant"))]
        )


def test_positions_on_patterns_select_queries_not_heads(model, batches, fulls):
    # Silent before on the TransformerLens backend: -1 picked the last head of
    # [batch, head, q, k], and zero_ablate(positions=[1]) zeroed head 1.
    if PATTERN not in model.hook_names:
        pytest.skip("attention internals not exposed by this backend")
    batch, full = batches["right"], fulls["right"]
    pattern = full[PATTERN]
    last = interp.capture(model, batch, PATTERN, positions=-1)[PATTERN]
    assert torch.equal(last, pattern[:, :, -1])
    got = seen_after(model, batch, PATTERN, zero_ablate(positions=[1]))
    assert got[:, :, 1].abs().sum() == 0
    assert torch.equal(got[:, :, 2:], pattern[:, :, 2:])
    assert got[:, 1].abs().sum() > 0  # head 1 is not zeroed


def test_in_place_edit_of_resid_mid_changes_the_logits(model, batches):
    # Silent before on the HF backend: the TransformerLens idiom act[:] = 0; return act.
    batch = batches["right"]
    clean = model(batch)

    def zero_and_return(act, hook):
        act[:] = 0
        return act

    def zero_only(act, hook):
        act.zero_()

    for fn in (zero_and_return, zero_only):
        hooked = model.run_with_hooks(batch, fwd_hooks=[("blocks.1.hook_resid_mid", fn)])
        assert (hooked - clean).abs().max() > 1e-3
        # and it equals the same edit made by replacement
        replaced = model.run_with_hooks(
            batch, fwd_hooks=[("blocks.1.hook_resid_mid", lambda a, h: torch.zeros_like(a))]
        )
        torch.testing.assert_close(hooked, replaced)


def test_generate_edits_the_prompt_positions_only(model, batches):
    batch = batches["left"]
    if type(model).__name__ != "HFHookedModel":
        # TransformerBridge generates without a KV cache (its cache is broken on
        # transformers 5): each step recomputes the prompt, so positions are refused.
        v = torch.ones(model.cfg.d_model)
        with pytest.raises(PositionError, match="without a KV cache"):
            with model.hooks(fwd=[(RESID, add_direction(v, positions="pre_assistant"))]):
                model.generate(batch, max_new_tokens=3)
        with model.hooks(fwd=[(RESID, add_direction(v))]):  # every position: fine
            assert model.generate(batch, max_new_tokens=3).shape[1] == batch.input_ids.shape[1] + 3
        return
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 50
    kw = dict(max_new_tokens=4, do_sample=False)
    bare = model.generate(batch, **kw)
    with model.hooks(fwd=[(RESID, add_direction(v, positions="pre_assistant"))]):
        steered = model.generate(batch, **kw)
    assert not torch.equal(bare, steered)
    # Reference: the TransformerLens idiom, editing only the forward pass over the prompt.
    T, rows, idx = (
        batch.input_ids.shape[1],
        torch.arange(len(batch)),
        batch.positions["pre_assistant"],
    )

    def by_hand(act, hook):
        if act.shape[1] != T:
            return None
        out = act.clone()
        out[rows, idx] += v
        return out

    with model.hooks(fwd=[(RESID, by_hand)]):
        assert torch.equal(model.generate(batch, **kw), steered)
    with pytest.raises(PositionError, match="out of range"):
        with model.hooks(fwd=[(RESID, add_direction(v, positions=[50]))]):
            model.generate(batch, **kw)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        [],
        [""],
        ["fine", ""],
        torch.zeros(0, 4, dtype=torch.long),
        torch.zeros(2, 0, dtype=torch.long),
    ],
    ids=["empty-str", "empty-list", "list-of-empty", "one-empty-row", "no-rows", "no-tokens"],
)
def test_empty_input_is_refused_before_the_model_runs(model, bad):
    calls = []
    with model.hooks(fwd=[("hook_embed", lambda t, h: calls.append(1))]):
        with pytest.raises(ValueError, match=r"empty|no tokens"):
            interp.capture(model, bad, RESID)
        with pytest.raises(ValueError, match=r"empty|no tokens"):
            model(bad)
    assert not calls


def test_capture_refuses_forward_arguments_that_would_replace_what_it_returns(model, batches):
    batch = batches["right"]
    with pytest.raises(TypeError, match="return_type"):
        interp.capture(model, batch, RESID, return_type="loss", return_logits=True)
    with pytest.raises(TypeError, match="stop_at_layer"):
        interp.capture_grads(model, batch, lambda lg, b: lg.sum(), RESID, stop_at_layer=1)
    # stop_at_layer is fine in capture: the names before the stop are kept, later ones raise.
    early = interp.capture(model, batch, "blocks.0.hook_resid_post", stop_at_layer=1)
    full = interp.capture(model, batch, "blocks.0.hook_resid_post")
    assert torch.equal(early["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])
    with pytest.raises(RuntimeError, match="never fired"):
        interp.capture(model, batch, "blocks.2.hook_resid_post", stop_at_layer=1)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "gemma2", "qwen2_moe"])
def test_left_padded_batches_equal_each_row_alone(family):
    # Silent before on absolute position embeddings (GPT-2): left padding shifted them.
    model = interp.tiny(family)
    texts = ["hi", "a longer prompt here", "mid length"]
    batch = model.tokenize(texts, padding_side="left")
    logits = model(batch)
    for row, text in enumerate(texts):
        alone = model(text)
        n = alone.shape[1]
        torch.testing.assert_close(logits[row, -n:], alone[0], atol=1e-4, rtol=1e-4)

"""Precision and placement: dtype parsing and ``dtype="auto"``, bf16 runs that leave the model
as it was, and gradient checkpointing that gives the gradients of a plain backward pass."""

from __future__ import annotations

import pytest
import torch

import interp
from interp import runs
from interp.checkpointing import blocks_of, checkpointing, is_recomputing
from interp.families import tiny_hf
from interp.interventions import add_direction
from interp.models import parse_dtype
from interp.train import SFTLoss, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Hello there, friend.", "The cat sat"]


def last_logsumexp(logits, batch):
    return logits[:, -1].logsumexp(-1)


def state_of(module: torch.nn.Module) -> dict[str, tuple[torch.dtype, torch.device]]:
    return {n: (p.dtype, p.device) for n, p in module.named_parameters()}


def forwards_patched(model) -> list[bool]:
    return ["forward" in b.__dict__ for b in blocks_of(model)]


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("float32", torch.float32),
        ("FP32", torch.float32),
        (torch.float16, torch.float16),
        ("auto", "auto"),
        (None, None),
    ],
)
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) == dtype


@pytest.mark.parametrize("bad", ["bfloat", "int8", torch.int64, 16])
def test_parse_dtype_rejects_with_the_accepted_names(bad):
    with pytest.raises(ValueError, match="bf16"):
        parse_dtype(bad)
    if not isinstance(bad, int):  # load's own annotation refuses an int already
        with pytest.raises(ValueError, match="bf16"):
            interp.load("unused-path", dtype=bad)


def test_tiny_dtype_is_the_float32_model_rounded():
    full = interp.tiny("llama")
    half = interp.tiny("llama", dtype="bf16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    for (n, a), (_, b) in zip(
        full.model.named_parameters(), half.model.named_parameters(), strict=True
    ):
        assert torch.equal(a.to(torch.bfloat16), b), n


def test_load_auto_keeps_the_checkpoint_dtype(tmp_path):
    model, tok = tiny_hf("llama", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    def dtypes(m):
        return {p.dtype for p in m.model.parameters()}

    assert dtypes(interp.load(tmp_path, dtype="auto")) == {torch.bfloat16}
    assert dtypes(interp.load(tmp_path)) == {torch.float32}  # the documented default
    assert dtypes(interp.load(tmp_path, dtype="fp16")) == {torch.float16}


def test_load_object_keeps_its_dtype():
    model, tok = tiny_hf("gpt2", dtype="bfloat16")
    wrapped = interp.load(model, tokenizer=tok, dtype="auto")
    assert wrapped.model is model
    assert interp.load(model, tokenizer=tok, dtype="bf16").model is model
    with pytest.raises(ValueError, match="convert it first"):
        interp.load(model, tokenizer=tok, dtype=torch.float32)
    with pytest.raises(ValueError, match="convert it first"):
        interp.load(wrapped, dtype="fp16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------- bf16, nothing moves


def test_bf16_everything_runs_and_leaves_the_model_as_it_was():
    model = interp.tiny("llama", dtype="bf16")
    before = state_of(model.model)
    base_params = list(model.model.parameters())
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    d = model.cfg.d_model
    names = "blocks.*.hook_resid_post"

    cache = interp.capture(model, TEXTS, names, positions=-1)
    assert cache["blocks.0.hook_resid_post"].dtype == torch.bfloat16  # stored as computed

    g = interp.capture_grads(model, TEXTS, last_logsumexp, names, positions=-1)
    g_ck = interp.capture_grads(
        model, TEXTS, last_logsumexp, names, positions=-1, gradient_checkpointing=True
    )
    assert g.grads["blocks.1.hook_resid_post"].dtype == torch.bfloat16
    assert all(p.grad is None for p in base_params)

    hook = ("blocks.0.hook_resid_post", add_direction(torch.randn(d), scale=1.0))
    with model.hooks(fwd=[hook]):
        steered = model(TEXTS)
    gen = runs.generate(model, TEXTS, max_new_tokens=4, hooks=[hook], progress=False)
    scores = runs.score(model, [conv], mask="assistant", progress=False)
    acts = runs.capture_dataset(model, TEXTS, names, pool="mean", progress=False)
    logits = model.unembed(cache["blocks.1.hook_resid_post"])
    lens = interp.lens.logit_lens(model, TEXTS)

    outputs = {
        "capture": cache["blocks.1.hook_resid_post"],
        "grads": g.grads["blocks.0.hook_resid_post"],
        "grads_ck": g_ck.grads["blocks.0.hook_resid_post"],
        "steered": steered,
        "score": scores.logprobs,
        "dataset": acts["blocks.1.hook_resid_post"],
        "unembed": logits,
        "lens": lens.logits,
    }
    for what, t in outputs.items():
        assert torch.isfinite(t.float()).all(), what
    assert len(gen.texts) == 2
    # The documented float32 read-outs: score's log-probs, the lens's logits.
    assert scores.logprobs.dtype == torch.float32 and logits.dtype == torch.float32

    assert state_of(model.model) == before

    # One LoRA step: the LoRA weights are new; the model's own keep dtype and device.
    result = train(
        model,
        [{"prompt": "Q?", "response": "A."}] * 2,
        SFTLoss(),
        TrainConfig(max_steps=1, batch_size=2, gradient_checkpointing=True),
        progress=False,
    )
    assert all(torch.isfinite(torch.tensor(x)) for x in result.losses)
    # LoRA renames the wrapped weights (``base_layer.weight``): compare the same tensors.
    assert [(p.dtype, p.device) for p in base_params] == list(before.values())
    assert not any(forwards_patched(model))


# ---------------------------------------------------------------- gradient checkpointing

NAMES = [
    "blocks.*.hook_resid_post",
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_mid",
    "blocks.0.attn.hook_pattern",
    "blocks.1.attn.hook_z",
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("intervene", [False, True])
def test_checkpointing_gives_the_same_loss_grads_and_activations(family, intervene):
    model = interp.tiny(family)
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(model.cfg.d_model, generator=gen)
    # Edits inside the blocks: they must re-apply when the backward pass recomputes them.
    fwd = (
        [
            ("blocks.0.hook_resid_mid", add_direction(direction, scale=3.0)),
            ("blocks.1.attn.hook_pattern", lambda t, hook: t * 0.5),
        ]
        if intervene
        else []
    )
    out = {}
    for ck in (False, True):
        with model.hooks(fwd=fwd):
            out[ck] = interp.capture_grads(
                model,
                TEXTS,
                last_logsumexp,
                NAMES,
                return_activations=True,
                gradient_checkpointing=ck,
            )
    plain, ck = out[False], out[True]
    torch.testing.assert_close(ck.loss, plain.loss, rtol=1e-6, atol=1e-6)
    assert list(ck.grads.keys()) == list(plain.grads.keys()) == model.resolve(NAMES)
    for name in model.resolve(NAMES):
        torch.testing.assert_close(ck.grads[name], plain.grads[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ck.activations[name], plain.activations[name])
    assert not any(forwards_patched(model))


def test_checkpointing_recomputes_inner_hooks_only_and_saves_memory():
    model = interp.tiny("llama")
    calls: dict[str, list[bool]] = {"inner": [], "outer": []}

    def inner(t, hook):
        calls["inner"].append(is_recomputing())

    def outer(t, hook):
        calls["outer"].append(is_recomputing())

    saved = {}

    def count_saved(ck: bool) -> None:
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            interp.capture_grads(
                model,
                TEXTS,
                last_logsumexp,
                "blocks.1.hook_resid_post",
                gradient_checkpointing=ck,
            )
        saved[ck] = total[0]

    fwd = [("blocks.0.attn.hook_pattern", inner), ("blocks.0.hook_resid_post", outer)]
    with model.hooks(fwd=fwd):
        count_saved(True)
    # The block's own output hook ran once; the pattern hook ran again in the recomputation.
    assert calls == {"inner": [False, True], "outer": [False]}
    count_saved(False)
    assert saved[True] < 0.6 * saved[False], saved


def test_checkpointing_is_restored_after_an_exception():
    model = interp.tiny("llama")

    def broken(logits, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        interp.capture_grads(
            model, TEXTS, broken, "blocks.0.hook_resid_post", gradient_checkpointing=True
        )
    assert not any(forwards_patched(model))
    with pytest.raises(RuntimeError, match="inside"), checkpointing(model):
        assert all(forwards_patched(model))
        raise RuntimeError("inside")
    assert not any(forwards_patched(model))
    assert not is_recomputing()


def test_checkpointing_refuses_a_kv_cache():
    model = interp.tiny("llama")
    ids = torch.tensor([[5, 6, 7]])
    with checkpointing(model), pytest.raises(ValueError, match="use_cache=False"):
        model.model(input_ids=ids, use_cache=True)


def test_training_with_checkpointing_follows_the_same_trajectory():
    examples = [{"prompt": f"Q{i}?", "response": f"Answer {i}."} for i in range(4)]
    results, recomputed = {}, {}
    for ck in (False, True):
        model = interp.tiny("llama")
        seen: list[bool] = []
        attn = model.model.model.layers[0].self_attn
        handle = attn.register_forward_hook(lambda *a, seen=seen: seen.append(is_recomputing()))
        config = TrainConfig(max_steps=2, batch_size=2, dropout=0.1, gradient_checkpointing=ck)
        results[ck] = train(model, examples, SFTLoss(), config, progress=False)
        handle.remove()
        recomputed[ck] = sum(seen)
        assert not any(forwards_patched(results[ck].model))
    assert recomputed == {False: 0, True: 2}  # one recomputation per micro-batch
    plain, ck = results[False], results[True]
    assert ck.losses == pytest.approx(plain.losses, rel=1e-5)
    assert ck.grad_norms == pytest.approx(plain.grad_norms, rel=1e-4)
    assert TrainConfig().gradient_checkpointing is False


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_checkpointing_on_a_transformer_bridge():
    pytest.importorskip("transformer_lens.model_bridge")
    from transformer_lens.model_bridge import TransformerBridge

    hf_model, tok = tiny_hf("llama", seed=0)
    bridged = interp.load(
        TransformerBridge.boot_transformers("interp-test", hf_model=hf_model, tokenizer=tok)
    )
    names = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_pattern"]
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    plain = interp.capture_grads(bridged, ids, last_logsumexp, names)
    ck = interp.capture_grads(bridged, ids, last_logsumexp, names, gradient_checkpointing=True)
    for name in bridged.resolve(names):
        torch.testing.assert_close(ck.grads[name], plain.grads[name], rtol=1e-5, atol=1e-7)
    assert not any("forward" in b.__dict__ for b in blocks_of(bridged))

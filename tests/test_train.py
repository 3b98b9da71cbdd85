"""LoRA training on a tiny llama: losses go down, adapters round-trip, layers, resume."""

from __future__ import annotations

import itertools
import json
import math
import random
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from interp.families import tiny_hf
from interp.spans import LexiconCategory, LexiconDetector, find_response_spans, mark_biased
from interp.train import (
    RUN_FILE,
    STATE_FILE,
    KLSpanLoss,
    SFTLoss,
    TrainConfig,
    apply_lora,
    collate,
    cosine_with_warmup,
    encode_example,
    load_adapter,
    lora_target_names,
    prepare,
    resolve_model,
    save_adapter,
    train,
    weighted_sum,
)

pytestmark = pytest.mark.usefixtures("one_thread")


DETECTOR = LexiconDetector({"age": LexiconCategory(("older man",), ("forgetful",))})


def pair(i: int) -> dict:
    """A biased-reasoning / neutral-answer training pair, spans found by interp.spans."""
    response = f"<think>Case {i}. The older man is forgetful.</think> Answer: unknown"
    biased = next(m.sentence for m in mark_biased(response, DETECTOR) if m.detection.biased)
    answer = find_response_spans(response).answer
    return {
        "prompt": f"Q{i}?",
        "response": response,
        "span_s": (biased.start, biased.end),
        "span_o": tuple(answer),
    }


PAIRS = [pair(i) for i in range(4)]


def logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- config and data


def test_config_validation_lists_every_problem():
    with pytest.raises(ValueError, match=r"r must be ≥ 1.*dropout must be in \[0, 1\)"):
        TrainConfig(r=0, dropout=1.5)
    with pytest.raises(ValueError, match="lr must be"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="layers must be"):
        TrainConfig(layers=(1, 1))
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.0)
    cfg = TrainConfig(layers=(2,), target_modules=("q_proj",))
    assert cfg.as_dict()["layers"] == [2] and (cfg.r, cfg.alpha, cfg.lr) == (8, 16.0, 2e-4)


def test_encode_example_masks_response_and_spans():
    _, tok = tiny_hf("llama", seed=0)
    ex = PAIRS[0]
    enc = encode_example(tok, ex)
    ids = torch.tensor(enc["input_ids"])

    def text(key):
        return tok.decode(ids[torch.tensor(enc[key], dtype=torch.bool)])

    assert text("loss_mask") == ex["response"] + tok.eos_token
    assert text("span_s") == "The older man is forgetful."
    assert text("span_o") == "unknown"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Q0?"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(ids[: len(tok(prompt)["input_ids"])]) == prompt
    # A response that kept its stop token does not get a second one; spans may be lists.
    kept = encode_example(
        tok, {**ex, "response": ex["response"] + tok.eos_token, "span_s": [(7, 14), (19, 31)]}
    )
    assert kept["input_ids"] == enc["input_ids"]
    assert sum(kept["span_s"]) == len("Case 0.") + len("older man is")
    with pytest.raises(ValueError, match="outside the response"):
        encode_example(tok, {**ex, "span_s": (0, 999)})


def test_prepare_and_collate_pad_on_the_right():
    items = prepare(
        [
            {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
            {"input_ids": [8], "loss_mask": [True]},
        ]
    )
    batch = collate(items, pad_token_id=99)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 99, 99]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.masks["loss_mask"].tolist() == [[False, True, True], [True, False, False]]
    with pytest.raises(ValueError, match="2 entries for 3 tokens"):
        prepare([{"input_ids": [1, 2, 3], "loss_mask": [1, 1]}])
    with pytest.raises(ValueError, match="same fields"):
        prepare([{"input_ids": [1], "loss_mask": [1]}, {"input_ids": [1]}])
    with pytest.raises(ValueError, match="no tokenizer"):
        prepare([{"prompt": "a", "response": "b"}])


def test_cosine_schedule_warms_up_then_decays_to_min():
    f = cosine_with_warmup(total_steps=10, warmup_steps=2, min_ratio=0.1)
    values = [f(s) for s in range(10)]
    assert values[0] == pytest.approx(1 / 3) and values[1] == pytest.approx(2 / 3)
    assert values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[2:]))
    assert values[-1] > 0.1 and f(10) == pytest.approx(0.1)


# ---------------------------------------------------------------- LoRA placement


def test_lora_restricted_to_layers_creates_params_only_there():
    model, _ = tiny_hf("llama", seed=0)
    peft_model = apply_lora(model, TrainConfig(layers=(-1,)))  # the last of 3 layers
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all(".layers.2." in n and "lora_" in n for n in names)
    adapted = {n.split(".layers.2.")[1].split(".lora_")[0] for n in names}
    assert adapted == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    # Nothing else is trainable, and the base weights of layer 2 are frozen.
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    some = lora_target_names(tiny_hf("llama")[0], ("q_proj", "down_proj"), (0, 2))
    assert some == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
    ]


@pytest.mark.parametrize(
    ("family", "leaves"),
    [
        ("gpt2", {"c_attn", "c_proj", "c_fc"}),
        ("gpt_neox", {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    ],
)
def test_family_default_targets(family, leaves):
    model, _ = tiny_hf(family, seed=0)
    names = lora_target_names(model, layers=(1,))
    assert {n.rsplit(".", 1)[1] for n in names} == leaves
    assert all(".1." in n for n in names)
    apply_lora(model, TrainConfig(layers=(1,)))  # Conv1D (gpt2) must not warn


def test_bad_targets_and_layers_raise():
    model, _ = tiny_hf("llama", seed=0)
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no Linear.*q_proj"):
        lora_target_names(model, ("q_proj", "c_attn"))
    with pytest.raises(ValueError, match=r"layers \[3\] out of range"):
        lora_target_names(model, layers=(3,))
    with pytest.raises(TypeError, match="causal LM"):
        resolve_model(object())


# ---------------------------------------------------------------- training


def test_sft_loss_goes_down():
    model, tok = tiny_hf("llama", seed=0)
    batch = collate(prepare(PAIRS, tok), tok.pad_token_id)
    before = SFTLoss()(logits_of(model, batch), batch).item()
    cfg = TrainConfig(lr=1e-2, epochs=4, batch_size=2, warmup_ratio=0.0, dropout=0.0)
    result = train(model, PAIRS, SFTLoss(), cfg, tokenizer=tok, progress=False)
    after = SFTLoss()(logits_of(result.model, batch), batch).item()
    assert result.steps == 8 and len(result.losses) == 8
    assert after < before - 0.3, (before, after)
    assert sum(result.losses[-2:]) < sum(result.losses[:2])
    assert not result.model.training  # the caller's eval mode is restored


def test_kl_span_loss_goes_down_on_training_pairs():
    # A larger init scale gives peaked distributions, so the spans start far apart.
    model, tok = tiny_hf("llama", seed=0, initializer_range=0.2)
    batch = collate(prepare(PAIRS, tok), tok.pad_token_id)
    kl = KLSpanLoss()
    before = kl(logits_of(model, batch), batch).item()
    assert before > 0.05
    cfg = TrainConfig(lr=1e-2, epochs=3, batch_size=2, warmup_ratio=0.0, dropout=0.0)
    result = train(model, PAIRS, kl, cfg, tokenizer=tok, progress=False)
    after = kl(logits_of(result.model, batch), batch).item()
    assert after < 0.5 * before, (before, after)


def test_weighted_sum_is_the_weighted_sum_of_its_terms():
    model, tok = tiny_hf("llama", seed=0, initializer_range=0.2)
    batch = collate(prepare(PAIRS[:2], tok), tok.pad_token_id)
    logits = logits_of(model, batch)
    combo = weighted_sum((1.0, SFTLoss()), (0.25, KLSpanLoss(direction="reverse")))
    want = SFTLoss()(logits, batch) + 0.25 * KLSpanLoss(direction="reverse")(logits, batch)
    torch.testing.assert_close(combo(logits, batch), want)
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum()


def test_one_loss_serves_training_capture_grads_and_chat_batches():
    import interp
    from interp.chat import encode
    from interp.positions import Batch

    model = interp.tiny("llama", seed=0)
    tok = model.tokenizer
    batch = collate(prepare(PAIRS[:2], tok), tok.pad_token_id)
    assert isinstance(batch, Batch) and set(batch.masks) == {"loss_mask", "span_s", "span_o"}
    loss = weighted_sum((1.0, SFTLoss()), (0.5, KLSpanLoss()))
    logits = logits_of(model.model, batch)
    grads = interp.capture_grads(model, batch, loss, "blocks.*.hook_resid_post")
    torch.testing.assert_close(grads.loss, loss(logits, batch))
    assert grads.grads["blocks.0.hook_resid_post"].abs().sum() > 0
    # A dict with the same keys reads the same masks.
    as_dict = {"input_ids": batch.input_ids, **batch.masks}
    torch.testing.assert_close(loss(logits, as_dict), loss(logits, batch))

    # chat.encode's batches carry their own masks: the assistant tokens.
    conv = [
        {"role": "user", "content": "Q0?"},
        {"role": "assistant", "content": PAIRS[0]["response"]},
    ]
    enc = encode(tok, [conv])
    sft = SFTLoss(mask_key="assistant")
    chat_grads = interp.capture_grads(model, enc, sft, "blocks.1.hook_resid_post")
    assert torch.isfinite(chat_grads.loss) and chat_grads.loss > 0
    with pytest.raises(KeyError, match=r"no mask 'loss_mask'.*assistant"):
        SFTLoss()(model(enc), enc)


def test_adapter_round_trips_with_identical_logits(tmp_path):
    model, tok = tiny_hf("llama", seed=0)
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=2, warmup_ratio=0.0)
    trained = train(model, PAIRS, SFTLoss(), cfg, tokenizer=tok, progress=False).model
    batch = collate(prepare(PAIRS, tok), tok.pad_token_id)
    want = logits_of(trained, batch)
    save_adapter(trained, tmp_path / "adapter")
    save_adapter(trained, tmp_path / "adapter")  # overwriting is atomic too
    fresh, _ = tiny_hf("llama", seed=0)
    base_logits = logits_of(fresh, batch)
    loaded = load_adapter(SimpleNamespace(model=fresh), tmp_path / "adapter")
    assert torch.equal(logits_of(loaded, batch), want)
    assert not torch.allclose(base_logits, want)  # the adapter is not a no-op
    with pytest.raises(FileNotFoundError):
        load_adapter(tiny_hf("llama")[0], tmp_path / "missing")


def test_eval_callback_wrapper_and_rng_isolation():
    model, tok = tiny_hf("llama", seed=0)
    wrapper = SimpleNamespace(model=model, tokenizer=tok)  # like interp.tiny's HookedModel
    calls = []

    def evaluate(m, step):
        assert not m.training and not torch.is_grad_enabled()
        torch.rand(3)  # an eval that samples must not perturb training
        calls.append(step)
        return {"step_sq": step**2}

    cfg = TrainConfig(epochs=5, batch_size=4, eval_every=2, seed=3)
    rng_before = torch.get_rng_state()
    np_before = np.random.get_state()
    result = train(wrapper, PAIRS, SFTLoss(), cfg, eval_fn=evaluate, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG untouched
    # ... also numpy's, which transformers' Trainer seeds too. (Python's too, but the test
    # run's beartype draws from it to sample the lists it checks: see the next test.)
    np_after = np.random.get_state()
    assert np_after[1].tolist() == np_before[1].tolist() and np_after[2:] == np_before[2:]
    assert calls == [2, 4, 5] and result.evals[1] == (4, {"step_sq": 16.0})
    plain = train(tiny_hf("llama", seed=0)[0], PAIRS, SFTLoss(), cfg, tokenizer=tok, progress=False)
    assert result.losses == plain.losses


def test_forked_rngs_restore_what_the_trainer_seeds():
    from transformers import set_seed

    from interp.train.loop import _forked_rngs

    before = random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()
    with _forked_rngs():
        set_seed(3)  # what transformers.Trainer does: random, numpy, torch (and CUDA)
        random.random(), np.random.rand(), torch.rand(2)
    after = random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])


def test_train_keeps_the_callers_accelerate_state():
    # transformers' TrainingArguments reset accelerate's process-wide state; a caller's own
    # Accelerator (here with bf16 mixed precision) must find its state unchanged afterwards,
    # and a caller without one must not inherit the Trainer's.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    model, tok = tiny_hf("llama", seed=0)
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=2, dropout=0.0)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        Accelerator(cpu=True, mixed_precision="bf16")
        before = dict(AcceleratorState._shared_state), dict(PartialState._shared_state)
        assert AcceleratorState().mixed_precision == "bf16"
        train(model, PAIRS, SFTLoss(), cfg, tokenizer=tok, progress=False)
        assert AcceleratorState().mixed_precision == "bf16"
        assert (dict(AcceleratorState._shared_state), dict(PartialState._shared_state)) == before
        AcceleratorState._reset_state(reset_partial_state=True)
        train(tiny_hf("llama", seed=0)[0], PAIRS, SFTLoss(), cfg, tokenizer=tok, progress=False)
        assert not AcceleratorState._shared_state and not PartialState._shared_state
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_data_order_and_rng_draws_are_the_hand_written_loops():
    """Epoch e visits randperm(n) from Generator(seed + e); the global RNG, seeded with the
    seed, feeds the model alone (the data loader must not draw from it at each epoch)."""
    examples = [{"input_ids": [20 + i, 5, 6, 7], "loss_mask": [0, 1, 1, 1]} for i in range(5)]
    seen, states = [], []

    def loss(logits, batch):
        seen.append(int(batch.input_ids[0, 0]) - 20)
        states.append(torch.get_rng_state())
        return SFTLoss()(logits, batch)

    cfg = TrainConfig(batch_size=1, epochs=2, dropout=0.0, seed=4)
    train(tiny_hf("llama")[0], examples, loss, cfg, progress=False)
    want = [
        i for e in (0, 1) for i in torch.randperm(5, generator=torch.Generator().manual_seed(4 + e))
    ]
    assert seen == want
    seeded = torch.random.fork_rng(devices=[])
    with seeded:
        torch.manual_seed(4)
        expected = torch.get_rng_state()
    assert all(torch.equal(s, expected) for s in states)  # nothing drew: dropout is off


class Interrupted(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    _, tok = tiny_hf("llama", seed=0)
    examples = PAIRS + [pair(i) for i in range(4, 6)]
    # 6 examples, micro-batches of 2, 2 per step -> 2 steps/epoch (the 2nd short), 4 steps.
    cfg = TrainConfig(
        lr=5e-3,
        epochs=2,
        batch_size=2,
        grad_accum_steps=2,
        dropout=0.1,
        warmup_ratio=0.25,
        save_every=1,
    )
    full = train(tiny_hf("llama")[0], examples, SFTLoss(), cfg, tokenizer=tok, progress=False)
    assert full.steps == 4

    calls = 0

    def flaky(logits, batch):
        nonlocal calls
        calls += 1
        if calls == 5:  # step 3, after its first micro-batch's backward
            raise Interrupted
        return SFTLoss()(logits, batch)

    with pytest.raises(Interrupted):
        train(
            tiny_hf("llama")[0],
            examples,
            flaky,
            cfg,
            tokenizer=tok,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    # The newest complete checkpoint only (checkpoint-1 was deleted once checkpoint-2 was
    # complete), its state file written last; no temp files left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", RUN_FILE]
    state = json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text())
    assert state["step"] == 2 and state["losses"] == list(full.losses[:2])
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]

    resumed = train(
        tiny_hf("llama")[0],
        examples,
        SFTLoss(),
        cfg,
        tokenizer=tok,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert resumed.resumed_from == 2 and resumed.steps == 4
    assert resumed.losses == full.losses
    want, got = trainable(full.model), trainable(resumed.model)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)

    # Training further from a finished checkpoint is a no-op; another config is refused.
    again = train(
        tiny_hf("llama")[0],
        examples,
        SFTLoss(),
        cfg,
        tokenizer=tok,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert again.resumed_from == 4 and all(
        torch.equal(want[k], v) for k, v in trainable(again.model).items()
    )
    with pytest.raises(ValueError, match=r"different run.*lr"):
        train(
            tiny_hf("llama")[0],
            examples,
            SFTLoss(),
            TrainConfig(**{**cfg.as_dict(), "lr": 1e-3}),
            tokenizer=tok,
            checkpoint_dir=tmp_path,
            progress=False,
        )


def test_a_save_cut_short_is_never_resumed_from(tmp_path, monkeypatch):
    """A kill inside the Trainer's save (adapter written, optimizer not) leaves a folder
    that transformers' get_last_checkpoint picks, and the Trainer would resume from it
    without the optimizer state; train resumes from the last complete checkpoint, here
    mid-epoch (shuffled, dropout on), and deletes the partial one."""
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    _, tok = tiny_hf("llama", seed=0)
    # One example per step: 4 steps in the one epoch, checkpoints after steps 2 and 4.
    cfg = TrainConfig(lr=5e-3, batch_size=1, dropout=0.1, warmup_ratio=0.25, save_every=2)
    full = train(tiny_hf("llama")[0], PAIRS, SFTLoss(), cfg, tokenizer=tok, progress=False)
    save = Trainer._save_optimizer_and_scheduler

    def killed(self, output_dir):
        if self.state.global_step == 4:
            raise Interrupted
        return save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", killed)
    with pytest.raises(Interrupted):
        train(
            tiny_hf("llama")[0],
            PAIRS,
            SFTLoss(),
            cfg,
            tokenizer=tok,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    monkeypatch.undo()
    partial = tmp_path / "checkpoint-4"
    assert get_last_checkpoint(str(tmp_path)) == str(partial)
    assert not (partial / STATE_FILE).exists() and not (partial / "optimizer.pt").exists()

    again = dict(tokenizer=tok, checkpoint_dir=tmp_path, progress=False)
    resumed = train(tiny_hf("llama")[0], PAIRS, SFTLoss(), cfg, **again)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    assert resumed.losses == full.losses and resumed.grad_norms == full.grad_norms
    want, got = trainable(full.model), trainable(resumed.model)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", RUN_FILE]
    assert (partial / STATE_FILE).is_file()  # rewritten complete


def test_checkpoints_train_did_not_write_are_refused(tmp_path):
    _, tok = tiny_hf("llama", seed=0)
    (tmp_path / "trainer" / "checkpoint-3").mkdir(parents=True)  # e.g. train_trainer's
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint.pt").write_bytes(b"")  # the earlier loop's one file
    for name in ("trainer", "old"):
        with pytest.raises(ValueError, match="did not write"):
            where = dict(checkpoint_dir=tmp_path / name, progress=False)
            train(tiny_hf("llama")[0], PAIRS, SFTLoss(), TrainConfig(), tokenizer=tok, **where)
    assert sorted(p.name for p in (tmp_path / "trainer").iterdir()) == ["checkpoint-3"]


def test_without_checkpoint_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    _, tok = tiny_hf("llama", seed=0)
    cfg = TrainConfig(max_steps=2, batch_size=2, save_every=1)
    result = train(tiny_hf("llama")[0], PAIRS, SFTLoss(), cfg, tokenizer=tok, progress=False)
    assert result.steps == 2
    assert [p.name for p in tmp_path.rglob("*")] == ["tmp"]


def test_the_model_is_trained_where_it_is(tmp_path, monkeypatch):
    from interp.train.trainer import in_place_arguments

    kw = dict(output_dir=str(tmp_path), report_to="none")
    cpu = in_place_arguments(kw, {"cpu"}, None)  # also on a CUDA machine
    assert cpu.use_cpu and cpu.device == torch.device("cpu") and cpu.n_gpu == 0
    assert cpu.place_model_on_device is False
    with pytest.raises(ValueError, match=r"where it is, on cuda:1.*would move it"):
        in_place_arguments(kw, {"cuda:1"}, None)
    offloaded = {"model.embed_tokens": "cpu", "model.layers": "disk", "lm_head": "cpu"}
    disk = in_place_arguments(kw, {"cpu", "meta"}, offloaded)
    assert disk.use_cpu and disk.place_model_on_device is False
    mixed = in_place_arguments(kw, {"cuda:0", "cpu"}, {"model.layers": 0, "lm_head": "cpu"})
    assert not mixed.use_cpu and mixed.n_gpu <= 1 and mixed.place_model_on_device is False
    with pytest.raises(ValueError, match="without an accelerate device map"):
        in_place_arguments(kw, {"cpu", "cuda:0"}, None)

    # A dispatched model (here a CPU one that claims a device map) is never moved.
    model, tok = tiny_hf("llama", seed=0)
    model.hf_device_map = offloaded
    cfg = TrainConfig(max_steps=1, batch_size=2)
    peft_model = apply_lora(model, cfg)

    def no_move(self, *args, **kwargs):
        raise AssertionError(f"moved {type(self).__name__} to {args} {kwargs}")

    monkeypatch.setattr(torch.nn.Module, "to", no_move)
    assert train(peft_model, PAIRS, SFTLoss(), cfg, tokenizer=tok, progress=False).steps == 1
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="train_trainer"):
        train(tiny_hf("llama")[0], PAIRS, SFTLoss(), cfg, tokenizer=tok, progress=False)


def test_non_scalar_or_non_finite_losses_are_rejected():
    model, tok = tiny_hf("llama", seed=0)
    cfg = TrainConfig(batch_size=4)
    with pytest.raises(ValueError, match="scalar"):
        train(
            model, PAIRS, lambda logits, batch: logits.mean(-1), cfg, tokenizer=tok, progress=False
        )
    model, _ = tiny_hf("llama", seed=0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(model, PAIRS, lambda lg, b: lg.sum() * math.inf, cfg, tokenizer=tok, progress=False)


def test_gradient_accumulation_matches_the_full_batch():
    # Equal-length examples, so the token mean of the full batch is the mean of
    # the micro-batch means; dropout off so both runs see the same function.
    _, tok = tiny_hf("llama", seed=0)
    common = dict(lr=5e-3, epochs=2, dropout=0.0, shuffle=False, warmup_ratio=0.0)
    full = train(
        tiny_hf("llama")[0],
        PAIRS,
        SFTLoss(),
        TrainConfig(batch_size=4, **common),
        tokenizer=tok,
        progress=False,
    )
    accum = train(
        tiny_hf("llama")[0],
        PAIRS,
        SFTLoss(),
        TrainConfig(batch_size=2, grad_accum_steps=2, **common),
        tokenizer=tok,
        progress=False,
    )
    assert full.steps == accum.steps == 2
    torch.testing.assert_close(torch.tensor(accum.grad_norms), torch.tensor(full.grad_norms))
    torch.testing.assert_close(torch.tensor(accum.losses), torch.tensor(full.losses))
    a, b = trainable(full.model), trainable(accum.model)
    # Adam divides by sqrt(v): summation-order noise in near-zero gradients (lora_A
    # starts with exactly zero gradient) becomes ~1e-6 in the weights, vs. steps of 5e-3.
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


def test_max_steps_stops_mid_epoch_like_a_shorter_dataset():
    # Unshuffled, one example per step: 3 steps of 4 examples x 2 epochs are exactly one
    # epoch over the first 3 examples (same batches, same 3-step schedule).
    _, tok = tiny_hf("llama", seed=0)
    common = dict(lr=5e-3, batch_size=1, dropout=0.0, shuffle=False, warmup_ratio=0.3)
    capped = train(
        tiny_hf("llama")[0],
        PAIRS,
        SFTLoss(),
        TrainConfig(epochs=2, max_steps=3, **common),
        tokenizer=tok,
        progress=False,
    )
    short = train(
        tiny_hf("llama")[0],
        PAIRS[:3],
        SFTLoss(),
        TrainConfig(**common),
        tokenizer=tok,
        progress=False,
    )
    assert capped.steps == short.steps == 3
    torch.testing.assert_close(torch.tensor(capped.losses), torch.tensor(short.losses))
    a, b = trainable(capped.model), trainable(short.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)

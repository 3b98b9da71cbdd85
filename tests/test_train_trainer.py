"""``interp.train.trainer``: the library's losses on ``transformers.Trainer``. One process takes
the same steps as ``interp.train.train`` (the same engine behind a one-process front end); an
interrupted run resumes to the uninterrupted weights; two ``torchrun`` processes (gloo) train
the KL span loss to the one-process weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from interp.families import tiny_hf
from interp.train import KLSpanLoss, SFTLoss, TrainConfig, train
from interp.train.trainer import train_trainer, training_arguments

pytestmark = pytest.mark.usefixtures("one_thread")


def pairs(n: int = 8) -> list[dict]:
    """Token-level KL-span examples: span_s (a 'reasoning' span) and span_o (the answer)."""
    out = []
    for i in range(n):
        ids = [(7 * i + 3 * t) % 200 + 20 for t in range(12 + i % 3)]
        k = len(ids)
        out.append(
            {
                "input_ids": ids,
                "loss_mask": [0] * 4 + [1] * (k - 4),
                "span_s": [0] * 4 + [1] * 4 + [0] * (k - 8),
                "span_o": [0] * (k - 3) + [1] * 3,
            }
        )
    return out


CONFIG = dict(r=4, alpha=8.0, dropout=0.0, lr=5e-3, warmup_ratio=0.25, batch_size=4, seed=0)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=n)


@pytest.mark.parametrize(
    "loss, accum",
    [(SFTLoss(), 1), (KLSpanLoss(), 1), (KLSpanLoss(), 2)],
    ids=["sft", "kl_span", "kl_span-accum2"],
)
def test_one_process_equals_train(tmp_path, loss, accum):
    config = TrainConfig(
        **dict(CONFIG, batch_size=4 // accum), epochs=2, shuffle=False, grad_accum_steps=accum
    )
    m1, tok = tiny_hf("llama")
    ref = train(m1, pairs(), loss, config, tokenizer=tok, progress=False)
    m2, _ = tiny_hf("llama")
    got = train_trainer(
        m2, pairs(), loss, config, tokenizer=tok, output_dir=tmp_path / "t", progress=False
    )
    assert got.steps == ref.steps == 4
    close(weights(got.model), weights(ref.model))
    assert got.losses == pytest.approx(ref.losses, rel=1e-5)
    init = weights(tiny_lora())
    assert any(not torch.equal(init[n], w) for n, w in weights(got.model).items())  # it trained


def tiny_lora():
    from interp.train import apply_lora

    m, _ = tiny_hf("llama")
    return apply_lora(m, TrainConfig(**CONFIG))


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    from transformers import TrainerCallback

    config = TrainConfig(**CONFIG, epochs=3, max_steps=6, save_every=2)
    m, tok = tiny_hf("llama")
    whole = train_trainer(
        m, pairs(), KLSpanLoss(), config, tokenizer=tok, output_dir=tmp_path / "a", progress=False
    )

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:  # after checkpoint-4 was written
                raise KeyboardInterrupt("simulated kill")

    out = tmp_path / "b"
    m, _ = tiny_hf("llama")
    with pytest.raises(KeyboardInterrupt):
        train_trainer(
            m,
            pairs(),
            KLSpanLoss(),
            config,
            tokenizer=tok,
            output_dir=out,
            progress=False,
            callbacks=[Kill()],
        )
    assert (out / "checkpoint-4").is_dir()
    m, _ = tiny_hf("llama")
    resumed = train_trainer(
        m, pairs(), KLSpanLoss(), config, tokenizer=tok, output_dir=out, progress=False
    )
    assert resumed.resumed_from == 4 and resumed.steps == 6
    close(weights(resumed.model), weights(whole.model))


def test_arguments_refuse_double_settings(tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        training_arguments(TrainConfig(), tmp_path, 8, learning_rate=1.0)
    args = training_arguments(TrainConfig(max_grad_norm=None), tmp_path, 8, report_to="none")
    assert args.max_grad_norm == 0.0 and args.remove_unused_columns is False
    # max_steps caps the epochs, as in interp.train.train: 8 examples, batch 4, one epoch.
    capped = training_arguments(TrainConfig(epochs=1, max_steps=50), tmp_path, 8)
    assert capped.max_steps == 2


def test_last_checkpoint_skips_a_save_cut_short(tmp_path):
    from interp.train.trainer import _last_checkpoint

    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    # transformers' get_last_checkpoint would take checkpoint-6 (its save never got to the
    # state, written last) or checkpoint-4 (state cut short).
    assert _last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from interp.families import tiny_hf
    from interp.train import KLSpanLoss, TrainConfig
    from interp.train.trainer import train_trainer

    examples, config, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    model, tok = tiny_hf("llama")
    result = train_trainer(model, examples, KLSpanLoss(), TrainConfig(**config), tokenizer=tok,
                           output_dir=out, progress=False)
    assert result.trainer.args.parallel_mode.value == "distributed"
    if result.trainer.args.process_index == 0:
        torch.save({n: p.detach() for n, p in result.model.named_parameters() if "lora_" in n},
                   out + "/weights.pt")
    # After a barrier, leave without tearing gloo down: a rank exiting through destructors
    # while its peer still closes the group can abort ("terminate called without an active
    # exception"; seen under load).
    import os
    import torch.distributed as dist
    sys.stdout.flush()
    dist.barrier()
    os._exit(0)
    """
)


def test_torchrun_two_processes_equal_one(tmp_path):
    """Per-device batch 2 on two processes = batch 4 on one: the same global batches (the
    accelerate-sharded sampler hands each rank half of each one) and the same mean loss."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    one = dict(CONFIG, epochs=2, shuffle=False)
    m, tok = tiny_hf("llama")
    ref = train_trainer(
        m,
        pairs(),
        KLSpanLoss(),
        TrainConfig(**one),
        tokenizer=tok,
        output_dir=tmp_path / "one",
        progress=False,
    )
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            json.dumps(pairs()),
            json.dumps(dict(one, batch_size=2)),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(out / "weights.pt")
    close(two, weights(ref.model))

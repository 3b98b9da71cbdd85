"""Gradient capture cost: ``interp.capture_grads`` at one position for every layer vs a plain
forward+backward of the same batch on the embedded model.

Two baselines, both measured in the same interleaved rounds:
* ``forward+backward``: ``loss.backward()`` with trainable weights (the usual training step);
* ``forward+backward (activations only)``: ``torch.autograd.grad`` w.r.t. the embedding output
  with frozen weights — the least work any activation-gradient method can do.

    python benchmarks/grad_capture.py [--device cpu] [--batch 4] [--tokens 64] [--rounds 10]
        [--quick] [--model NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import harness

import interp

TARGET = 1.10


def lm_loss(logits, batch):
    ids = batch.input_ids
    return (
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        .view(ids.shape[0], -1)
        .mean(1)
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="3 rounds")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 3)
    machine = harness.machine_info()
    model = harness.load_model(args.model, device=args.device)
    hf = model.model
    ids = torch.randint(
        0, model.cfg.d_vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)
    ).to(args.device)
    batch = interp.positions.as_batch(model, ids)

    def set_trainable(flag: bool):
        for prm in hf.parameters():
            prm.requires_grad_(flag)

    def fwd_bwd():
        set_trainable(True)
        hf.zero_grad(set_to_none=True)
        lm_loss(hf(input_ids=ids, use_cache=False).logits, batch).sum().backward()

    def fwd_bwd_activations():
        set_trainable(False)
        emb = hf.get_input_embeddings()(ids).requires_grad_()
        loss = lm_loss(hf(inputs_embeds=emb, use_cache=False).logits, batch).sum()
        torch.autograd.grad(loss, emb)

    def interp_grads():
        set_trainable(False)
        interp.capture_grads(model, batch, lm_loss, "blocks.*.hook_resid_post", positions=-1)

    variants = {
        "forward+backward": fwd_bwd,
        "forward+backward (activations only)": fwd_bwd_activations,
        "interp capture_grads (1 position, all layers)": interp_grads,
    }
    sync = harness.sync_for(args.device)
    print(
        f"{args.batch}x{args.tokens}: {len(variants)} variants × {args.rounds} rounds …", flush=True
    )
    res = harness.interleaved(variants, "forward+backward", rounds=args.rounds, warmup=2, sync=sync)
    vs_act = harness.interleaved(
        {k: variants[k] for k in list(variants)[1:]},
        "forward+backward (activations only)",
        rounds=args.rounds,
        warmup=1,
        sync=sync,
    )
    set_trainable(True)
    hf.zero_grad(set_to_none=True)
    key = "interp capture_grads (1 position, all layers)"
    rows = [[k, f"{r['median_s'] * 1e3:.0f} ms", harness.fmt_ratio(r)] for k, r in res.items()]
    rows.append([key + " vs activations-only", "", harness.fmt_ratio(vs_act[key])])
    header = ["variant", "median", "ratio to forward+backward [bootstrap 95% CI] (min–max)"]
    ok = res[key]["ratio"] <= TARGET
    verdict = (
        f"target capture_grads ≤ {TARGET}× forward+backward: {harness.judge(res[key], TARGET)}"
    )
    harness.finish(machine)
    payload = {
        "benchmark": "grad_capture",
        "machine": machine,
        "device": args.device,
        "model": args.model,
        "size": f"{args.batch}x{args.tokens}",
        "vs_forward_backward": res,
        "vs_activations_only": vs_act,
        "target": {"max_ratio": TARGET, "judged_on": "median per-round ratio", "met": ok},
    }
    harness.publish(
        "grad_capture",
        payload,
        rows,
        header,
        [verdict, harness.load_line(machine)],
        intro=f"{args.batch}×{args.tokens} tokens, {args.rounds} interleaved rounds.",
        out=args.out,
    )
    return payload


if __name__ == "__main__":
    main()

"""Gradient capture cost: ``interp.capture_grads`` at one position for every layer vs a plain
forward+backward of the same batch on the embedded model.

Two baselines, both measured in the same interleaved rounds:
* ``forward+backward``: ``loss.backward()`` with trainable weights (the usual training step);
* ``forward+backward (activations only)``: ``torch.autograd.grad`` w.r.t. the embedding output
  with frozen weights — the least work any activation-gradient method can do.

    python benchmarks/grad_capture.py [--device cpu] [--batch 4] [--tokens 64] [--rounds 10]
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
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model = interp.load("smollm2-135m-instruct", device=args.device)
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
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
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
    print(harness.table(rows, ["variant", "median", "ratio to forward+backward (min–max)"]))
    ok = res[key]["ratio"] <= TARGET
    print(f"target capture_grads ≤ {TARGET}× forward+backward: {'met' if ok else 'MISSED'}")
    payload = {
        "machine": harness.machine_info(),
        "device": args.device,
        "size": f"{args.batch}x{args.tokens}",
        "vs_forward_backward": res,
        "vs_activations_only": vs_act,
        "target": {"max_ratio": TARGET, "met": ok},
    }
    print(f"wrote {harness.write('grad_capture', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()

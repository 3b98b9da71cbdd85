"""Router tracing on the embedded MoE (``interp.load("smollm2-135m-moe")``, the MoEfied
SmolLM2-135M): ``interp.moe.trace`` over all MoE layers (top-k ids, gate weights and, by
default, router logits, copied to CPU at reduced precision) vs a bare forward of the same
batch through the same entry point (``model.forward``), both under ``torch.no_grad``.

Also: ``interp.moe.steer`` with empty sets (registers no hook: should cost nothing) and
with one expert deactivated at every MoE layer (a logits replacement + re-selection per
layer), each around the same forward.

    python benchmarks/router_tracing.py [--device cpu] [--sizes 1x64,4x128] [--rounds 40]
        [--rounds-large 12] [--quick] [--model NAME] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness

import interp
import interp.moe

TARGET = 1.05
TRACE = "moe.trace (all MoE layers, with logits)"


def build_variants(model, ids, mask):
    batch = {"input_ids": ids, "attention_mask": mask}
    off = [(layer, 0) for layer in model.cfg.moe_layers]

    def bare():
        return model.forward(ids, mask)

    def trace_logits():
        return interp.moe.trace(model, batch)

    def trace_no_logits():
        return interp.moe.trace(model, batch, logits=False)

    def steer_empty():
        with interp.moe.steer(model):
            return model.forward(ids, mask)

    def steer_off():
        with interp.moe.steer(model, deactivate=off):
            return model.forward(ids, mask)

    return {
        "bare forward": bare,
        TRACE: trace_logits,
        "moe.trace (all MoE layers, no logits)": trace_no_logits,
        "moe.steer() with empty sets": steer_empty,
        f"moe.steer(deactivate expert 0 at all {len(off)} MoE layers)": steer_off,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m-moe")
    p.add_argument("--sizes", default="1x64,4x128")
    p.add_argument("--rounds", type=int, default=40, help="rounds at ≤256 tokens")
    p.add_argument("--rounds-large", type=int, default=12, help="rounds above 256 tokens")
    p.add_argument("--quick", action="store_true", help="8 / 3 rounds")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.rounds_large = min(args.rounds, 8), min(args.rounds_large, 3)
    machine = harness.machine_info()
    model = harness.load_model(args.model, device=args.device)
    cfg = model.cfg
    results: dict = {
        "benchmark": "router_tracing",
        "machine": machine,
        "device": args.device,
        "model": args.model,
        "moe": {
            "moe_layers": len(cfg.moe_layers),
            "n_experts": int(cfg.n_experts),
            "top_k": int(cfg.experts_per_token),
        },
        "sizes": {},
    }
    rows = []
    for size in args.sizes.split(","):
        b, t = (int(x) for x in size.split("x"))
        ids = torch.randint(0, cfg.d_vocab, (b, t), generator=torch.Generator().manual_seed(0))
        ids, mask = ids.to(args.device), torch.ones_like(ids, device=args.device)
        variants = build_variants(model, ids, mask)
        rounds = args.rounds if b * t <= 256 else args.rounds_large
        print(f"{size}: {len(variants)} variants × {rounds} interleaved rounds …", flush=True)
        with torch.no_grad():
            res = harness.interleaved(
                variants, "bare forward", rounds=rounds, sync=harness.sync_for(args.device)
            )
            tr = interp.moe.trace(model, {"input_ids": ids, "attention_mask": mask})
        stored = sum(
            x.numel() * x.element_size()
            for x in (tr.indices, tr.weights, tr.logits, tr.lengths, tr.positions)
            if x is not None
        )
        res["_trace"] = {"tokens": tr.n_tokens, "stored_bytes": stored}
        results["sizes"][size] = res
        for name, r in res.items():
            if not name.startswith("_"):
                rows.append([size, name, f"{r['median_s'] * 1e3:.1f} ms", harness.fmt_ratio(r)])
    verdicts = {s: harness.judge(r[TRACE], TARGET) for s, r in results["sizes"].items()}
    ok = all(r[TRACE]["ratio"] <= TARGET for r in results["sizes"].values())
    results["target"] = {
        "trace_max_ratio": TARGET,
        "judged_on": "median per-round ratio",
        "met": ok,
        "verdicts": verdicts,
    }
    harness.finish(machine)
    header = ["batch×tokens", "variant", "median", harness.RATIO_HEADER]
    m = results["moe"]
    notes = [
        f"Model `{args.model}`: {m['moe_layers']} MoE layers, top-{m['top_k']} of "
        f"{m['n_experts']} experts.",
        "\n".join(
            [
                f"- {s}: trace stores {r['_trace']['stored_bytes']:,} bytes for "
                f"{r['_trace']['tokens']} tokens"
                for s, r in results["sizes"].items()
            ]
            + [f"- target moe.trace ≤ {TARGET}× at {s}: {v}" for s, v in verdicts.items()]
        ),
        harness.load_line(machine),
    ]
    harness.publish(
        "router_tracing", results, rows, header, notes[1:], intro=notes[0], out=args.out
    )
    return results


if __name__ == "__main__":
    main()

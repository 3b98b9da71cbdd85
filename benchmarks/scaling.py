"""How capture cost grows with sequence length and batch: bare forward vs ``interp.capture``
of ``hook_resid_post`` at every layer (all positions, and one position) on the embedded
model, at several batch × tokens sizes. Per size: median times, median per-round ratio to
the bare forward with a bootstrap 95% interval, and the median per-round extra time.

    python benchmarks/scaling.py [--device cpu] [--sizes 1x16,1x64,1x256,4x64]
        [--rounds 60,40,15,15] [--quick] [--model NAME] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness

import interp

NAMES = "blocks.*.hook_resid_post"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--sizes", default="1x16,1x64,1x256,4x64")
    p.add_argument("--rounds", default="60,40,15,15", help="one per size, or one for all")
    p.add_argument("--quick", action="store_true", help="6 rounds per size")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sizes = args.sizes.split(",")
    rounds = [int(r) for r in args.rounds.split(",")]
    rounds = rounds * len(sizes) if len(rounds) == 1 else rounds
    if len(rounds) != len(sizes):
        p.error(f"{len(sizes)} sizes but {len(rounds)} round counts")
    if args.quick:
        rounds = [min(r, 6) for r in rounds]
    machine = harness.machine_info()
    model = harness.load_model(args.model, device=args.device)
    results: dict = {
        "benchmark": "scaling",
        "machine": machine,
        "device": args.device,
        "model": args.model,
        "sizes": {},
    }
    rows = []
    for size, n_rounds in zip(sizes, rounds, strict=True):
        b, t = (int(x) for x in size.split("x"))
        ids = torch.randint(
            0, model.cfg.d_vocab, (b, t), generator=torch.Generator().manual_seed(0)
        ).to(args.device)
        mask = torch.ones_like(ids)
        batch = {"input_ids": ids, "attention_mask": mask}
        variants = {
            "bare forward": lambda ids=ids, mask=mask: model.forward(ids, mask),
            "capture all positions": lambda batch=batch: interp.capture(model, batch, NAMES),
            "capture one position": lambda batch=batch: interp.capture(
                model, batch, NAMES, positions=-1
            ),
        }
        print(f"{size}: {len(variants)} variants × {n_rounds} interleaved rounds …", flush=True)
        with torch.no_grad():
            res = harness.interleaved(
                variants, "bare forward", rounds=n_rounds, sync=harness.sync_for(args.device)
            )
        results["sizes"][size] = res
        bare_ms = res["bare forward"]["median_s"] * 1e3
        for name in ("capture all positions", "capture one position"):
            r = res[name]
            rows.append(
                [
                    size,
                    b * t,
                    f"{bare_ms:.1f} ms",
                    name,
                    f"{r['median_s'] * 1e3:.1f} ms",
                    f"{r['delta_s'] * 1e3:+.2f} ms",
                    harness.fmt_ratio(r),
                    n_rounds,
                ]
            )
    harness.finish(machine)
    header = [
        "batch×tokens",
        "tokens",
        "bare forward",
        "variant",
        "median",
        "median extra per round",
        harness.RATIO_HEADER,
        "rounds",
    ]
    notes = [
        f"Model `{args.model}`, `{NAMES}` at every layer, interleaved with a bare forward.",
        harness.load_line(machine),
    ]
    harness.publish("scaling", results, rows, header, notes[1:], intro=notes[0], out=args.out)
    return results


if __name__ == "__main__":
    main()

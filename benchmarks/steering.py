"""Steering during generation: ``add_direction`` at one layer inside ``model.hooks`` around
``model.generate`` vs a bare ``generate`` on the embedded model — greedy, same prompt, the
same fixed number of new tokens (``min_new_tokens = max_new_tokens``, so EOS cannot end
either run early).

The direction is a difference of mean activations of two prompts at the steered layer (as
in ``examples/demo.py``); the suite also checks that the steered continuation differs from
the bare one, i.e. that the hook really acted at every step. An extra variant steers at
every layer at once.

    python benchmarks/steering.py [--device cpu] [--rounds 30] [--new-tokens 24]
        [--quick] [--model NAME] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness

import interp
from interp.interventions import add_direction

PROMPT = "Give me one tip for a rainy day."
CONTRAST = ["I love weddings, brides and grooms.", "I like the weather today."]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--scale", type=float, default=4.0)
    p.add_argument("--quick", action="store_true", help="5 rounds")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 5)
    torch.manual_seed(0)
    machine = harness.machine_info()
    model = harness.load_model(args.model, device=args.device)
    layer = model.cfg.n_layers // 3
    name = f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        cache = interp.capture(model, CONTRAST, "blocks.*.hook_resid_post")
    mask = interp.positions.as_batch(model, CONTRAST).attention_mask.to(model.device)
    all_layers = {}
    for n, a in cache.items():
        means = (a * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        all_layers[n] = (means[0] - means[1]).detach()
    v = all_layers[name]
    batch = interp.positions.as_batch(model, PROMPT)
    gen = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
    }
    one_hook = [(name, add_direction(v, scale=args.scale))]
    every_hook = [(n, add_direction(u, scale=args.scale)) for n, u in all_layers.items()]

    def bare():
        return model.generate(batch, **gen)

    def steered():
        with model.hooks(fwd=one_hook):
            return model.generate(batch, **gen)

    def steered_all():
        with model.hooks(fwd=every_hook):
            return model.generate(batch, **gen)

    variants = {
        "bare generate": bare,
        f"steered generate (add_direction at layer {layer})": steered,
        f"steered generate (add_direction at all {model.cfg.n_layers} layers)": steered_all,
    }
    n_prompt = batch.input_ids.shape[1]
    with torch.no_grad():
        out_bare, out_steer = bare(), steered()
    new_bare, new_steer = out_bare[0, n_prompt:], out_steer[0, n_prompt:]
    differ = (new_bare != new_steer).nonzero()
    check = {
        "new_tokens_bare": int(new_bare.numel()),
        "new_tokens_steered": int(new_steer.numel()),
        "steered_differs": bool(differ.numel()),
        "first_differing_new_token": int(differ[0, 0]) if differ.numel() else None,
        "bare_text": model.tokenizer.decode(new_bare, skip_special_tokens=True),
        "steered_text": model.tokenizer.decode(new_steer, skip_special_tokens=True),
    }
    print(
        f"prompt {n_prompt} tokens + {args.new_tokens} new; {len(variants)} variants × "
        f"{args.rounds} interleaved rounds …",
        flush=True,
    )
    with torch.no_grad():
        res = harness.interleaved(
            variants,
            "bare generate",
            rounds=args.rounds,
            warmup=2,
            sync=harness.sync_for(args.device),
        )
    harness.finish(machine)
    rows = [
        [k, f"{r['median_s'] * 1e3:.0f} ms", f"{r['delta_s'] * 1e3:+.1f} ms", harness.fmt_ratio(r)]
        for k, r in res.items()
    ]
    header = ["variant", "median", "median per-round difference", harness.RATIO_HEADER]
    notes = [
        f"Greedy, prompt of {n_prompt} tokens, {args.new_tokens} new tokens (fixed), "
        f"scale {args.scale}, {args.rounds} interleaved rounds, model `{args.model}`.",
        f"Steering took effect: {check['steered_differs']} (first differing new token: "
        f"{check['first_differing_new_token']}; bare: {check['bare_text']!r}; steered: "
        f"{check['steered_text']!r}).",
        harness.load_line(machine),
    ]
    payload = {
        "benchmark": "steering",
        "machine": machine,
        "device": args.device,
        "model": args.model,
        "layer": layer,
        "prompt_tokens": n_prompt,
        "new_tokens": args.new_tokens,
        "check": check,
        "results": res,
    }
    harness.publish("steering", payload, rows, header, notes[1:], intro=notes[0], out=args.out)
    return payload


if __name__ == "__main__":
    main()

"""A short tour of interp on the embedded SmolLM2-135M-Instruct (runs offline on a CPU).

    python examples/demo.py [--device cpu]

1. capture the residual stream at every layer at one named chat position;
2. steer a generation by adding a direction at one layer;
3. capture gradients of a loss with respect to the residual stream.
"""

from __future__ import annotations

import argparse
import time

import torch

import interp
from interp.chat import encode
from interp.interventions import add_direction


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model = interp.load(args.model, device=args.device)
    print(f"loaded {model} in {time.perf_counter() - t0:.1f}s")

    # 1. Capture: one vector per layer at the token before the assistant's answer.
    chat = [{"role": "user", "content": "Give me one tip for a rainy day."}]
    batch = encode(model.tokenizer, chat, padding_side="left")
    print(
        f"\n[capture] pre_assistant is token {int(batch.positions['pre_assistant'][0])} of {batch.input_ids.shape[1]}"
    )
    cache = interp.capture(model, batch, "blocks.*.hook_resid_post", positions="pre_assistant")
    stack = cache.stack()
    print(f"[capture] {len(cache)} hooks -> stacked {tuple(stack.shape)} (layers, batch, d_model)")
    print(
        "[capture] residual norm by layer:",
        " ".join(f"{x:.0f}" for x in stack[:, 0].norm(dim=-1)[::3].tolist()),
        "(every 3rd layer)",
    )

    # 2. Steering: a "weddings" direction from the difference of two prompts' activations.
    layer = model.cfg.n_layers // 3
    name = f"blocks.{layer}.hook_resid_post"
    acts = interp.capture(
        model, ["I love weddings, brides and grooms.", "I like the weather today."], name
    )
    mean = lambda t: t.mean(1)  # noqa: E731
    v = mean(acts[name])[0] - mean(acts[name])[1]
    plain = model.generate(batch, max_new_tokens=30, do_sample=False)
    with model.hooks(fwd=[(name, add_direction(v, scale=1.0))]):
        steered = model.generate(batch, max_new_tokens=30, do_sample=False)
    n = batch.input_ids.shape[1]
    print(f"\n[steer] plain  : {model.tokenizer.decode(plain[0, n:], skip_special_tokens=True)!r}")
    print(
        f"[steer] +v@{layer} : {model.tokenizer.decode(steered[0, n:], skip_special_tokens=True)!r}"
    )

    # 3. Gradients of the answer's loss w.r.t. the residual stream at pre_assistant.
    taught = encode(
        model.tokenizer, [*chat, {"role": "assistant", "content": "STAY INSIDE AND READ A BOOK."}]
    )

    def answer_loss(logits, b):
        mask = b.masks["assistant"][:, 1:]
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), b.input_ids[:, 1:], reduction="none"
        )
        return (ce * mask).sum(1) / mask.sum(1)

    g = interp.capture_grads(
        model, taught, answer_loss, "blocks.*.hook_resid_post", positions="pre_assistant"
    )
    norms = g.grads.stack()[:, 0].norm(dim=-1)
    print(
        f"\n[grads] loss {g.loss.item():.3f}; ‖∂loss/∂resid‖ at pre_assistant by layer (every 3rd):"
    )
    print("[grads]", " ".join(f"{x:.3f}" for x in norms[::3].tolist()))
    print(
        f"[grads] parameter grads kept: {any(p.grad is not None for p in model.model.parameters())}"
    )
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()

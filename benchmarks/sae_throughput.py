"""TopK SAE training throughput: ``interp.sae.train_sae`` vs SAELens's TopK training step.

    python benchmarks/sae_throughput.py [--device cpu] [--d-in 576 --d-sae 4608 --k 32]
        [--batch 4096] [--steps 20] [--warmup 3] [--data synthetic|gaussian|PATH]
        [--out benchmarks/results/sae_throughput.json]

Both trainers see the same batches in the same order, on the same device and threads.
SAELens's step is its own public seam ``SAETrainer.step`` on a ``TopKTrainingSAE`` (the
code path of ``SAETrainer.fit``: forward, MSE + TopK aux loss, backward, gradient
clipping at 1.0, Adam, LR scheduler). Ours is the real ``interp.sae.train_sae`` loop, fed by
a generator that runs one SAELens step between our steps, so each pair of steps runs
back to back under the same machine conditions (the pair order alternates). Fairness:
same Adam (lr, betas, eps 1e-8), same gradient clipping, no warmup on either side;
each library keeps its own loss and defaults otherwise (SAELens: decoder-norm rescaling,
decoder init norm 0.1; ours: unit-norm decoder, geometric-median b_dec, AuxK at 1/32).

Reported: tokens/s from the median step time, the median of per-pair speed ratios with
min–max, and FVU of each SAE on the same held-out batch after the same number of
training tokens; the target (≥ 5× at equal or better FVU) with its verdict, and the load
average at the start and end of the run (the results file's ``markdown`` is what the
docs' benchmarks page shows). Data: ``synthetic`` (default) draws activations from a
random sparse dictionary plus noise (so FVU means something), ``gaussian`` is isotropic
noise, or a path to a ``.pt``/``.npy``/``.safetensors`` tensor ``[n, d_in]`` of real
activations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness

from interp.sae import TopKSAE, evaluate, train_sae

# Issue 4: at least 5× SAELens's tokens/s at equal or better held-out FVU.
TARGET_SPEEDUP = 5.0


def load_activations(path: str, d_in: int) -> torch.Tensor:
    p = Path(path)
    if p.suffix == ".npy":
        import numpy as np

        acts = torch.from_numpy(np.load(p, mmap_mode="r")[:])
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        acts = next(iter(tensors.values()))
    else:
        acts = torch.load(p, map_location="cpu", weights_only=True)
    acts = acts.reshape(-1, acts.shape[-1]).float()
    if acts.shape[-1] != d_in:
        raise SystemExit(f"{path}: activations have width {acts.shape[-1]}, --d-in is {d_in}")
    return acts


def make_batches(args, n_batches: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    total = n_batches * args.batch
    if args.data == "gaussian":
        data = torch.randn(total, args.d_in, generator=g)
    elif args.data == "synthetic":
        # Sparse superposition: each token mixes ~k true directions with exponential
        # magnitudes, plus a shared offset and small isotropic noise.
        n_true = args.d_sae
        dictionary = torch.randn(n_true, args.d_in, generator=g)
        dictionary /= dictionary.norm(dim=1, keepdim=True)
        offset = torch.randn(args.d_in, generator=g)
        chunks = []
        for _ in range(n_batches):
            idx = torch.randint(0, n_true, (args.batch, args.k), generator=g)
            mags = torch.empty(args.batch, args.k).exponential_(1.0, generator=g)
            x = torch.nn.functional.embedding_bag(
                idx, dictionary, per_sample_weights=mags, mode="sum"
            )
            chunks.append(x + offset + 0.05 * torch.randn(args.batch, args.d_in, generator=g))
        data = torch.cat(chunks)
    else:
        data = load_activations(args.data, args.d_in)
        if data.shape[0] < total:
            raise SystemExit(f"{args.data}: need {total} rows for this run, found {data.shape[0]}")
        data = data[torch.randperm(data.shape[0], generator=g)[:total]]
    return [b.to(args.device) for b in data.split(args.batch)]


def saelens_trainer(args, lr: float):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(args.seed)  # SAELens initializes from the global RNG
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=args.d_in,
            d_sae=args.d_sae,
            k=args.k,
            device=args.device,
            use_sparse_activations=args.saelens_sparse,
        )
    )
    cfg = SAETrainerConfig(
        total_training_samples=(args.steps + args.warmup) * args.batch,
        train_batch_size_samples=args.batch,
        lr=lr,
        lr_end=lr / 10,  # unused by the constant schedule; SAETrainer asserts it is set
        lr_warm_up_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        device=args.device,
    )
    return SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))


@torch.no_grad()
def saelens_fvu(sae, batch: torch.Tensor) -> float:
    x_hat = sae.decode(sae.encode(batch))
    return float(((batch - x_hat) ** 2).sum() / ((batch - batch.mean(0)) ** 2).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20, help="timed step pairs")
    parser.add_argument("--warmup", type=int, default=3, help="untimed step pairs first")
    parser.add_argument("--data", default="synthetic", help="synthetic | gaussian | PATH")
    parser.add_argument(
        "--saelens-sparse", action="store_true", help="SAELens use_sparse_activations=True"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/sae_throughput.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    machine = harness.machine_info()
    n_total = args.warmup + args.steps
    batches = make_batches(args, n_total + 1)
    held_out = batches.pop()

    ours = TopKSAE(
        args.d_in, args.d_sae, args.k, generator=torch.Generator().manual_seed(args.seed)
    ).to(args.device)
    lr = 2e-4 / (args.d_sae / 2**14) ** 0.5  # ours default, used for both
    theirs = saelens_trainer(args, lr)

    t_ours: list[float] = []
    t_theirs: list[float] = []

    def theirs_step(batch: torch.Tensor) -> float:
        t0 = time.perf_counter()
        theirs.step(batch)
        theirs.n_training_steps += 1  # what SAETrainer.fit does after step()
        return time.perf_counter() - t0

    def paired():
        # Each of our steps runs between this generator's yield and its resumption.
        for i, batch in enumerate(batches):
            if i % 2 == 0:
                t_their = theirs_step(batch)
                mark = time.perf_counter()
                yield batch
                t_our = time.perf_counter() - mark
            else:
                mark = time.perf_counter()
                yield batch
                t_our = time.perf_counter() - mark
                t_their = theirs_step(batch)
            if i >= args.warmup:
                t_ours.append(t_our)
                t_theirs.append(t_their)
            print(
                f"pair {i:3d}: ours {t_our * 1e3:8.1f} ms   sae-lens {t_their * 1e3:8.1f} ms",
                flush=True,
            )

    result = train_sae(
        ours, paired(), lr=lr, eps=1e-8, warmup_steps=0, max_grad_norm=1.0, progress=False
    )

    harness.finish(machine)
    ratios = [b / a for a, b in zip(t_ours, t_theirs, strict=True)]
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    fvu_ours = evaluate(ours, [held_out]).fvu
    fvu_theirs = saelens_fvu(theirs.sae, held_out)
    tokens = result.tokens
    speedup = statistics.median(ratios)
    met = speedup >= TARGET_SPEEDUP and fvu_ours <= fvu_theirs
    title = (
        f"TopK SAE training, d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch}, "
        f"{args.device}, {torch.get_num_threads()} threads, data={args.data}, "
        f"{len(ratios)} timed pairs after {args.warmup} warm-up"
    )
    table = "\n".join(
        [
            f"| trainer | median step (ms) | tokens/s | FVU held-out after {tokens:,} tokens |",
            "|---|---:|---:|---:|",
            f"| interp.sae.train | {med_ours * 1e3:.1f} | {args.batch / med_ours:,.0f} | {fvu_ours:.4f} |",
            f"| sae-lens SAETrainer.step (TopK) | {med_theirs * 1e3:.1f} | {args.batch / med_theirs:,.0f} | {fvu_theirs:.4f} |",
        ]
    )
    verdict = (
        f"Speed-up (median of per-pair ratios): **{speedup:.2f}×** (min {min(ratios):.2f}×, "
        f"max {max(ratios):.2f}×); target ≥ {TARGET_SPEEDUP:g}× at equal or better FVU: "
        f"**{'met' if met else 'not met'}**. {harness.load_line(machine)}"
    )
    payload = {
        "benchmark": "sae_throughput",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "lr": lr,
        "machine": machine,
        "markdown": [title, table, verdict],
        "target": {"speedup_min": TARGET_SPEEDUP, "fvu": "≤ sae-lens", "met": met},
        "tokens_trained": tokens,
        "interp": {
            "median_step_s": med_ours,
            "tokens_per_s": args.batch / med_ours,
            "fvu_held_out": fvu_ours,
            "train_fvu_last": result.history[-1].fvu,
            "step_s": t_ours,
        },
        "sae_lens": {
            "median_step_s": med_theirs,
            "tokens_per_s": args.batch / med_theirs,
            "fvu_held_out": fvu_theirs,
            "step_s": t_theirs,
        },
        "speedup": {
            "median": speedup,
            "min": min(ratios),
            "max": max(ratios),
            "pairs": len(ratios),
        },
    }
    out = harness.write("sae_throughput", payload, args.out)

    print()
    print("\n\n".join(payload["markdown"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

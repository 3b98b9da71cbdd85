"""Data parallelism on one machine: ``torchrun`` processes vs one process, same total threads.

    python benchmarks/data_parallel.py [--procs 2] [--rounds 3] [--texts 64] [--quick]
        [--model smollm2-135m-instruct] [--out benchmarks/results/data_parallel.json]

Two workloads, each run by a fresh launch per round (the launches alternate):

* ``capture``: ``runs.capture_dataset`` of every token's ``hook_resid_post`` at the middle
  layer over ``--texts`` texts into a shard folder (``length_window=2``: the ranks split
  windows of two batches);
* ``sae``: ``interp.sae.train_sae`` on random activations of the model's width
  (``--sae-steps`` steps of ``--sae-batch`` rows: each rank takes its share of every global
  batch and the gradients are summed).

One process gets ``--procs`` torch threads; under ``torchrun`` each of ``--procs`` processes
gets one, so both use the same cores. Each worker times only its workload (model loading
and process start-up excluded; a barrier before and after under torchrun) and reports
tokens (or rows) per second. The ratio is data-parallel tokens/s over one process's, the
median over rounds. On a CPU machine this measures whether processes beat intra-op threads
at the same core count; on a multi-GPU node the same command with ``--device cuda`` puts
one GPU under each process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness

HERE = Path(__file__).resolve()


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from interp.cache import atomic_write

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    rank = dist.get_rank() if world > 1 else 0
    if args.device != "cpu":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    if args.worker == "capture":
        from interp import runs

        model = harness.load_model(args.model, device=args.device)
        texts = harness.calibration_texts("text", args.texts)
        layer = model.cfg.n_layers // 2
        name = f"blocks.{layer}.hook_resid_post"
        local = {"rank": 0, "world_size": 1}
        runs.capture_dataset(model, texts[:4], name, progress=False, **local)  # warm-up
        barrier()
        t0 = time.perf_counter()
        out = runs.capture_dataset(
            model, texts, name, to=args.folder, length_window=2, progress=False
        )
        barrier()
        seconds = time.perf_counter() - t0
        amount = len(out)  # token rows of the whole dataset
    else:
        from interp.sae import SAETrainConfig, TopKSAE, train_sae

        g = torch.Generator().manual_seed(0)
        batches = [
            torch.randn(args.sae_batch, args.d_in, generator=g) for _ in range(args.sae_steps + 1)
        ]
        shards = [b.chunk(world)[rank].to(args.device) for b in batches]
        config = SAETrainConfig(warmup_steps=0, progress=False)

        def fit(part: list) -> None:
            sae = TopKSAE(args.d_in, args.d_sae, args.k).to(args.device)
            train_sae(sae, part, config)

        fit(shards[:1])  # warm-up (allocations, kernels)
        barrier()
        t0 = time.perf_counter()
        fit(shards[1:])
        barrier()
        seconds = time.perf_counter() - t0
        amount = args.sae_steps * args.sae_batch
    if rank == 0:  # a file, not stdout: a record printed to torchrun's pipe was lost once
        result = json.dumps({"seconds": seconds, "amount": amount})
        atomic_write(args.folder + ".result.json", lambda tmp: Path(tmp).write_text(result))
    if world > 1:
        # After a barrier, leave without tearing gloo down: a rank exiting through
        # destructors while its peer still closes the group can abort ("terminate called
        # without an active exception"; seen under load).
        sys.stdout.flush()
        dist.barrier()
        os._exit(0)


def launch(args: argparse.Namespace, workload: str, procs: int) -> dict:
    folder = tempfile.mkdtemp(prefix="dp_")
    common = [
        str(HERE),
        "--worker",
        workload,
        "--folder",
        folder,
        "--model",
        args.model,
        "--texts",
        str(args.texts),
        "--device",
        args.device,
        "--sae-steps",
        str(args.sae_steps),
        "--sae-batch",
        str(args.sae_batch),
        "--d-in",
        str(args.d_in),
        "--d-sae",
        str(args.d_sae),
        "--k",
        str(args.k),
    ]
    if procs == 1:
        cmd = [sys.executable, *common, "--threads", str(args.procs)]
    else:
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(procs), *common]
        cmd += ["--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if procs > 1 else str(args.procs)}
    result = Path(folder + ".result.json")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(
                f"{workload} with {procs} process(es) failed (exit {proc.returncode}, "
                f"result file written: {result.is_file()}):\n{proc.stderr[-3000:]}"
            )
        return json.loads(result.read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        result.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=("capture", "sae"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--procs", type=int, default=2, help="processes (and threads of the one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 round, fewer texts and steps")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--sae-steps", type=int, default=20)
    p.add_argument("--sae-batch", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--only", default="capture,sae")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.quick:
        args.rounds, args.texts, args.sae_steps = 1, 16, 5
    machine = harness.machine_info()
    results: dict = {}
    for workload in [w for w in args.only.split(",") if w]:
        times: dict[int, list[float]] = {1: [], args.procs: []}
        amount = None
        for r in range(args.rounds):
            order = [1, args.procs] if r % 2 == 0 else [args.procs, 1]
            for procs in order:
                res = launch(args, workload, procs)
                times[procs].append(res["seconds"])
                if amount is not None and res["amount"] != amount:
                    raise SystemExit(f"{workload}: runs disagree on the amount of work")
                amount = res["amount"]
                print(f"{workload} procs={procs}: {res['seconds']:.2f}s", flush=True)
        ratios = [a / b for a, b in zip(times[1], times[args.procs], strict=True)]
        results[workload] = {
            "unit": "tokens" if workload == "capture" else "rows",
            "amount": amount,
            "one_process_s": times[1],
            "data_parallel_s": times[args.procs],
            "speedup": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "tokens_per_s_one": amount / statistics.median(times[1]),
            "tokens_per_s_dp": amount / statistics.median(times[args.procs]),
        }
    harness.finish(machine)
    payload = {
        "benchmark": "data_parallel",
        "machine": machine,
        "device": args.device,
        "model": args.model,
        "procs": args.procs,
        "rounds": args.rounds,
        "results": results,
    }
    rows = [
        [
            w,
            f"{r['tokens_per_s_one']:,.0f}",
            f"{r['tokens_per_s_dp']:,.0f}",
            f"{r['speedup']:.2f}× ({r['speedup_min']:.2f}–{r['speedup_max']:.2f})",
        ]
        for w, r in results.items()
    ]
    notes = [
        f"{args.procs} torchrun processes × 1 thread vs 1 process × {args.procs} threads, "
        f"{args.rounds} alternating rounds (fresh launches; load and start-up excluded); "
        f"capture: {args.texts} texts, every token of the middle layer; SAE: {args.sae_steps} "
        f"steps of {args.sae_batch} rows, d_sae {args.d_sae}, k {args.k}.",
        harness.load_line(machine),
    ]
    harness.publish(
        "data_parallel",
        payload,
        rows,
        ["workload", "1 process /s", f"{args.procs} processes /s", "speed-up (min–max)"],
        notes,
        out=args.out,
    )
    return payload


if __name__ == "__main__":
    main()

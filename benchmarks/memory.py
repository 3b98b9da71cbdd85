"""Peak memory of a full-sequence activation cache vs a one-position capture, with a bare
forward as the reference, at a few sequence lengths on the embedded model.

What is measured (``"measure"`` in the JSON says which one a run used):

* **cuda**: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around the call
  after ``reset_peak_memory_stats()`` — bytes held by torch tensors at the peak, exact.
* **cpu**: the growth of the process's resident-set high-water mark (``VmHWM`` in
  ``/proc/self/status``, reset just before the call by writing ``5`` to
  ``/proc/self/clear_refs``) over the resident set just before the call. Each
  measurement runs in a fresh subprocess (model loaded, one warm-up call of the same
  variant on 1×16 tokens — so lazy imports and one-time initialisation are done — then the
  one measured call) with glibc's mmap threshold pinned at 128 KiB
  (``MALLOC_MMAP_THRESHOLD_``), so every large tensor is its own mapping that is returned
  to the OS when freed and the high-water mark follows live tensors instead of allocator
  caches. It counts everything the call makes resident — tensors, allocator overhead,
  oneDNN scratch — which is what a user's RAM budget sees. ``tracemalloc`` is not used
  (it does not see torch's allocations); the torch profiler's CPU memory events
  attribute allocations to ops but frees outside them, which does not give a clean
  timeline. Where ``clear_refs`` is not writable (non-Linux) the fresh process's
  ``ru_maxrss`` after the warm-up is the reference instead, and the JSON says so.

Every variant keeps its result alive until the peak is read: logits for the bare forward,
the cache for the captures. ``stored_bytes`` are the cache tensors' own bytes.

    python benchmarks/memory.py [--device cpu] [--sizes 1x256,1x1024,1x2048] [--repeats 2]
        [--quick] [--in-process] [--model NAME] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness

import interp

NAMES = "blocks.*.hook_resid_post"
VARIANTS = ["bare forward", "capture one position (-1)", "capture full sequence"]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _call(model, variant: str, ids, mask):
    batch = {"input_ids": ids, "attention_mask": mask}
    if variant == "bare forward":
        return model.forward(ids, mask)
    if variant == "capture one position (-1)":
        return interp.capture(model, batch, NAMES, positions=-1)
    if variant == "capture full sequence":
        return interp.capture(model, batch, NAMES)
    raise ValueError(variant)


def measure(model, variant: str, size: str, device: str) -> dict:
    """One measurement of ``variant`` at ``size`` in this process (see the module doc)."""
    b, t = (int(x) for x in size.split("x"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.d_vocab, (b, t), generator=gen).to(device)
    mask = torch.ones_like(ids)
    warm = ids[:1, :16]
    with torch.no_grad():
        _call(model, variant, warm, torch.ones_like(warm))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = _call(model, variant, ids, mask)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            retained = torch.cuda.memory_allocated() - before
            how = "torch.cuda.max_memory_allocated"
        else:
            reset = _reset_hwm()
            hwm0 = _status_kb("VmHWM") if reset else None
            rss0 = _status_kb("VmRSS")
            if reset and hwm0 is not None and rss0 is not None:
                out = _call(model, variant, ids, mask)
                peak = (_status_kb("VmHWM") - rss0) * 1024
                retained = (_status_kb("VmRSS") - rss0) * 1024
                how = "VmHWM growth after clear_refs reset"
            else:
                base = _maxrss_bytes()
                out = _call(model, variant, ids, mask)
                peak = _maxrss_bytes() - base
                retained = None
                how = "ru_maxrss growth (no clear_refs)"
    stored = None
    if not isinstance(out, torch.Tensor):
        stored = sum(v.numel() * v.element_size() for v in out.values())
    return {
        "peak_bytes": int(peak),
        "retained_bytes": None if retained is None else int(retained),
        "stored_bytes": stored,
        "measure": how,
    }


def _worker(spec: str) -> None:
    s = json.loads(spec)
    torch.manual_seed(0)
    model = harness.load_model(s["model"], device=s["device"])
    print("RESULT " + json.dumps(measure(model, s["variant"], s["size"], s["device"])))


def _in_subprocess(spec: dict) -> dict:
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"memory worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def mib(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x / 2**20:.1f} MiB" if abs(x) >= 2**20 else f"{x / 2**10:.0f} KiB"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--sizes", default="1x256,1x1024,1x2048")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per measurement")
    p.add_argument("--quick", action="store_true", help="sizes 1x256,1x1024, 1 repeat")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process (default on cuda; on cpu less clean: allocator reuse)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return {}
    if args.quick:
        args.sizes, args.repeats = "1x256,1x1024", 1
    in_process = args.in_process or args.device.startswith("cuda")
    machine = harness.machine_info()
    model = harness.load_model(args.model, device=args.device) if in_process else None
    results: dict = {
        "benchmark": "memory",
        "machine": machine,
        "device": args.device,
        "model": args.model,
        "mode": "in-process" if in_process else "fresh subprocess per measurement",
        "malloc_env": None if in_process else MALLOC_ENV,
        "sizes": {},
    }
    rows = []
    for size in args.sizes.split(","):
        per: dict = {}
        for variant in VARIANTS:
            runs = []
            for _ in range(args.repeats):
                spec = {"model": args.model, "device": args.device, "variant": variant}
                spec["size"] = size
                runs.append(
                    measure(model, variant, size, args.device)
                    if in_process
                    else _in_subprocess(spec)
                )
            print(f"{size} {variant}: peak {[mib(r['peak_bytes']) for r in runs]}", flush=True)
            per[variant] = {
                "peak_bytes": statistics.median(r["peak_bytes"] for r in runs),
                "peak_bytes_runs": [r["peak_bytes"] for r in runs],
                "retained_bytes": runs[0]["retained_bytes"],
                "stored_bytes": runs[0]["stored_bytes"],
                "measure": runs[0]["measure"],
            }
        bare = per["bare forward"]["peak_bytes"]
        for variant, r in per.items():
            r["extra_peak_over_bare_bytes"] = r["peak_bytes"] - bare
            rows.append(
                [
                    size,
                    variant,
                    mib(r["peak_bytes"]),
                    " / ".join(mib(x) for x in r["peak_bytes_runs"]),
                    mib(r["extra_peak_over_bare_bytes"]),
                    mib(r["stored_bytes"]),
                ]
            )
        results["sizes"][size] = per
    harness.finish(machine)
    header = [
        "batch×tokens",
        "variant",
        "peak (median)",
        "peak per run",
        "extra peak over bare forward",
        "cache tensors",
    ]
    measures = sorted({r["measure"] for per in results["sizes"].values() for r in per.values()})
    notes = [
        f"Model `{args.model}`, `{NAMES}` at every layer, {results['mode']}, "
        f"{args.repeats} run(s) each; measure: {', '.join(measures)} (see `benchmarks/memory.py`).",
        harness.load_line(machine),
    ]
    harness.publish("memory", results, rows, header, notes[1:], intro=notes[0], out=args.out)
    return results


if __name__ == "__main__":
    main()

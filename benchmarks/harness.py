"""Shared benchmark method: same process, same inputs, warm-up, interleaved rounds,
median of per-round ratios to a baseline (with min–max and a seeded bootstrap 95% interval
of that median), machine, load average and versions recorded.

Every suite takes ``--device`` (runs unchanged on cuda), ``--quick`` (fewer rounds) and
``--model`` (an ``interp.load`` name, or ``tiny:FAMILY`` for ``interp.tiny``, which the
tests use).

Importing this module sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is already set (as
``make bench`` sets it): idle OpenMP threads then sleep instead of spinning, so a suite's
CPU seconds count its work, not its waiting, and a busy neighbour does not slow it
several-fold. The OpenMP runtime reads it once, when torch loads, so a suite imports this
module before torch (or the environment sets it); ``machine_info`` records the policy in
effect (None: the OpenMP default, when torch was loaded first with the variable unset)."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

# The OpenMP runtime reads the policy once, when torch loads it: if a suite imported torch
# before this module with the variable unset, the setting below comes too late, and
# ``machine_info`` records the OpenMP default (None) instead of the variable's new value.
_TORCH_FIRST = "torch" in sys.modules
_POLICY_AT_TORCH_LOAD = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from interp.cache import atomic_write  # noqa: E402  (loads torch: after the policy is set)

RESULTS = Path(__file__).parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibration_texts(kind: str, n: int) -> list[str]:
    """``n`` items of ``kind`` (``"prompt"`` or ``"text"``) of interp's bundled calibration
    set (``interp/_data/moefy_calibration.jsonl``), cycled to ``n``: the workbench and
    data-parallel suites' inputs."""
    import interp

    path = Path(interp.__file__).parent / "_data" / "moefy_calibration.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    items = [r[kind] for r in rows if r.get("kind") == kind]
    return [items[i % len(items)] for i in range(n)]


def machine_info() -> dict:
    """Platform, CPU model, threads, library versions and the load average at the start."""
    import torch

    versions = {}
    for dist in (
        "interp",
        "torch",
        "transformers",
        "transformer-lens",
        "nnsight",
        "sae-lens",
        "peft",
        "numpy",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": (
            _POLICY_AT_TORCH_LOAD if _TORCH_FIRST else os.environ.get("OMP_WAIT_POLICY")
        ),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_start": loadavg(),
    }


def loadavg() -> list[float] | None:
    """1/5/15-minute load average (``os.getloadavg``); includes this process's own threads."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def finish(machine: dict) -> dict:
    """Record the load average at the end of a suite in its machine info."""
    machine["loadavg_end"] = loadavg()
    return machine


def load_model(name: str, device: str = "cpu"):
    """``interp.load(name)``, or ``interp.tiny(FAMILY)`` for ``name = "tiny:FAMILY"``."""
    import interp

    if name.startswith("tiny:"):
        model = interp.tiny(name.split(":", 1)[1])
        model.model.to(device)
        return model
    return interp.load(name, device=device)


def sync_for(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def bootstrap_median_ci(
    values: list[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (seeded, reproducible)."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(n_boot))
    lo = meds[int((1 - level) / 2 * n_boot)]
    hi = meds[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return lo, hi


def interleaved(
    variants: dict[str, Callable[[], object]],
    baseline: str,
    rounds: int,
    warmup: int = 3,
    sync: Callable[[], None] = lambda: None,
    seed: int = 0,
    keep_times: bool = True,
    clock: str = "wall",
) -> dict[str, dict[str, float]]:
    """Time every variant once per round, in a seeded random order; ratios are per round.

    ``clock="wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: CPU seconds
    of this process over all its threads). On a shared machine the CPU clock leaves out the
    time spent waiting for a core that a neighbour holds, the largest source of round-to-round
    noise there; it still counts everything this process computes (Python overhead included),
    so for a single-process CPU workload the ratio measures the same thing. Both clocks are
    recorded (``times_s`` is the chosen one, ``other_times_s`` the other).

    The order is shuffled every round (not rotated): with a rotation each variant always
    follows the same neighbour, so a neighbour's after-effects (memory it still holds,
    caches it evicted) would bias one variant systematically.

    Per variant: ``median_s``; ``ratio`` = median of per-round ratios to ``baseline`` with
    ``ratio_min``/``ratio_max`` and ``ratio_ci95`` (bootstrap over rounds, ``seed``);
    ``delta_s`` = median per-round difference to the baseline; ``times_s`` the raw times.
    """
    names = list(variants)
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    times: dict[str, list[float]] = {n: [] for n in names}
    other: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = rng.sample(names, len(names))
        for n in order:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            variants[n]()
            sync()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            times[n].append(cpu if clock == "cpu" else wall)
            other[n].append(wall if clock == "cpu" else cpu)
    out = {}
    for n in names:
        ratios = [t / b for t, b in zip(times[n], times[baseline], strict=True)]
        deltas = [t - b for t, b in zip(times[n], times[baseline], strict=True)]
        out[n] = {
            "median_s": statistics.median(times[n]),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratio_ci95": list(bootstrap_median_ci(ratios, seed=seed)),
            "delta_s": statistics.median(deltas),
            "rounds": rounds,
            "clock": clock,
        }
        if keep_times:
            out[n]["times_s"] = [round(t, 6) for t in times[n]]
            out[n]["other_times_s"] = [round(t, 6) for t in other[n]]
    return out


def publish(
    name: str,
    payload: dict,
    rows: list[list[object]],
    header: list[str],
    notes: list[str],
    intro: str | None = None,
    out: str | Path | None = None,
) -> Path:
    """End of a suite: print its table and notes, keep them in ``payload["markdown"]`` (what
    the docs and ``summary.md`` render: intro, table, notes) and write the JSON."""
    tbl = table(rows, header)
    payload["markdown"] = [*([intro] if intro else []), tbl, *notes]
    print(tbl)
    print("\n".join(notes))
    path = write(name, payload, out)
    print(f"wrote {path}")
    return path


def write(name: str, payload: dict, out: str | Path | None = None) -> Path:
    text = json.dumps(payload, indent=2, default=str) + "\n"
    path = Path(out) if out else RESULTS / f"{name}.json"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def table(rows: list[list[object]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ratio(r: dict) -> str:
    """``1.004× [0.995, 1.012] (0.81–1.27)``: median ratio, bootstrap 95% CI, min–max."""
    ci = r.get("ratio_ci95")
    ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return f"{r['ratio']:.3f}×{ci_s} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"


def judge(r: dict, target: float) -> str:
    """Verdict on the median ratio, qualified by where the 95% interval lies."""
    lo, hi = r.get("ratio_ci95", (r["ratio"], r["ratio"]))
    if hi <= target:
        return "met (whole 95% CI ≤ target)"
    if r["ratio"] <= target:
        return "met on the median (95% CI straddles the target)"
    if lo > target:
        return f"MISSED by {r['ratio'] - target:+.3f} (whole 95% CI > target)"
    return f"MISSED on the median by {r['ratio'] - target:+.3f} (95% CI straddles the target)"


RATIO_HEADER = "ratio to baseline [bootstrap 95% CI] (min–max)"


def load_line(machine: dict) -> str:
    a, b = machine.get("loadavg_start"), machine.get("loadavg_end")
    fmt = lambda x: "/".join(f"{v:.2f}" for v in x) if x else "n/a"  # noqa: E731
    return f"Load average (1/5/15 min) at start {fmt(a)}, at end {fmt(b)}; {machine.get('cpu_count')} CPUs."

"""Shared benchmark method: same process, same inputs, warm-up, interleaved rounds,
median of per-round ratios to a baseline (with min–max), machine and versions recorded."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict:
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
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
    }


def interleaved(
    variants: dict[str, Callable[[], object]],
    baseline: str,
    rounds: int,
    warmup: int = 3,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, float]]:
    """Time every variant once per round, rotating the order; ratios are per round."""
    names = list(variants)
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync()
            t0 = time.perf_counter()
            variants[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    out = {}
    for n in names:
        ratios = [t / b for t, b in zip(times[n], times[baseline], strict=True)]
        out[n] = {
            "median_s": statistics.median(times[n]),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "rounds": rounds,
        }
    return out


def write(name: str, payload: dict, out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def table(rows: list[list[object]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['ratio']:.3f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"

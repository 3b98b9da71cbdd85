"""Run every benchmark suite in turn (``make bench``); each prints its table and writes
``benchmarks/results/<suite>.json``. Extra arguments (e.g. ``--device cuda``) go to every suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SUITES = ["hook_overhead.py", "grad_capture.py", "sae_throughput.py"]


def main() -> int:
    here = Path(__file__).parent
    failed = []
    for suite in SUITES:
        print(f"\n=== {suite} ===", flush=True)
        if subprocess.call([sys.executable, str(here / suite), *sys.argv[1:]]) != 0:
            failed.append(suite)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared helpers for the example studies: CLI, model loading, reports, plots, progress.

Every ``examples/NAME.py`` takes the same flags (``--quick``, ``--model``,
``--device``, ``--seed``, ``--out``; see ``DESIGN.md``), writes
``report.json`` and PNG plots into its output folder, and exits non-zero on
failure. This module holds only what all of them need:

* :func:`parser` — the common flags (add a study's own flags to the result);
* :func:`setup` / :func:`load_model` — threads, seeds, and ``--model`` specs,
  including ``tiny:<family>`` for tests (``interp.tiny``);
* :class:`Report` — a JSON report saved atomically (temp file + ``os.replace``)
  after every step, with per-step wall times from :meth:`Report.step` and the
  final status from :meth:`Report.running`; :func:`environment` for its header;
  :func:`run_study` puts them together as a study's ``main``;
* :func:`pyplot` / :func:`savefig` — matplotlib on the Agg backend, PNGs
  written atomically;
* :func:`progress`, :func:`log`, :func:`read_jsonl`, :func:`evenly_spaced`.

Import it before ``torch``: it sets ``OMP_WAIT_POLICY=PASSIVE`` (unless
already set), which keeps CPU runs from slowing down several-fold when other
processes compete for the cores (busy-waiting OpenMP threads).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from interp.cache import atomic_write

__all__ = [
    "Report",
    "environment",
    "evenly_spaced",
    "jsonable",
    "load_model",
    "log",
    "parser",
    "progress",
    "pyplot",
    "read_jsonl",
    "run",
    "run_study",
    "savefig",
    "setup",
    "write_json",
]

DEFAULT_MODEL = "smollm2-135m-instruct"


# -- command line ------------------------------------------------------------------------------
def parser(name: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the flags every example takes."""
    p = argparse.ArgumentParser(
        prog=f"examples/{name}.py",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small settings for a fast CPU run")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="embedded name, local path, hub id, or tiny:<family> (random test model); "
        f"default {DEFAULT_MODEL}",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for data splits, sampling, training")
    p.add_argument("--out", default=f"runs/{name}", help=f"output folder (default runs/{name})")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: min(2, cpu count))",
    )
    return p


def setup(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and ``--seed`` to torch."""
    import torch

    threads = args.threads or max(1, min(2, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)


def load_model(spec: str, device: str = "cpu", seed: int = 0) -> Any:
    """A ``HookedModel`` from a ``--model`` spec.

    ``tiny:<family>`` builds ``interp.tiny(family, seed)`` (random weights,
    byte tokenizer, ChatML template); anything else goes to ``interp.load``.
    """
    import interp

    if spec.startswith("tiny:"):
        model = interp.tiny(spec.split(":", 1)[1], seed=seed)
        model.model.to(device)
        return model
    return interp.load(spec, device=device)


# -- data and layers ---------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``0..n-1``, always including both ends (all if k ≥ n)."""
    if k >= n:
        return list(range(n))
    if k <= 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


# -- progress and logging ----------------------------------------------------------------------
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Print ``msg`` with the seconds since start, flushed (progress bars go to stderr)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def progress(iterable: Iterable[Any], desc: str, total: int | None = None) -> Iterator[Any]:
    """A tqdm bar over ``iterable`` (stderr; left on screen only while running)."""
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


# -- JSON report -------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: tensors/arrays to lists, tuples to lists,
    dataclasses and NamedTuples to dicts, paths to strings, NaN/±inf to ``None``."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch / numpy
        return jsonable(obj.tolist())
    if hasattr(obj, "_asdict"):
        return jsonable(obj._asdict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Sequence | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot put {type(obj).__name__} into a JSON report")


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``jsonable(obj)`` to ``path`` atomically (``interp.cache.atomic_write``)."""
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Versions, device, threads and the load average at the start, for ``report.json``
    (wall times on a shared CPU depend on the neighbours; the load says how busy it was)."""
    import platform

    import torch

    import interp

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "interp": interp.__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": _loadavg(),
    }


class Report(dict):
    """The study's ``report.json``: a dict saved atomically, with per-step timings.

    ``with report.step("name"):`` times a step into ``report["timings"]``
    (``name_s`` wall seconds, ``name_cpu_s`` CPU seconds of all threads) and
    saves the report when the step ends, so a crash keeps every finished
    step's numbers.
    """

    def __init__(self, out: str | os.PathLike[str], **fields: Any):
        super().__init__(status="running", **fields)
        self.out = Path(out)
        self.path = self.out / "report.json"
        self["timings"] = {}
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()

    def save(self) -> Path:
        self["timings"]["total_s"] = round(time.perf_counter() - self._t0, 2)
        self["timings"]["total_cpu_s"] = round(time.process_time() - self._cpu0, 2)
        return write_json(self.path, self)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The whole study: ``status`` becomes ``"ok"`` when the block finishes, or
        ``"failed"`` with the ``error`` (re-raised); the report is saved either way, with the
        load average at the end next to the one :func:`environment` recorded at the start."""
        try:
            yield
        except BaseException as exc:
            self["status"] = "failed"
            self["error"] = f"{type(exc).__name__}: {exc}"
            raise
        else:
            self["status"] = "ok"
            self.pop("error", None)
        finally:
            if isinstance(self.get("environment"), dict):
                self["environment"]["loadavg_end"] = _loadavg()
            self.save()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        log(f"== {name}")
        t, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self["timings"][f"{name}_s"] = round(time.perf_counter() - t, 2)
            # CPU seconds over all threads: unlike wall time, barely affected by other load.
            self["timings"][f"{name}_cpu_s"] = round(time.process_time() - cpu, 2)
            self.save()
        log(f"== {name} done in {self['timings'][f'{name}_s']:.1f}s")


# -- plots -------------------------------------------------------------------------------------
def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def savefig(fig: Any, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Save a figure as PNG atomically and close it."""
    plt = pyplot()
    try:
        return atomic_write(
            path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        )
    finally:
        plt.close(fig)


# -- entry point -------------------------------------------------------------------------------
def run_study(
    name: str,
    question: str,
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    settings: Mapping[str, Any],
    body: Callable[[Report], None],
) -> Report:
    """A study's ``main`` after its arguments are parsed: a :class:`Report` in ``args.out``
    with the question, command line, settings, seed and :func:`environment`; ``body(report)``
    under :meth:`Report.running`; the report's path and wall time logged."""
    report = Report(
        args.out,
        study=name,
        question=question,
        command=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        settings=dict(settings),
        seed=args.seed,
        environment=environment(args),
    )
    with report.running():
        body(report)
    log(f"report: {report.path} ({report['timings']['total_s']:.0f}s)")
    return report


def run(main: Callable[[Sequence[str] | None], int]) -> None:
    """``sys.exit(main())``; an exception prints its traceback and exits with status 1."""
    try:
        code = main(None)
    except KeyboardInterrupt:
        code = 130
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    sys.exit(code)

"""Shared helpers for the example studies: settings, model loading, reports, progress.

Every ``examples/NAME.py`` takes the same flags (those of :class:`Settings`), writes
``report.json`` and PNG plots (``interp.viz``) into its output folder, and exits non-zero
on failure. This module holds only what all of them need:

* :class:`Settings` / :func:`field` — one settings mechanism for all studies: a dataclass
  per study (subclassing :class:`Settings`, which holds the common flags), the full run as
  its defaults, ``QUICK`` as the ``--quick`` preset, and every field a command-line flag
  (:meth:`Settings.parse`);
* :func:`setup` / :func:`load_model` — threads, seeds, and ``--model`` specs with
  ``--dtype`` / ``--device`` / ``--device-map``, including ``tiny:<family>`` for tests
  (``interp.tiny``); :func:`layer_at` turns a fraction of depth into a layer;
* :class:`Report` — a JSON report saved atomically (temp file + ``os.replace``)
  after every step, with per-step wall times from :meth:`Report.step` and the
  final status from :meth:`Report.running`; :func:`environment` for its header;
  :func:`run_study` puts them together as a study's ``main``;
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
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from interp.cache import atomic_write

__all__ = [
    "Report",
    "Settings",
    "environment",
    "evenly_spaced",
    "field",
    "jsonable",
    "layer_at",
    "load",
    "load_model",
    "log",
    "progress",
    "read_jsonl",
    "run",
    "run_study",
    "setup",
    "stage",
    "write_json",
]

DEFAULT_MODEL = "smollm2-135m-instruct"


# -- settings: one dataclass per study, every field a flag -----------------------------------
_NO_QUICK = object()


def field(
    default: Any, help: str, *, quick: Any = _NO_QUICK, min: Any = None, **kwargs: Any
) -> Any:
    """A settings field with its ``--flag`` help text and, optionally, its ``--quick`` value
    (``quick=``, kept next to the default it replaces) and the smallest value it accepts
    (``min=``, checked by ``Settings``). Sequences are tuples (frozen)."""
    for value in (default, quick):
        if isinstance(value, list | dict | set):
            raise TypeError("use a tuple for a sequence value (settings are frozen)")
    if quick is not _NO_QUICK:
        kwargs["quick"] = quick
    if min is not None:
        kwargs["min"] = min
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The flags every study takes. A study subclasses it (``@dataclass(frozen=True)``),
    adds its own fields with :func:`field` (defaults = the full run, ``quick=`` the value of
    the ``--quick`` preset); ``QUICK`` holds preset values of fields declared elsewhere (the
    common ones, such as ``seeds``). :meth:`parse` builds the command line from the fields:
    ``batch_size`` is ``--batch-size``, a ``bool`` gets ``--x/--no-x``, a tuple takes several
    values; precedence is explicit flag > ``--quick`` preset > default. Validate in
    ``__post_init__`` (call ``super().__post_init__()``)."""

    QUICK: ClassVar[dict[str, Any]] = {}

    model: str = field(
        DEFAULT_MODEL,
        "embedded name, local path, hub id, or tiny:<family> (random test model)",
    )
    dtype: str = field("float32", f"model dtype: {', '.join(_DTYPES)} (auto: the checkpoint's)")
    device: str = field("cpu", "torch device for the model (cpu, cuda, cuda:1, mps)")
    device_map: str | None = field(
        None, "accelerate device_map for models larger than one device (e.g. auto)"
    )
    data: str | None = field(
        None, "the study's dataset (official format where one exists); default: shipped data"
    )
    batch_size: int = field(8, "rows per forward pass in generation, scoring and capture")
    seeds: tuple[int, ...] = field((0,), "seeds; several give the spread over seeds")
    out: str = field("", "output folder (default runs/<study>)")
    quick: bool = field(False, "the small preset (QUICK) for a fast CPU run")
    threads: int | None = field(None, "torch CPU threads (default min(2, cpu count))")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if "min" in f.metadata and getattr(self, f.name) < f.metadata["min"]:
                got = getattr(self, f.name)
                raise ValueError(f"{self.flag(f.name)} must be >= {f.metadata['min']}, got {got}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: expected one of {', '.join(_DTYPES)}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if self.device_map is not None and self.device != "cpu":
            raise ValueError("give --device or --device-map, not both")

    @property
    def seed(self) -> int:
        """The first seed: the one data splits and single-seed steps use."""
        return self.seeds[0]

    @classmethod
    def flag(cls, name: str) -> str:
        return "--" + name.replace("_", "-")

    @classmethod
    def parser(cls, name: str, description: str | None) -> argparse.ArgumentParser:
        """The ``ArgumentParser`` of this settings class (every field a flag, no defaults set:
        :meth:`parse` merges defaults, the preset and the flags)."""
        p = argparse.ArgumentParser(
            prog=f"examples/{name}.py",
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            argument_default=argparse.SUPPRESS,
        )
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ, optional = _unwrap(hints[f.name])
            text = f.metadata.get("help", "")
            quick = cls.preset().get(f.name, dataclasses.MISSING)
            shown = f"default {f.default!r}" + (
                "" if quick is dataclasses.MISSING else f", quick {quick!r}"
            )
            if "min" in f.metadata:
                shown += f", >= {f.metadata['min']!r}"
            kwargs: dict[str, Any] = {"help": f"{text} ({shown})" if text else shown}
            if typ is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif get_origin(typ) in (tuple, list):
                kwargs.update(nargs="+", type=get_args(typ)[0])
            else:
                kwargs["type"] = _none_or(typ) if optional else typ
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            p.add_argument(cls.flag(f.name), dest=f.name, **kwargs)
        return p

    @classmethod
    def parse(cls, argv: Sequence[str] | None, name: str, description: str | None = None):
        """Settings from the command line (``argv``; ``None`` reads ``sys.argv``)."""
        given = vars(cls.parser(name, description).parse_args(argv))
        values = cls.preset() if given.get("quick") else {}
        values.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
        if not values.get("out"):
            values["out"] = f"runs/{name}"
        return cls(**values)

    @classmethod
    def preset(cls) -> dict[str, Any]:
        """The ``--quick`` values: every field's ``quick=`` plus ``QUICK`` (a field named in
        both, or a ``QUICK`` key that is no field, raises)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(cls.QUICK) - set(fields)
        if unknown:
            raise TypeError(f"{cls.__name__}.QUICK names unknown fields: {sorted(unknown)}")
        own = {n: f.metadata["quick"] for n, f in fields.items() if "quick" in f.metadata}
        both = set(own) & set(cls.QUICK)
        if both:
            raise TypeError(f"{cls.__name__}: {sorted(both)} set by both field(quick=) and QUICK")
        return own | dict(cls.QUICK)

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of a field annotation: ``int | None`` is ``(int, True)``."""
    args = get_args(hint)
    if get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _none_or(typ: Any) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() == "none" else typ(text)

    convert.__name__ = getattr(typ, "__name__", "value")
    return convert


def layer_at(fraction: float, n_layers: int) -> int:
    """The layer at ``fraction`` of the depth (0 = first, 1 = last): study settings name layers
    as fractions so they mean the same on 30 and 80 layers."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"layer fraction must be in [0, 1], got {fraction}")
    return min(n_layers - 1, round(fraction * (n_layers - 1)))


# -- run setup -------------------------------------------------------------------------------
def setup(args: Settings) -> None:
    """Apply ``--threads`` and the (first) seed of :class:`Settings` to torch."""
    import torch

    threads = args.threads or max(1, min(2, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)


def load_model(
    spec: str,
    device: str = "cpu",
    seed: int = 0,
    *,
    dtype: str | None = None,
    device_map: str | None = None,
) -> Any:
    """A ``HookedModel`` from a ``--model`` spec, in ``dtype`` on ``device`` (or spread by
    ``device_map``).

    ``tiny:<family>`` builds ``interp.tiny(family, seed, dtype=...)`` (random weights,
    byte tokenizer, ChatML template); anything else goes to ``interp.load``.
    """
    import interp

    dtype = None if dtype in (None, "float32") else dtype
    if spec.startswith("tiny:"):
        if device_map is not None:
            raise ValueError("--device-map needs a real checkpoint, not a tiny: model")
        model = interp.tiny(spec.split(":", 1)[1], seed=seed, dtype=dtype)
        model.model.to(device)
        return model
    if device_map is not None:
        return interp.load(spec, dtype=dtype, device_map=device_map)
    return interp.load(spec, dtype=dtype, device=device)


def load(settings: Settings, spec: str | None = None) -> Any:
    """:func:`load_model` with a study's ``--dtype``/``--device``/``--device-map`` (``spec``
    defaults to ``--model``; pass another for a second model of a comparison)."""
    return load_model(
        spec or settings.model,
        settings.device,
        settings.seed,
        dtype=settings.dtype,
        device_map=settings.device_map,
    )


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


def environment(args: Settings) -> dict[str, Any]:
    """Versions, device, dtype, GPU name, threads and the load average at the start, for
    ``report.json`` (wall times on a shared CPU depend on the neighbours; the load says how
    busy it was)."""
    import platform

    import torch

    import interp

    gpu = None
    if torch.cuda.is_available() and ("cuda" in str(args.device) or args.device_map):
        gpu = torch.cuda.get_device_name(
            torch.device(args.device) if "cuda" in str(args.device) else 0
        )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "interp": interp.__version__,
        "device": args.device,
        "device_map": args.device_map,
        "dtype": args.dtype,
        "gpu": gpu,
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


# -- resumable stages --------------------------------------------------------------------------
def stage(
    out: str | os.PathLike[str], name: str, key: Mapping[str, Any], compute: Callable[[], Any]
) -> Any:
    """The JSON result of a resumable stage: ``compute()`` once, saved atomically as
    ``out/stages/{name}.json`` with ``key`` (the settings the result depends on); a rerun with
    the same ``key`` reads the file instead of computing, a different ``key`` recomputes.
    Values must be JSON (:func:`jsonable`); returned as read back, so a fresh and a resumed
    run see the same types."""
    path = Path(out) / "stages" / f"{name}.json"
    key = jsonable(key)
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            log(f"stage {name}: resumed from {path}")
            return saved["value"]
        log(f"stage {name}: settings changed, recomputing")
    write_json(path, {"key": key, "value": compute()})
    return json.loads(path.read_text(encoding="utf-8"))["value"]


# -- entry point -------------------------------------------------------------------------------
def run_study(
    name: str,
    question: str,
    settings: Settings,
    argv: Sequence[str] | None,
    body: Callable[[Report], None],
) -> Report:
    """A study's ``main`` after its settings are parsed: a :class:`Report` in
    ``settings.out`` with the question, command line, settings, seed and
    :func:`environment`; ``body(report)`` under :meth:`Report.running`; the report's path
    and wall time logged."""
    report = Report(
        settings.out,
        study=name,
        question=question,
        command=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
        settings=settings.asdict(),
        seed=settings.seed,
        environment=environment(settings),
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

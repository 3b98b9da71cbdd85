"""What the end-to-end tests of ``examples/*.py`` share: importing a study as a module, and
walking the numbers of its ``report.json``."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@contextlib.contextmanager
def example_module(name: str) -> Iterator[ModuleType]:
    """``examples/{name}.py`` imported as module ``name`` (with ``examples/`` on ``sys.path``
    so it finds ``_common``); both are undone on exit."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while being built
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(EXAMPLES))


def numbers(obj: Any, path: str = "report") -> Iterator[tuple[str, float]]:
    """Every numeric leaf of a JSON value, with its path (booleans are not numbers here)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, int | float):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{path}[{i}]")


def non_finite(obj: Any) -> list[str]:
    """Paths of the NaN / inf numbers in a JSON value."""
    return [p for p, v in numbers(obj) if not math.isfinite(v)]


def finite_interval(ci: dict[str, Any]) -> bool:
    """An ``{estimate, low, high}`` interval whose three values are finite numbers."""
    return all(
        isinstance(ci[k], float | int) and math.isfinite(ci[k]) for k in ("estimate", "low", "high")
    )

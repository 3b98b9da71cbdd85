"""MkDocs hook: render ``benchmarks/results/*.json`` into the benchmarks page at build time.

The page holds the marker ``<!-- benchmark-results -->``; each results file becomes a
section. A file may carry its own table(s) as a ``"markdown"`` string (or list of
strings), used verbatim; otherwise timing groups (dicts of variants with ``median_s`` and
``ratio``) become ratio tables and the remaining scalars a key/value table. Nothing is
written to ``docs/``: the numbers always come from the committed JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "<!-- benchmark-results -->"
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
_TIMING_KEYS = {"median_s", "ratio"}


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "…"


def _is_timing_group(node: Any) -> bool:
    return isinstance(node, dict) and any(
        isinstance(v, dict) and set(v) >= _TIMING_KEYS for v in node.values()
    )


def _timing_table(group: dict) -> str:
    lines = ["| variant | median | ratio to baseline (min–max) | rounds |", "|---|---:|---:|---:|"]
    for name, r in group.items():
        if not (isinstance(r, dict) and set(r) >= _TIMING_KEYS):
            continue
        ratio = f"{r['ratio']:.3f}×"
        if "ratio_min" in r and "ratio_max" in r:
            ratio += f" ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
        median = f"{r['median_s'] * 1e3:.2f} ms"
        lines.append(f"| {name} | {median} | {ratio} | {r.get('rounds', '')} |")
    return "\n".join(lines)


def _walk(node: Any, path: tuple[str, ...], timing: list, scalars: list) -> None:
    if _is_timing_group(node):
        timing.append((path, node))
        rest = {
            k: v for k, v in node.items() if not (isinstance(v, dict) and set(v) >= _TIMING_KEYS)
        }
        for k, v in rest.items():
            _walk(v, (*path, str(k)), timing, scalars)
    elif isinstance(node, dict):
        for k, v in node.items():
            _walk(v, (*path, str(k)), timing, scalars)
    elif isinstance(node, list):
        if len(node) <= 8 and all(not isinstance(v, dict | list) for v in node):
            scalars.append((path, ", ".join(_fmt(v) for v in node)))
    else:
        scalars.append((path, _fmt(node)))


def _machine(info: dict) -> str:
    parts = [str(info[k]) for k in ("processor", "platform") if info.get(k)]
    if info.get("cpu_count"):
        parts.append(f"{info['cpu_count']} CPUs")
    if info.get("torch_threads"):
        parts.append(f"{info['torch_threads']} torch threads")
    versions = info.get("versions") or {}
    vs = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    return "; ".join(parts) + (f". Versions: {vs}." if vs else ".")


def render_file(path: Path) -> str:
    """One results file as a Markdown section."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"### {path.stem}\n\n*Could not read `{path.name}`: {exc}.*\n"
    title = payload.get("benchmark", path.stem) if isinstance(payload, dict) else path.stem
    out = [f"### {title}", "", f"From `benchmarks/results/{path.name}`.", ""]
    if not isinstance(payload, dict):
        return "\n".join([*out, "*Unrecognized format.*", ""])
    machine = payload.get("machine")
    if isinstance(machine, dict):
        out += [f"Machine: {_machine(machine)}", ""]
    own = payload.get("markdown")
    if own:
        out += ["\n\n".join(own) if isinstance(own, list) else str(own), ""]
        return "\n".join(out)
    timing: list = []
    scalars: list = []
    body = {k: v for k, v in payload.items() if k not in {"machine", "markdown", "benchmark"}}
    _walk(body, (), timing, scalars)
    for group_path, group in timing:
        if group_path:
            out += [f"**{' › '.join(group_path)}**", ""]
        out += [_timing_table(group), ""]
    if scalars:
        out += ["| quantity | value |", "|---|---:|"]
        out += [f"| {' › '.join(p) or 'value'} | {v} |" for p, v in scalars]
        out.append("")
    return "\n".join(out)


def render_results(results_dir: Path = RESULTS) -> str:
    files = sorted(Path(results_dir).glob("*.json"))
    if not files:
        return (
            "*No results are committed yet.* The numbers are produced by `make bench` "
            "(or by running a suite, e.g. `python benchmarks/hook_overhead.py`), which "
            "writes `benchmarks/results/*.json`; this page renders those files when the "
            "site is built."
        )
    return "\n".join(render_file(f) for f in files)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render_results())
    return markdown

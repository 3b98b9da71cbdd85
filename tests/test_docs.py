"""The documentation: `mkdocs build --strict` passes and the runnable snippets run.

A snippet is runnable when the line before its ```python fence is the marker
``<!-- run -->`` (an HTML comment, invisible on the site). The runnable blocks of one page
run in order in one namespace, like a notebook, in a temporary working directory.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN_MARKER = "<!-- run -->"
# Pages that must carry runnable snippets: one per primitive.
PRIMITIVES = sorted((DOCS / "primitives").glob("*.md"))
STUDIES = [
    "inoculation",
    "kl_span_alignment",
    "constitutional_pipeline",
    "moe_expert_steering",
    "sae_base_chat_delta",
]


def runnable_blocks(markdown: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block preceded by the run marker."""
    lines = markdown.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == RUN_MARKER:
            j = i + 1
            fence = lines[j] if j < len(lines) else ""
            if not re.match(r"^```python\s*$", fence):
                raise AssertionError(f"line {i + 1}: {RUN_MARKER} must precede a ```python fence")
            k = j + 1
            while k < len(lines) and lines[k].strip() != "```":
                k += 1
            if k == len(lines):
                raise AssertionError(f"line {j + 1}: unterminated code block")
            blocks.append((j + 2, "\n".join(lines[j + 1 : k])))
            i = k
        i += 1
    return blocks


def test_marker_parser():
    md = "text\n<!-- run -->\n```python\nx = 1\ny = x\n```\n```python\nnot run\n```\n"
    assert runnable_blocks(md) == [(4, "x = 1\ny = x")]
    with pytest.raises(AssertionError, match="must precede"):
        runnable_blocks("<!-- run -->\n```bash\nls\n```\n")


def _run_page(page, tmp_path, monkeypatch, *, required: bool = True) -> None:
    """Run a page's runnable snippets in order, in one namespace, from ``tmp_path``."""
    blocks = runnable_blocks(page.read_text(encoding="utf-8"))
    if required:
        assert blocks, f"{page.name} has no runnable snippet (mark one with {RUN_MARKER})"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, code in blocks:
        exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)


@pytest.mark.parametrize("page", PRIMITIVES, ids=lambda p: p.stem)
def test_primitive_page_snippets_run(page, tmp_path, monkeypatch):
    _run_page(page, tmp_path, monkeypatch)


COMING_FROM = [
    p
    for p in sorted((DOCS / "coming-from").glob("*.md"))
    if RUN_MARKER in p.read_text(encoding="utf-8")
]


@pytest.mark.slow
@pytest.mark.parametrize("page", COMING_FROM, ids=lambda p: p.stem)
def test_coming_from_page_snippets_run(page, tmp_path, monkeypatch):
    """The migration pages' runnable snippets (on the embedded model) run as written."""
    _run_page(page, tmp_path, monkeypatch, required=False)


EXAMPLES = sorted((DOCS / "examples").glob("*.md"))


@pytest.mark.slow
@pytest.mark.parametrize("page", EXAMPLES, ids=lambda p: p.stem)
def test_example_page_snippets_run(page, tmp_path, monkeypatch):
    """The worked examples' runnable snippets (on the embedded model) run as written, in order."""
    _run_page(page, tmp_path, monkeypatch)


def test_every_primitive_has_a_page():
    stems = {p.stem for p in PRIMITIVES}
    wanted = {
        "load",
        "capture",
        "capture-grads",
        "interventions",
        "chat",
        "directions",
        "training",
        "sae",
        "moe",
        "stats",
        "viz",
    }
    assert wanted <= stems, sorted(wanted - stems)


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out.extend(_nav_files(value) if isinstance(value, list) else [value])
    return out


def test_nav_lists_every_page_and_the_studies():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_files(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages, (sorted(set(pages) - set(nav)), sorted(set(nav) - set(pages)))
    for study in STUDIES:
        assert f"studies/{study}.md" in nav


def _missing_mkdocs() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return module
    return None


def _start_build(site: Path) -> subprocess.Popen:
    site.parent.mkdir(parents=True, exist_ok=True)
    with open(site.parent / "mkdocs.log", "w") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        )


def _finish_build(proc: subprocess.Popen, site: Path) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, (site.parent / "mkdocs.log").read_text(encoding="utf-8")


_BUILD: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _build_in_background(request, tmp_path_factory):
    """Start the site build when the module starts, so it overlaps with the snippets.

    Only when the build test is selected, mkdocs is installed and we are not a
    pytest-xdist worker (each worker would start its own build).
    """
    wanted = any(item.name == "test_mkdocs_build_strict" for item in request.session.items)
    if wanted and not _missing_mkdocs() and not os.environ.get("PYTEST_XDIST_WORKER"):
        site = tmp_path_factory.mktemp("bg") / "site"
        _BUILD["run"] = (_start_build(site), site)
    yield
    run = _BUILD.pop("run", None)
    if run is not None and run[0].poll() is None:
        run[0].kill()
        run[0].wait()


def test_mkdocs_build_strict(tmp_path):
    missing = _missing_mkdocs()
    if missing:
        pytest.skip(f"{missing} is not installed (pip install -e '.[docs]')")
    proc, site = _BUILD.pop("run", None) or (_start_build(tmp_path / "site"), tmp_path / "site")
    code, log = _finish_build(proc, site)
    assert code == 0, log[-4000:]
    assert (site / "index.html").exists()
    api = (site / "api" / "capture" / "index.html").read_text(encoding="utf-8")
    assert "capture_grads" in api  # mkdocstrings rendered the docstrings
    assert ":class:`" not in api  # Sphinx roles were turned into code
    bench = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert "benchmark-results" not in bench  # the hook replaced its marker


def _load_hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "_hooks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_results_render(tmp_path):
    import json

    hook = _load_hook("benchmarks.py")
    assert "make bench" in hook.render_results(tmp_path)  # nothing committed yet
    timing = {"median_s": 0.012, "ratio": 1.04, "ratio_min": 0.99, "ratio_max": 1.2, "rounds": 30}
    payload = {
        "machine": {"cpu_count": 2, "versions": {"torch": "2.13"}},
        "sizes": {"1x16": {"bare forward": {**timing, "ratio": 1.0}, "interp capture": timing}},
        "target": {"met": True},
        "step_s": [0.1] * 50,
    }
    (tmp_path / "hook_overhead.json").write_text(json.dumps(payload))
    (tmp_path / "own.json").write_text(json.dumps({"markdown": "| a |\n|---|\n| 1 |"}))
    page = hook.on_page_markdown(f"# B\n\n{hook.MARKER}\n", None, None, None)
    assert hook.MARKER not in page
    md = hook.render_results(tmp_path)
    assert "| interp capture | 12.00 ms | 1.040× (0.99–1.20) | 30 |" in md
    assert "| target › met | True |" in md and "step_s" not in md
    assert "| a |\n|---|\n| 1 |" in md and "2 CPUs" in md


def test_sphinx_roles_become_code():
    pytest.importorskip("griffe")
    clean = _load_hook("griffe_rst.py").clean
    text = "A :class:`~interp.directions.Direction` from :func:`interp.capture`::\n\n    x"
    assert clean(text) == "A `Direction` from `interp.capture`:\n\n    x"

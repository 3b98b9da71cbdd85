"""Datasets from local files: JSONL / JSON / CSV / TSV / parquet / text files and saved
``datasets`` folders, with a column mapping; GSM8K-style answers.

Everything is read through Hugging Face ``datasets`` (``pip install interp[train]``):
files with pyarrow's readers into an in-memory ``datasets.Dataset`` (no cache files,
no progress bars), folders written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk`` with ``datasets.load_from_disk``. A column mapping
``{"prompt": "question"}`` renames the source column ``question`` to ``prompt``, so code
downstream names the fields it needs and the file keeps its own. A missing file, an
unknown format, a missing column or an ambiguous split raises an error that names the
path and the choices.

GSM8K (Cobbe et al., 2021, "Training Verifiers to Solve Math Word Problems") stores the
worked solution in ``answer``, ending in ``#### <number>``; the official grader
(``grade_school_math/dataset.py`` in openai/grade-school-math) takes the first match of
``#### (-?[0-9.,]+)``, removes commas and compares strings. ``extract_answer`` and
``is_correct`` do exactly that (``None`` where the official code returns
``"[invalid]"``); ``parse_gsm8k`` splits a reference answer into its reasoning and
final answer.
"""

from __future__ import annotations

import difflib
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "FORMATS",
    "GSM8KAnswer",
    "disjoint_splits",
    "extract_answer",
    "is_correct",
    "load_gsm8k",
    "load_records",
    "parse_gsm8k",
    "read_dataset",
    "stratified_fractions",
    "stratified_splits",
    "strip_calculator_annotations",
]

# File suffix -> format name.
FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
}
PathLike = str | os.PathLike[str]


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "interp.data needs the `datasets` package: pip install 'interp[train]'"
        ) from exc
    return datasets


def _from_arrow(table: Any) -> Any:
    datasets = _import_datasets()
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(table))


def _read_text(path: Path, sample_by: str) -> Any:
    import pyarrow as pa

    text = path.read_text(encoding="utf-8")
    if sample_by == "line":
        rows = text.splitlines()
    elif sample_by == "paragraph":
        rows = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    elif sample_by == "document":
        rows = [text]
    else:
        raise ValueError(f"sample_by must be line, paragraph or document, got {sample_by!r}")
    return pa.table({"text": pa.array(rows, type=pa.string())})


def _read_file(path: Path, fmt: str, sample_by: str) -> Any:
    """A pyarrow table from one file."""
    import pyarrow as pa

    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    if fmt == "text":
        return _read_text(path, sample_by)
    try:
        if fmt == "json":
            if path.read_text(encoding="utf-8").lstrip().startswith("["):  # a JSON array
                import json

                rows = json.loads(path.read_text(encoding="utf-8"))
                return pa.Table.from_pylist(rows, schema=_union_schema(rows))
            import pyarrow.json as pj

            return pj.read_json(path)
        if fmt in ("csv", "tsv"):
            import pyarrow.csv as pc

            parse = pc.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
            return pc.read_csv(path, parse_options=parse)
        import pyarrow.parquet as pq

        return pq.read_table(path)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise ValueError(f"{path}: could not read as {fmt}: {exc}") from exc


def _union_schema(rows: list[Any]) -> Any:
    """Schema over all keys of all rows (``from_pylist`` alone uses the first row's keys)."""
    import pyarrow as pa

    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError("a JSON array of records (objects) is expected")
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys}).schema


def _pick_split(dd: Any, split: str | None, path: Path) -> Any:
    names = list(dd.keys())
    if split is None:
        if len(names) == 1:
            return dd[names[0]]
        raise ValueError(f"{path} holds splits {names}: pass split=")
    if split not in dd:
        raise ValueError(f"{path} has no split {split!r}; splits are {names}")
    return dd[split]


def _apply_columns(ds: Any, columns: Mapping[str, str], keep_unmapped: bool, path: Path) -> Any:
    available = list(ds.column_names)
    missing = [src for src in columns.values() if src not in available]
    if missing:
        hints = {
            m: difflib.get_close_matches(m, available, n=1)
            for m in missing
            if difflib.get_close_matches(m, available, n=1)
        }
        hint = "".join(f"; {m!r}: did you mean {h[0]!r}?" for m, h in hints.items())
        raise ValueError(f"{path}: no column(s) {missing}; columns are {available}{hint}")
    sources = list(columns.values())
    if len(set(sources)) != len(sources):
        # One source under two names: copy, since a rename cannot do it.
        table = {new: ds[src] for new, src in columns.items()}
        if keep_unmapped:
            for name in available:
                if name not in sources and name not in table:
                    table[name] = ds[name]
        return _import_datasets().Dataset.from_dict(table)
    clash = [
        new
        for new, src in columns.items()
        if new != src and new in available and new not in sources
    ]
    if clash and keep_unmapped:
        raise ValueError(
            f"{path}: mapping onto existing column(s) {clash} would hide them; rename them "
            "too or pass keep_unmapped=False"
        )
    if not keep_unmapped:
        ds = ds.select_columns(sources)
    renames = {src: new for new, src in columns.items() if new != src}
    return ds.rename_columns(renames) if renames else ds


def read_dataset(
    path: PathLike,
    columns: Mapping[str, str] | None = None,
    *,
    split: str | None = None,
    keep_unmapped: bool = True,
    sample_by: Literal["line", "paragraph", "document"] = "line",
) -> Any:
    """A ``datasets.Dataset`` from a local file or a saved dataset folder.

    Args:
        path: a ``.jsonl`` / ``.json`` (JSON lines or an array of objects), ``.csv``,
            ``.tsv``, ``.parquet`` or ``.txt`` file, or a folder written by
            ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``).
        columns: ``{name_you_want: column_in_the_file}``; the mapped columns are
            renamed. ``None`` keeps the file's names.
        split: which split of a saved ``DatasetDict`` (may be omitted when it has one).
        keep_unmapped: keep the columns not named in ``columns`` (default) or drop them.
        sample_by: for text files: one row per ``line``, per blank-line separated
            ``paragraph`` or one per ``document``; the column is ``text``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.is_dir():
        datasets = _import_datasets()
        try:
            loaded = datasets.load_from_disk(str(p))
        except FileNotFoundError as exc:
            raise ValueError(
                f"{p} is a folder but not a saved dataset (save_to_disk output): {exc}"
            ) from exc
        ds = _pick_split(loaded, split, p) if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        fmt = FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"{p}: unknown format {p.suffix!r}; supported suffixes: {sorted(FORMATS)} "
                "or a saved dataset folder"
            )
        if split is not None:
            raise ValueError(f"{p} is a single file: it has no split {split!r}")
        ds = _from_arrow(_read_file(p, fmt, sample_by))
    if columns:
        ds = _apply_columns(ds, columns, keep_unmapped, p)
    return ds


def load_records(
    path: PathLike,
    columns: Mapping[str, str] | None = None,
    *,
    split: str | None = None,
    keep_unmapped: bool = True,
    sample_by: Literal["line", "paragraph", "document"] = "line",
) -> list[dict[str, Any]]:
    """The rows of ``read_dataset(path, columns, ...)`` as a list of dicts."""
    return read_dataset(
        path, columns, split=split, keep_unmapped=keep_unmapped, sample_by=sample_by
    ).to_list()


# ------------------------------------------------------------------ GSM8K

# The official grader's pattern (grade_school_math/dataset.py).
ANS_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class GSM8KAnswer:
    """A GSM8K reference answer, split.

    Attributes:
        reasoning: the worked solution before the ``####`` line (calculator
            annotations ``<<48/2=24>>`` kept unless stripped).
        answer: the final answer as the official grader compares it: the number after
            ``#### ``, commas removed (``"70000"``).
        value: ``answer`` as a float.
    """

    reasoning: str
    answer: str
    value: float


def extract_answer(completion: str) -> str | None:
    """The final answer of a GSM8K-style text: the first ``#### <number>``, commas
    removed (as the official ``extract_answer``); ``None`` when there is none."""
    match = ANS_RE.search(completion)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


def is_correct(completion: str, reference: str) -> bool:
    """Official GSM8K grading: the completion's extracted answer equals the reference's
    (string equality after removing commas). ``reference`` is the dataset's ``answer``
    field (or just its final number)."""
    gold = extract_answer(reference)
    if gold is None:
        gold = reference.strip().replace(",", "")
        if not re.fullmatch(r"-?[0-9.]+", gold):
            raise ValueError(f"reference has no '#### <number>' and is not a number: {reference!r}")
    return extract_answer(completion) == gold


def strip_calculator_annotations(text: str) -> str:
    """Remove GSM8K's calculator annotations: ``48/2=<<48/2=24>>24`` -> ``48/2=24``."""
    return _CALCULATOR.sub("", text)


def parse_gsm8k(answer: str, *, strip_calculator: bool = False) -> GSM8KAnswer:
    """Split a GSM8K ``answer`` field into the reasoning and the final answer."""
    final = extract_answer(answer)
    if final is None:
        raise ValueError(f"no '#### <number>' in GSM8K answer: {answer[-80:]!r}")
    try:
        value = float(final)
    except ValueError as exc:
        raise ValueError(f"final answer {final!r} is not a number") from exc
    reasoning = answer[: answer.index("####")].rstrip()
    if strip_calculator:
        reasoning = strip_calculator_annotations(reasoning)
    return GSM8KAnswer(reasoning=reasoning, answer=final, value=value)


def load_gsm8k(
    path: PathLike,
    columns: Mapping[str, str] | None = None,
    *,
    split: str | None = None,
    strip_calculator: bool = False,
) -> list[dict[str, Any]]:
    """GSM8K-style records: ``question``, ``answer`` (the final number, as graded),
    ``reasoning`` and ``value``, plus the file's other columns.

    ``columns`` maps ``question`` / ``answer`` to the file's names when they differ
    (e.g. ``{"question": "problem", "answer": "solution"}``). A row whose answer has no
    ``#### <number>`` raises, naming the row.
    """
    columns = {"question": "question", "answer": "answer", **(columns or {})}
    rows = load_records(path, columns, split=split)
    out = []
    for i, row in enumerate(rows):
        try:
            parsed = parse_gsm8k(str(row["answer"]), strip_calculator=strip_calculator)
        except ValueError as exc:
            raise ValueError(f"{path}: row {i}: {exc}") from exc
        out.append(
            {
                **row,
                "answer": parsed.answer,
                "reasoning": parsed.reasoning,
                "value": parsed.value,
            }
        )
    return out


def disjoint_splits(
    items: Sequence[Any], sizes: Mapping[str, int], rng: random.Random | int = 0
) -> dict[str, list[Any]]:
    """Disjoint splits of ``items``: one shuffle (``rng.sample``; an int seeds a
    ``random.Random``), then consecutive slices of the given sizes, in the order of
    ``sizes``. Raises ``ValueError`` when the sizes add up to more than the items."""
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {dict(sizes)}")
    total = sum(sizes.values())
    if total > len(items):
        raise ValueError(f"splits {dict(sizes)} need {total} items; the data has {len(items)}")
    rng = random.Random(rng) if isinstance(rng, int) else rng
    order = rng.sample(list(items), len(items))
    out, start = {}, 0
    for name, n in sizes.items():
        out[name], start = order[start : start + n], start + n
    return out


def stratified_splits(
    items: Sequence[Mapping[str, Any]],
    key: str,
    sizes: Mapping[str, int],
    rng: random.Random | int = 0,
) -> dict[str, list[Any]]:
    """:func:`disjoint_splits` within each group of ``items`` (rows grouped by
    ``row[key]``, groups in sorted order, one shuffle per group): every split gets
    ``sizes[split]`` rows of every group. Raises ``ValueError`` for a group too small."""
    rng = random.Random(rng) if isinstance(rng, int) else rng
    groups: dict[Any, list[Any]] = {}
    for row in items:
        groups.setdefault(row[key], []).append(row)
    out: dict[str, list[Any]] = {name: [] for name in sizes}
    for g in sorted(groups):
        try:
            parts = disjoint_splits(groups[g], sizes, rng)
        except ValueError as e:
            raise ValueError(f"{key} {g!r}: {e}") from None
        for name, rows in parts.items():
            out[name] += rows
    return out


def stratified_fractions(
    items: Sequence[Mapping[str, Any]], key: str, fractions: Sequence[float | int], seed: int = 0
) -> list[list[Any]]:
    """Rows dealt into parts of the given fractions within each group of ``row[key]``.

    Groups are taken in sorted order; each is shuffled (``torch.randperm`` with one
    generator seeded by ``seed`` for all groups) and cut at the rounded cumulative
    fractions of its size, so every part gets about ``fraction × size`` rows of every group.
    A fraction larger than what is left (e.g. ``1`` last) takes the rest; rows past the
    last part's end are in no part. Within a part, rows keep group order, then the
    shuffled order.
    """
    import torch

    if not fractions or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be a non-empty list of numbers >= 0, got {fractions}")
    gen = torch.Generator().manual_seed(seed)
    groups: dict[Any, list[Any]] = {}
    for row in items:
        groups.setdefault(row[key], []).append(row)
    parts: list[list[Any]] = [[] for _ in fractions]
    for g in sorted(groups):
        rows = [groups[g][i] for i in torch.randperm(len(groups[g]), generator=gen).tolist()]
        ends = [round(sum(fractions[: j + 1]) * len(rows)) for j in range(len(fractions))]
        for j, part in enumerate(parts):
            part += rows[(ends[j - 1] if j else 0) : ends[j]]
    return parts

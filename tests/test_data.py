"""interp.data: local files and saved dataset folders with a column mapping; GSM8K answers.

Every file is written by the test itself."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("datasets")

from interp.data import (
    extract_answer,
    is_correct,
    load_gsm8k,
    load_records,
    parse_gsm8k,
    read_dataset,
    strip_calculator_annotations,
)

ROWS = [
    {"id": 1, "question": "What is 2 + 2?", "label": "four"},
    {"id": 2, "question": "Name a colour.", "label": "blue"},
    {"id": 3, "question": "Capital of France?", "label": "Paris"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows, delimiter=","):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json_array", "csv", "tsv", "parquet", "saved"])
def test_every_format_gives_the_same_records_with_a_column_mapping(tmp_path, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif fmt == "json_array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    elif fmt == "csv":
        path = write_csv(tmp_path / "d.csv", ROWS)
    elif fmt == "tsv":
        path = write_csv(tmp_path / "d.tsv", ROWS, delimiter="\t")
    elif fmt == "parquet":
        path = write_parquet(tmp_path / "d.parquet", ROWS)
    else:
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    records = load_records(path, columns={"prompt": "question", "target": "label"})
    assert records == [{"id": r["id"], "prompt": r["question"], "target": r["label"]} for r in ROWS]
    only = load_records(path, columns={"prompt": "question"}, keep_unmapped=False)
    assert only == [{"prompt": r["question"]} for r in ROWS]
    assert load_records(path) == ROWS
    assert read_dataset(path).num_rows == 3


def test_jsonl_rows_with_different_keys_keep_every_column(tmp_path):
    rows = [{"a": 1}, {"a": 2, "b": "x"}]
    assert load_records(write_jsonl(tmp_path / "d.jsonl", rows)) == [
        {"a": 1, "b": None},
        {"a": 2, "b": "x"},
    ]
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(rows), encoding="utf-8")
    assert load_records(arr) == [{"a": 1, "b": None}, {"a": 2, "b": "x"}]


def test_saved_dataset_dict_needs_a_split_when_it_has_several(tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:2]), test=datasets.Dataset.from_list(ROWS[2:])
    ).save_to_disk(str(path))
    assert load_records(path, {"prompt": "question"}, split="test", keep_unmapped=False) == [
        {"prompt": "Capital of France?"}
    ]
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]: pass split="):
        load_records(path)
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_records(path, split="validation")
    single = tmp_path / "single"
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS)).save_to_disk(str(single))
    assert len(load_records(single)) == 3


def test_text_files_by_line_and_paragraph(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nsecond line\n\nthird line\n", encoding="utf-8")
    assert [r["text"] for r in load_records(path)] == [
        "first line",
        "second line",
        "",
        "third line",
    ]
    assert [r["text"] for r in load_records(path, sample_by="paragraph")] == [
        "first line\nsecond line",
        "third line",
    ]
    assert load_records(path, {"document": "text"}, sample_by="document") == [
        {"document": "first line\nsecond line\n\nthird line\n"}
    ]


def test_errors_name_the_path_and_the_choices(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no column\(s\) \['questoin'\].*did you mean 'question'"):
        load_records(path, columns={"prompt": "questoin"})
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"unknown format '\.xlsx'"):
        load_records(tmp_path / "d.xlsx")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: could not read as json"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a saved dataset"):
        load_records(tmp_path / "folder")
    with pytest.raises(ValueError, match="single file"):
        load_records(path, split="train")
    # Renaming onto a column that exists would silently hide it.
    with pytest.raises(ValueError, match=r"existing column\(s\) \['label'\]"):
        load_records(path, columns={"label": "question"})
    assert load_records(path, columns={"label": "question"}, keep_unmapped=False)[0] == {
        "label": "What is 2 + 2?"
    }


def test_one_source_column_under_two_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    rec = load_records(path, columns={"prompt": "question", "text": "question"})[0]
    assert rec["prompt"] == rec["text"] == "What is 2 + 2?" and rec["label"] == "four"


# ------------------------------------------------------------------ GSM8K

GSM = {
    "question": "Josh buys a house for $80,000 and puts in $50,000 in repairs. ...",
    "answer": (
        "The cost came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
        "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70,000"
    ),
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 18", "18"),
        ("so 70,000 in all\n#### 70,000", "70000"),  # commas removed
        ("#### -5", "-5"),
        ("#### 2.50", "2.50"),  # string as in the official grader: not "2.5"
        ("#### 3\n#### 4", "3"),  # the first match
        ("The answer is 18.", None),
        ("####18", None),  # the official pattern needs the space
    ],
)
def test_extract_answer_follows_the_official_grader(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_and_parse_gsm8k():
    assert is_correct("Total: 70,000 dollars.\n#### 70000", GSM["answer"])
    assert is_correct("#### 70,000", "70000")
    assert not is_correct("#### 70000.0", GSM["answer"])  # official: string comparison
    assert not is_correct("70000", GSM["answer"])  # no '####' -> invalid -> wrong
    with pytest.raises(ValueError, match="not a number"):
        is_correct("#### 1", "seventy")
    parsed = parse_gsm8k(GSM["answer"])
    assert (parsed.answer, parsed.value) == ("70000", 70000.0)
    assert parsed.reasoning.endswith("=$<<200000-130000=70000>>70,000")
    assert "<<" not in parse_gsm8k(GSM["answer"], strip_calculator=True).reasoning
    assert strip_calculator_annotations("2/2=<<2/2=1>>1 bolt") == "2/2=1 bolt"
    with pytest.raises(ValueError, match="no '#### <number>'"):
        parse_gsm8k("no final answer")


def test_load_gsm8k_with_renamed_columns(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm.jsonl",
        [{"problem": GSM["question"], "solution": GSM["answer"], "idx": 0}],
    )
    (row,) = load_gsm8k(path, {"question": "problem", "answer": "solution"})
    assert row["question"] == GSM["question"] and row["idx"] == 0
    assert (row["answer"], row["value"]) == ("70000", 70000.0)
    assert row["reasoning"].startswith("The cost came out")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "42"}])
    with pytest.raises(ValueError, match="row 0"):
        load_gsm8k(bad)

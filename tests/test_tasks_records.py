"""Shared task reader: every row knows its file and line, so bad input is reported where it is."""
import json

import pytest

from polypeft.tasks.records import TaskDataError, read_records


def test_jsonl_rows_carry_their_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n', encoding="utf-8")
    records = read_records(path, ["text", "label"])
    assert [r.data["text"] for r in records] == ["a", "b"]
    assert [r.line for r in records] == [1, 3]
    assert records[1].where == f"{path} line 3"


def test_json_list_reports_the_line_of_each_object(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "x {"}, {"text": "y \\\" }"}, {"nope": 1}], indent=1), encoding="utf-8")
    with pytest.raises(TaskDataError, match=rf"data.json line {_line_of(path, 'nope') - 1}: missing column"):
        read_records(path, ["text"])


def _line_of(path, needle):
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


def test_tsv_wrong_field_count_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("source\ttarget\nhola\thello\nsolo uno\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"pairs.tsv line 3: 1 tab-separated fields, expected 2"):
        read_records(path)


def test_bad_json_line_and_unknown_format(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(TaskDataError, match="broken.jsonl line 2: not valid JSON"):
        read_records(path)
    other = tmp_path / "data.parquet"
    other.write_bytes(b"")
    with pytest.raises(TaskDataError, match="unknown format 'parquet'"):
        read_records(other)


def test_in_memory_rows_are_numbered_as_rows():
    with pytest.raises(TaskDataError, match=r"<list> row 2: missing column\(s\) \['label'\]"):
        read_records([{"text": "a", "label": 0}, {"text": "b"}], ["text", "label"])

"""Parallel TSV/JSONL files: good lines, blank lines, malformed lines with file:line, skip-and-count."""
import json

import pytest

from polypeft.data.parallel import (
    ParallelExample,
    ParallelFormatError,
    read_jsonl,
    read_parallel,
    read_tsv,
    write_jsonl,
    write_tsv,
)
from polypeft.core.languages import LanguageError


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_tsv_reads_good_lines_skips_header_and_blank_lines(tmp_path):
    path = write(tmp_path / "a.tsv", ["src_lang\ttgt_lang\tsrc\ttgt", "en\tde\tGod\tGott", "", "   ", "de\ten\tWort\tWord"])
    result = read_tsv(path)
    assert result.skipped == 0 and result.problems == []
    assert [(e.src_lang, e.tgt_lang, e.src, e.tgt) for e in result.examples] == [
        ("en", "de", "God", "Gott"), ("de", "en", "Wort", "Word"),
    ]
    assert result.examples[1].ref == f"{path}:5"  # where it came from, for error reports downstream


def test_tsv_tab_inside_text_is_a_malformed_line_with_file_and_line(tmp_path):
    path = write(tmp_path / "b.tsv", ["en\tde\tGod\tGott", "en\tde\tone\ttab\tinside"])
    with pytest.raises(ParallelFormatError, match=rf"{path}:2: expected 4 .*found 5.*JSONL"):
        read_tsv(path)
    result = read_tsv(path, on_error="skip")
    assert len(result.examples) == 1 and result.skipped == 1
    assert result.problems[0].startswith(f"{path}:2:")


def test_tsv_empty_field_is_malformed(tmp_path):
    path = write(tmp_path / "c.tsv", ["en\tde\t \tGott"])
    with pytest.raises(ParallelFormatError, match=r":1: field 'src' is empty"):
        read_tsv(path)


def test_jsonl_reads_and_reports_bad_json_with_file_and_line(tmp_path):
    good = {"src_lang": "en", "tgt_lang": "ko", "src": "a\ttab is fine here", "tgt": "하나", "ref": "43:1:1", "extra": 1}
    path = write(tmp_path / "d.jsonl", [
        json.dumps(good, ensure_ascii=False),
        "",
        '{"src_lang": "en", "tgt_lang": "de", "src": "broken',
        json.dumps({"src_lang": "en", "tgt_lang": "de", "src": "x"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"src_lang": "en", "tgt_lang": "de", "src": "x", "tgt": 5}),
    ])
    with pytest.raises(ParallelFormatError, match=rf"{path}:3: not valid JSON"):
        read_jsonl(path)
    result = read_jsonl(path, on_error="skip")
    assert result.examples == [ParallelExample("en", "ko", "a\ttab is fine here", "하나", "43:1:1")]
    assert result.skipped == 4
    assert [p.split(": ", 1)[0] for p in result.problems] == [f"{path}:{n}" for n in (3, 4, 5, 6)]
    assert "missing keys ['tgt']" in result.problems[1]
    assert "expected a JSON object" in result.problems[2]
    assert "'tgt' must be a string" in result.problems[3]


def test_unknown_language_is_fatal_even_when_skipping(tmp_path):
    path = write(tmp_path / "e.jsonl", [json.dumps({"src_lang": "en", "tgt_lang": "xx", "src": "a", "tgt": "b"})])
    with pytest.raises(LanguageError, match=rf"{path}:1: unknown tgt_lang 'xx'.*\['de', 'en'\]"):
        read_jsonl(path, on_error="skip", allowed_langs={"en", "de"})
    assert len(read_jsonl(path).examples) == 1  # no allowed set: any code is accepted


def test_bad_on_error_and_suffix_are_refused(tmp_path):
    path = write(tmp_path / "f.tsv", ["en\tde\ta\tb"])
    with pytest.raises(ValueError, match="'ignore'.*'skip', 'raise'"):
        read_tsv(path, on_error="ignore")
    with pytest.raises(ValueError, match="'.csv'"):
        read_parallel(tmp_path / "f.csv")


def test_write_then_read_round_trips(tmp_path):
    examples = [ParallelExample("en", "fr", "God", "Dieu", "1:1:1"), ParallelExample("fr", "en", "Verbe", "Word", "1:1:2")]
    tsv = write_tsv(tmp_path / "out.tsv", examples, header=True)
    assert [(e.src, e.tgt) for e in read_parallel(tsv).examples] == [("God", "Dieu"), ("Verbe", "Word")]
    jsonl = write_jsonl(tmp_path / "out.jsonl", examples)
    assert read_parallel(jsonl).examples == examples
    with pytest.raises(ValueError, match="tab or newline in \\['src'\\].*write_jsonl"):
        write_tsv(tmp_path / "bad.tsv", [ParallelExample("en", "fr", "a\tb", "c")])
    assert not (tmp_path / "bad.tsv").exists()

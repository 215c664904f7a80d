"""Issue 16 item 9: every data reader names file and line for bad bytes and bad rows, and reads BOMs and bare CRs right."""
from __future__ import annotations

import json

import pytest

from polypeft.data.parallel import ParallelFormatError, read_jsonl, read_tsv
from polypeft.tasks.classification import read_classification
from polypeft.tasks.qa import read_qa
from polypeft.tasks.records import TaskDataError, read_records
from polypeft.tasks.retrieval import read_bitext
from polypeft.tasks.tokens import read_conll, read_tokens

BAD_BYTE = b"\xff"
BOM = b"\xef\xbb\xbf"


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def jsonl(*rows) -> bytes:
    return b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)


QA_ROW = {"id": "q1", "question": "Where?", "context": "In Paris.", "answers": {"text": ["Paris"], "answer_start": [3]}}
# name -> (file name, file bytes with a bad byte on line 2, reader)
BAD_UTF8 = {
    "records-jsonl": ("r.jsonl", jsonl({"a": "x"}) + b'{"a": "' + BAD_BYTE + b'"}\n', lambda p: read_records(p)),
    "records-tsv": ("r.tsv", b"a\tb\nx" + BAD_BYTE + b"\ty\n", lambda p: read_records(p)),
    "records-json": ("r.json", b'[{"a": "x"},\n{"a": "' + BAD_BYTE + b'"}]\n', lambda p: read_records(p)),
    "classification": ("c.tsv", b"text\tlabel\ngood" + BAD_BYTE + b"\tpos\n", lambda p: read_classification(p)),
    "tokens-jsonl": ("t.jsonl", jsonl({"tokens": ["a"], "ner_tags": [0]}) + b'{"tokens": ["' + BAD_BYTE + b'"]}\n',
                     lambda p: read_tokens(p)),
    "conll": ("t.conll", b"Paris\tB-LOC\nis" + BAD_BYTE + b"\tO\n", lambda p: read_conll(p)),
    "qa-flat": ("q.jsonl", jsonl(QA_ROW) + b'{"id": "' + BAD_BYTE + b'"}\n', lambda p: read_qa(p)),
    "qa-squad": ("q.json", b'{"data":\n["' + BAD_BYTE + b'"]}\n', lambda p: read_qa(p)),
    "bitext": ("b.tsv", b"source\ttarget\nhouse\tmai" + BAD_BYTE + b"son\n", lambda p: read_bitext(p)),
    "parallel-tsv": ("p.tsv", b"en\tfr\thouse\tmai" + BAD_BYTE + b"son\n", lambda p: read_tsv(p)),
}


@pytest.mark.parametrize("reader", BAD_UTF8)
def test_invalid_utf8_names_file_and_line(reader, tmp_path):
    name, data, read = BAD_UTF8[reader]
    path = write(tmp_path / name, data)
    line = 1 if reader in ("parallel-tsv",) else 2
    separator = ":" if reader.startswith("parallel") else " line "
    with pytest.raises(ValueError, match=rf"{name}{separator}{line}: not valid UTF-8 \(byte 0xff at column \d+\)"):
        read(path)


def test_parallel_readers_skip_an_undecodable_line_when_asked(tmp_path):
    good = {"src_lang": "en", "tgt_lang": "fr", "src": "house", "tgt": "maison"}
    path = write(tmp_path / "p.jsonl", jsonl(good) + b'{"src": "' + BAD_BYTE + b'"}\n' + jsonl(good))
    result = read_jsonl(path, on_error="skip")
    assert len(result.examples) == 2 and result.skipped == 1
    assert "p.jsonl:2: not valid UTF-8" in result.problems[0]
    assert [e.ref for e in result.examples] == [f"{path}:1", f"{path}:3"]
    with pytest.raises(ParallelFormatError, match=r"p.jsonl:2: not valid UTF-8"):
        read_jsonl(path)
    tsv = write(tmp_path / "p.tsv", b"en\tfr\ta\tb\nen\tfr\t" + BAD_BYTE + b"\tb\nen\tfr\tc\td\n")
    assert [e.src for e in read_tsv(tsv, on_error="skip").examples] == ["a", "c"]


def test_a_bom_is_not_part_of_the_first_line(tmp_path):
    records = read_records(write(tmp_path / "r.tsv", BOM + b"text\tlabel\ngood\tpos\n"))
    assert [r.data for r in records] == [{"text": "good", "label": "pos"}]
    parallel = read_tsv(write(tmp_path / "p.tsv", BOM + b"src_lang\ttgt_lang\tsrc\ttgt\nen\tfr\ta\tb\n"))
    assert [(e.src, e.tgt) for e in parallel.examples] == [("a", "b")], "the header is a header, not an example"
    assert read_jsonl(write(tmp_path / "p.jsonl", BOM + jsonl({"src_lang": "en", "tgt_lang": "fr", "src": "a",
                                                                 "tgt": "b"}))).examples[0].src_lang == "en"
    assert read_records(write(tmp_path / "r.json", BOM + b'[{"a": 1}]'))[0].data == {"a": 1}
    squad = {"data": [{"paragraphs": [{"context": "In Paris.", "qas": [{"id": "q", "question": "Where?",
                                                                       "answers": [{"text": "Paris", "answer_start": 3}]}]}]}]}
    assert read_qa(write(tmp_path / "s.json", BOM + json.dumps(squad).encode()))[0].answers == ("Paris",)
    assert read_conll(write(tmp_path / "t.conll", BOM + b"Paris\tB-LOC\n")).sentences[0].tokens == ["Paris"]


def test_a_bare_carriage_return_stays_inside_its_tsv_field(tmp_path):
    path = write(tmp_path / "r.tsv", b"text\tlabel\ngood\rmovie\tpos\nbad\tneg\textra\n")
    with pytest.raises(TaskDataError, match=r"r.tsv line 3: 3 tab-separated fields"):
        read_records(path)
    records = read_records(write(tmp_path / "ok.tsv", b"text\tlabel\r\ngood\rmovie\tpos\r\nbad\tneg\r\n"))
    assert [(r.data["text"], r.line) for r in records] == [("good\rmovie", 2), ("bad", 3)]
    parallel = write(tmp_path / "p.tsv", b"en\tfr\tgood\rday\tbon jour\nen\tfr\tonly three\n")
    with pytest.raises(ParallelFormatError, match=r"p.tsv:2: expected 4 tab-separated columns"):
        read_tsv(parallel)
    bitext = read_bitext(write(tmp_path / "b.tsv", b"source\ttarget\na\rb\tc\n"))
    assert bitext == (["a\rb"], ["c"])


def squad(answers=None, paragraphs=None, data=None) -> dict:
    qa = {"id": "q1", "question": "Where?", "answers": answers or [{"text": "Paris", "answer_start": 3}]}
    paragraph = {"context": "In Paris.", "qas": [qa]}
    return {"data": data if data is not None else [{"paragraphs": paragraphs if paragraphs is not None else [paragraph]}]}


@pytest.mark.parametrize("document, message", [
    (squad(answers=[{"text": "Paris", "answer_start": "zero"}]),
     r"s.json line \d+ \(data\[0\].paragraphs\[0\].qas\[0\], id 'q1'\): answer_start 'zero' of answer 'Paris' must be an integer"),
    (squad(answers=[{"text": "Paris", "answer_start": 1.7}]), r"s.json line \d+ .*answer_start 1.7 .* must be an integer"),
    (squad(answers=[{"text": "Paris", "answer_start": True}]), r"answer_start True .* must be an integer"),
    (squad(paragraphs=5), r"s.json data\[0\].paragraphs: expected a list of objects, got int 5"),
    (squad(data=[5]), r"s.json data\[0\]: expected a JSON object, got int 5"),
    (squad(data=5), r"s.json data: expected a list of objects, got int 5"),
    (squad(paragraphs=[{"context": "In Paris.", "qas": ["q"]}]), r"s.json data\[0\].paragraphs\[0\].qas\[0\]: expected a JSON object"),
])
def test_malformed_squad_rows_name_file_and_location(document, message, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(TaskDataError, match=message):
        read_qa(path)


def test_flat_qa_rows_with_a_non_integer_answer_start_name_the_line(tmp_path):
    row = dict(QA_ROW, answers={"text": ["Paris"], "answer_start": ["3"]})
    path = write(tmp_path / "q.jsonl", jsonl(QA_ROW, row))
    with pytest.raises(TaskDataError, match=r"q.jsonl line 2: answer_start '3' of answer 'Paris' must be an integer"):
        read_qa(path)

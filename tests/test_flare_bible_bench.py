"""The FLARE Bible bench tests on verses its translation run never trained on: the run's test books alone.

Without a translation run the split is the canon-section task's own, as before.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from polypeft.experiments.bible_eval import verse_classification
from test_tasks_bible_eval import FakeCorpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import flare_bible as bench  # noqa: E402  (a bench script: fails loudly if it breaks)


def book_of(row: dict) -> int:
    return int(row["en"].split()[-1])  # FakeCorpus ends each verse with its book number


def fake_translation_run(folder: Path, test_books: list[int]) -> str:
    """A folder read as a trained `polypeft mmt` run: its recipe is all the split reads."""
    folder.mkdir()
    (folder / "recipe.json").write_text(json.dumps({"languages": ["en", "fr"], "test_books": test_books,
                                                    "valid_books": [49]}))
    (folder / "model.safetensors").write_text("")
    return str(folder)


def test_with_a_translation_run_the_test_verses_come_from_its_test_books_alone():
    corpus = FakeCorpus()
    train, test = bench.load_rows("fr", 4, 3, test_books=[1, 43], corpus=corpus)
    assert {book_of(row) for row in test} == {1, 43}
    assert sorted(row["label"] for row in test) == [0, 0, 0, 4, 4, 4]  # law and gospels_acts, 3 verses each
    assert not {book_of(row) for row in train} & {1, 43}, "the classifier trains on no test-book verse either"
    assert len(train) == len(bench.load_rows("fr", 4, 3, corpus=corpus)[0]), "as many training verses as before"


def test_without_a_translation_run_the_split_is_unchanged():
    train, test = bench.load_rows("fr", 4, 3, corpus=FakeCorpus())
    data = verse_classification(["en", "fr"], valid_fraction=0.0, test_fraction=3 / 7, seed=0,
                                max_verses_per_section=7, corpus=FakeCorpus())
    assert [row["en"] for row in test] == [example.text for example in data["test"]["en"].examples]
    assert sorted(row["en"] for row in train) == sorted(example.text for example in data["train"]["en"].examples)
    assert bench.translation_test_books(None, ["fr"]) is None


def test_test_books_of_one_section_are_refused_naming_them(tmp_path):
    john = fake_translation_run(tmp_path / "john", [43])
    with pytest.raises(ValueError, match=r"test_books=\[43\] alone \(sections \['gospels_acts'\]\)"):
        bench.translation_test_books(john, ["fr"])
    assert bench.translation_test_books(fake_translation_run(tmp_path / "wide", [1, 43]), ["fr"]) == [1, 43]

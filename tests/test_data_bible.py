"""Bible corpus: version policy, cleaning, splits, verse alignment and English-centric pairs."""
import sqlite3

import pytest

from polypeft.data.bible import (
    BIBLE_VERSIONS,
    COPYRIGHTED_VERSIONS,
    ENGLISH_VERSIONS,
    BibleCorpus,
    BibleSplit,
    BibleVersionError,
    clean_verse,
    parse_ref,
    resolve_version,
)
from polypeft.data.parallel import ParallelExample, english_centric
from polypeft.core.languages import LanguageError


@pytest.fixture
def tiny_db(tmp_path):
    """A three-verse database in the real schema, with markup and placeholders to clean."""
    path = tmp_path / "bible.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, vText TEXT)")
    connection.execute("CREATE TABLE bibleRef (bbName TEXT, bNumber INTEGER, bName TEXT, bsName TEXT)")
    rows = [
        ("4", 43, 1, 1, "In the beginning was the Word, [and] the Word was with God."),
        ("4", 43, 1, 2, "The same was in the beginning with God."),
        ("4", 49, 1, 1, "Paul, an apostle."),
        ("e", 43, 1, 1, "Im Anfang war das Wort,\n\t\t\t"),
        ("e", 43, 1, 2, "* * *"),  # placeholder: dropped
        ("e", 49, 1, 1, "Paulus, Apostel."),
        ("1", 43, 1, 1, "copyrighted text"),
    ]
    connection.executemany(
        "INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", [(i, *row) for i, row in enumerate(rows)]
    )
    connection.executemany("INSERT INTO bibleRef VALUES (?, ?, ?, ?)", [("4", 43, "John", "Jn"), ("e", 43, "Johannes", "Joh")])
    connection.commit()
    connection.close()
    return path


def test_version_table_matches_the_allowed_list():
    assert BIBLE_VERSIONS["en"] == "4" and ENGLISH_VERSIONS == {"web": "4", "kjv": "k", "bbe": "3"}
    assert set(BIBLE_VERSIONS) == {"en", "fr", "es", "de", "it", "pt", "ru", "ar", "fa", "ko", "vi", "tl"}
    assert not set(BIBLE_VERSIONS.values()) & COPYRIGHTED_VERSIONS


@pytest.mark.parametrize("code", sorted(COPYRIGHTED_VERSIONS))
def test_copyrighted_versions_are_refused(code):
    for spelling in (code, f"version:{code}"):
        with pytest.raises(BibleVersionError, match="copyrighted"):
            resolve_version(spelling)


def test_versions_outside_the_allowed_set_are_refused():
    with pytest.raises(BibleVersionError, match=r"'o'.*not in polypeft's allowed set"):
        resolve_version("version:o")


def test_unknown_language_names_the_code_and_the_allowed_ones():
    with pytest.raises(LanguageError, match=r"'xx'.*'de'.*'kjv'"):
        resolve_version("xx")


def test_english_versions_and_version_codes_resolve():
    assert resolve_version("kjv") == "k"
    assert resolve_version("version:3") == "3"
    assert resolve_version("ko") == "n"


def test_split_membership_and_validation():
    split = BibleSplit()
    assert split.part_of(43) == "test" and split.part_of(49) == "valid" and split.part_of(1) == "train"
    assert len(split.books("train")) == 64 and split.books("test") == (43,)
    custom = BibleSplit(test_books=(1, 2), valid_books=(3,))
    assert custom.part_of(43) == "train" and custom.part_of(2) == "test"
    with pytest.raises(ValueError, match=r"\[43\].*both"):
        BibleSplit(test_books=(43,), valid_books=(43,))
    with pytest.raises(ValueError, match="67"):
        BibleSplit(test_books=(67,))


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("he shall be guilty in one of these [things].", "he shall be guilty in one of these things."),
        ("\t Y Jehová habló á Moisés, diciendo:", "Y Jehová habló á Moisés, diciendo:"),
        ("(9:1) Au chef des chantres. (9:2) Je louerai", "Au chef des chantres. Je louerai"),
        ("(ADDED FROM KJV: The song of songs. => Песня Песней Соломона.)", "Песня Песней Соломона."),
        ("(Missing KJV: For the Son of man is come. >> 인자는 오셨습니다.)", "인자는 오셨습니다."),
        ("(MISSING) [KJV: And Philip said.] From Schlachter: Da sprach Philippus.", "Da sprach Philippus."),
        ("الرب الهكم*****لذلك", "الرب الهكملذلك"),
        ("пред лицoм Господа", "пред лицом Господа"),
        ("يجوز\u200e.", "يجوز."),
        ("***", ""), ("[]", ""), ("-", ""), ("(앞절과 동일)", ""), ("12절과 상동", ""),
        ("Verszeile ohne Text", ""), ("dummy verses inserted by amos", ""),
    ],
)
def test_clean_verse(raw, clean):
    assert clean_verse(raw) == clean


def test_reader_on_a_small_database(tiny_db):
    corpus = BibleCorpus(tiny_db)
    english = corpus.verses("en")
    assert english[(43, 1, 1)] == "In the beginning was the Word, and the Word was with God."
    assert corpus.verses("de") == {(43, 1, 1): "Im Anfang war das Wort,", (49, 1, 1): "Paulus, Apostel."}
    assert corpus.verses("en", books=[49]) == {(49, 1, 1): "Paul, an apostle."}
    rows = corpus.parallel(["en", "de"])
    # 43:1:2 is a placeholder in German, so only verses present in both languages remain.
    assert [row["ref"] for row in rows] == ["43:1:1", "49:1:1"]
    assert rows[0]["de"] == "Im Anfang war das Wort,"
    assert corpus.parallel(["en", "de"], max_verses=1) == rows[:1]
    assert corpus.books("de") == {43: "Johannes"}
    with pytest.raises(BibleVersionError):
        corpus.verses("version:1")
    with pytest.raises(ValueError, match="twice"):
        corpus.parallel(["en", "en"])


def test_english_centric_makes_both_directions():
    rows = [{"en": "God", "de": "Gott", "fr": "Dieu", "ref": "1:1:1"}, {"en": "Word", "de": "Wort", "fr": "Verbe", "ref": "1:1:2"}]
    examples = english_centric(rows, ["en", "de", "fr"])
    assert len(examples) == 8
    directions = {e.direction for e in examples}
    assert directions == {("en", "de"), ("de", "en"), ("en", "fr"), ("fr", "en")}
    assert ParallelExample("de", "en", "Wort", "Word", "1:1:2") in examples
    with pytest.raises(KeyError, match=r"'ru'"):
        english_centric(rows, ["en", "ru"])


@pytest.mark.slow
def test_real_corpus_john_is_verse_aligned():
    corpus = BibleCorpus()
    langs = ["en", "fr", "es", "de", "ru", "ar", "ko"]
    rows = corpus.parallel(langs, books=[43])
    assert 870 <= len(rows) <= 879  # John has 879 verses; a few are placeholders in some version
    john_3_16 = next(row for row in rows if row["ref"] == "43:3:16")
    assert "God" in john_3_16["en"] and "Dieu" in john_3_16["fr"] and "Gott" in john_3_16["de"]
    assert "Бог" in john_3_16["ru"] and "الله" in john_3_16["ar"] and "하나님" in john_3_16["ko"]
    assert all(parse_ref(row["ref"])[0] == 43 for row in rows)
    assert all(row[lang].strip() == row[lang] and row[lang] for row in rows for lang in langs)
    assert not any("[" in row["en"] or "\t" in row["es"] for row in rows)
    assert corpus.books("fr")[43] == "Jean"
    kjv = corpus.verses("kjv", books=[43])
    assert "begotten" in kjv[(43, 3, 16)] and "begotten" not in john_3_16["en"]


@pytest.mark.slow
def test_real_corpus_held_out_books_do_not_leak_into_train():
    corpus = BibleCorpus()
    split = BibleSplit()
    train = corpus.parallel(["en", "ko"], books=split.books("train"), max_verses=500)
    test = corpus.parallel(["en", "ko"], books=split.books("test"))
    assert len(train) == 500 and {split.part_of(parse_ref(r["ref"])[0]) for r in train} == {"train"}
    assert {split.part_of(parse_ref(r["ref"])[0]) for r in test} == {"test"}

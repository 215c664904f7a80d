"""SentencePiece: trains on a tiny corpus, caches by settings, tags are single pieces, ids round-trip."""
import json
import sqlite3

import pytest
import sentencepiece

from polypeft.data.bible import BibleCorpus, BibleSplit
from polypeft.data.spm import BOS_ID, EOS_ID, PAD_ID, SpmTokenizer, bible_spm, lang_tag, train_spm

SENTENCES = {
    "en": ["In the beginning God created the heavens and the earth.", "The earth was formless and empty.",
           "God said, Let there be light, and there was light.", "God saw the light, and saw that it was good."],
    "de": ["Im Anfang schuf Gott die Himmel und die Erde.", "Und die Erde war wüst und leer.",
           "Und Gott sprach: Es werde Licht! und es ward Licht.", "Und Gott sah das Licht, daß es gut war."],
    "ko": ["태초에 하나님이 천지를 창조하시니라", "땅이 혼돈하고 공허하며",
           "하나님이 가라사대 빛이 있으라 하시매 빛이 있었고", "그 빛이 하나님의 보시기에 좋았더라"],
}


@pytest.fixture
def tiny_bible(tmp_path):
    """Genesis 1:1-4 in three languages as book 1, and a held-out verse in book 43."""
    path = tmp_path / "bible.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, vText TEXT)")
    rows = []
    for version, lang in (("4", "en"), ("e", "de"), ("n", "ko")):
        for verse, text in enumerate(SENTENCES[lang] * 5, start=1):
            rows.append((len(rows), version, 1, 1, verse, text))
        rows.append((len(rows), version, 43, 1, 1, "Zebulon quixotic xylophone"))  # test book only
    connection.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", rows)
    connection.commit()
    connection.close()
    return BibleCorpus(path)


def test_train_encode_decode_and_tags(tmp_path):
    sentences = [s for lang in SENTENCES for s in SENTENCES[lang]] * 5
    tokenizer = train_spm(sentences, ["en", "de", "ko"], tmp_path / "m.model", vocab_size=100)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (PAD_ID, BOS_ID, EOS_ID) == (0, 2, 3)
    assert tokenizer.decoder_start_id == tokenizer.bos_id and tokenizer.vocab_size == len(tokenizer) == 100
    assert tokenizer.languages == ["en", "de", "ko"]
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    for lang in ("en", "de", "ko"):
        # A tag is one piece even when it appears inside raw text.
        assert lang_tag(lang) in processor.encode(f"x {lang_tag(lang)} y", out_type=str)
    text = SENTENCES["de"][2]
    ids = tokenizer.encode(text, lang_tag="ko")
    assert ids[0] == tokenizer.lang_tag_id("ko") and ids[-1] == EOS_ID
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [PAD_ID, -100]) == text
    assert tokenizer.decode(tokenizer.encode(SENTENCES["ko"][0])) == SENTENCES["ko"][0]
    with pytest.raises(KeyError, match=r"'fr'.*\['en', 'de', 'ko'\]"):
        tokenizer.encode("x", lang_tag="fr")
    # Called like a transformers tokenizer: right-padded rows equal to encode(), a mask over the real ids.
    batch = tokenizer([SENTENCES["en"][0], SENTENCES["de"][1]], max_length=8)
    first = tokenizer.encode(SENTENCES["en"][0])[:8]
    second = tokenizer.encode(SENTENCES["de"][1])[:8]
    assert batch["input_ids"][0, :len(first)].tolist() == first
    assert batch["input_ids"][1, :len(second)].tolist() == second
    assert batch["attention_mask"].sum(1).tolist() == [len(first), len(second)]
    assert tokenizer.pad_token == "<pad>"
    saved = tokenizer.save(tmp_path / "copy" / "tok.model")
    assert SpmTokenizer.load(saved).encode(text) == tokenizer.encode(text)


def test_bible_spm_trains_on_train_books_and_caches(tiny_bible, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = bible_spm(["en", "de", "ko"], vocab_size=100, cache_dir=cache, corpus=tiny_bible)
    model_files = sorted(cache.glob("*.model"))
    assert len(model_files) == 1 and model_files[0].with_suffix(".json").is_file()
    assert not list(cache.glob(".*")), "no temporary files may be left behind"
    mtime = model_files[0].stat().st_mtime_ns
    # Held-out book 43 never reaches training: 3 languages x 20 verses of book 1, nothing more.
    assert json.loads(model_files[0].with_suffix(".json").read_text())["sentences"] == 60

    def refuse(*args, **kwargs):
        raise AssertionError("the cached model should have been reused")

    monkeypatch.setattr(sentencepiece.SentencePieceTrainer, "train", refuse)
    second = bible_spm(["en", "de", "ko"], vocab_size=100, cache_dir=cache, corpus=tiny_bible)
    assert second.model_path == first.model_path and model_files[0].stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="reused"):  # a different key trains anew
        bible_spm(["en", "de", "ko"], vocab_size=90, cache_dir=cache, corpus=tiny_bible)
    with pytest.raises(AssertionError, match="reused"):
        bible_spm(["en", "de", "ko"], vocab_size=100, split=BibleSplit(test_books=(2,)), cache_dir=cache, corpus=tiny_bible)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="model_type 'wordpiece'"):
        train_spm(["a b"], ["en"], tmp_path / "m.model", model_type="wordpiece")
    with pytest.raises(ValueError, match="no non-empty sentences"):
        train_spm(["", "  "], ["en"], tmp_path / "m.model")
    with pytest.raises(RuntimeError, match="vocab_size=5000 failed"):
        train_spm(SENTENCES["en"], ["en"], tmp_path / "m.model", vocab_size=5000)
    assert not (tmp_path / "m.model").exists()

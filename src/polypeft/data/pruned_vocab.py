"""A pretrained tokenizer's vocabulary cut to the pieces a corpus uses, with `<2xx>` target-language tags.

e5-small's 250k-piece matrix is mostly pieces the Bible never uses; keeping the used rows makes the embeddings
and the decoder's softmax small, and one id mapping keeps the tokenizer and the pruned matrices in agreement.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ..core.fileio import atomic_write, cache_root, write_json
from .batching import padded_inputs
from .spm import lang_tag

FORMAT = 1  # bump when the mapping's layout changes, so old cached mappings are not reused
MAPPING_NAME = "pruned_vocabulary.json"
BASE_TOKENIZER_NAME = "tokenizer.json"
SPECIALS = ("bos", "pad", "eos", "unk")


def tokenizer_sha256(backend) -> str:
    """SHA-256 of a `tokenizers.Tokenizer`'s serialised form: names the base vocabulary in cache keys."""
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def special_ids(tokenizer) -> dict[str, int]:
    """bos/pad/eos/unk ids of a transformers tokenizer (BERT's cls/sep stand in for bos/eos)."""
    ids = {"bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
           "pad": tokenizer.pad_token_id,
           "eos": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
           "unk": tokenizer.unk_token_id}
    missing = sorted(name for name, value in ids.items() if value is None)
    if missing:
        raise ValueError(f"the base tokenizer {type(tokenizer).__name__} has no {missing} token; a pruned "
                         "vocabulary needs bos (or cls), pad, eos (or sep) and unk")
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"the base tokenizer's special ids {ids} are not distinct; bos, pad, eos and unk must differ")
    return ids


@dataclass(frozen=True)
class PrunedSide:
    """One side's vocabulary: `kept[new id] = base id`; a base id not kept maps to unk."""

    kept: tuple[int, ...]
    unk: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_new", {old: new for new, old in enumerate(self.kept)})

    def __len__(self) -> int:
        return len(self.kept)

    def to_new(self, old_ids: Iterable[int]) -> list[int]:
        new = self._new
        return [new.get(old, self.unk) for old in old_ids]

    def to_old(self, new_ids: Iterable[int]) -> list[int]:
        return [self.kept[new] for new in new_ids]

    def rows(self, matrix: torch.Tensor) -> torch.Tensor:
        """The base embedding matrix's rows for this side, in new-id order."""
        return matrix[torch.tensor(self.kept, dtype=torch.long)].clone()


def pieces_of(backend, texts: Iterable[str]) -> set[int]:
    """Every base piece id the texts segment into (no special tokens)."""
    used: set[int] = set()
    texts = list(texts)
    for start in range(0, len(texts), 1024):
        for encoding in backend.encode_batch(texts[start:start + 1024], add_special_tokens=False):
            used.update(encoding.ids)
    return used


def build_mapping(backend, specials: dict[str, int], source_texts: Sequence[str], target_texts: Sequence[str],
                  tag_languages: Sequence[str], target_tags: Sequence[str] = ()) -> dict:
    """The mapping's JSON form: specials first (base order), then the used pieces (ascending), tags last (source;
    and on the target side `target_tags`, the decoder's per-language start, where asked)."""
    head = sorted(specials.values())
    source = head + sorted(pieces_of(backend, source_texts) - set(head))
    target = head + sorted(pieces_of(backend, target_texts) - set(head))
    tags = {lang: len(source) + index for index, lang in enumerate(tag_languages)}
    mapping = {"format": FORMAT, "specials": specials, "source": source, "target": target, "tags": tags}
    if target_tags:
        mapping["target_tags"] = {lang: len(target) + index for index, lang in enumerate(target_tags)}
    return mapping


class PrunedTokenizer:
    """The base tokenizer's segmentation over pruned ids, with SpmTokenizer's interface for the translation pipeline.

    Source ids (the encoder's): `[<2tgt> or bos] pieces eos`; a tag takes bos's place and starts as its embedding row.
    Target ids (the decoder's): `pieces eos`, decoding starts from bos, or from the target language's own tag where
    the mapping has `target_tags` (`decoder_starts`; never emitted, dropped by `decode`). `encode` with a tag is the
    source side, without one the target side, which is how `collate` asks; `__call__` feeds the encoder (source).
    """

    def __init__(self, backend, mapping: dict, folder: Optional[Path] = None):
        if mapping.get("format") != FORMAT:
            raise ValueError(f"pruned vocabulary format {mapping.get('format')!r} is not {FORMAT}; build it again")
        self.backend, self.mapping, self.folder = backend, mapping, folder
        specials = mapping["specials"]
        head = sorted(specials.values())
        new_special = {name: head.index(old) for name, old in specials.items()}  # same new ids on both sides
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = (new_special[name] for name in SPECIALS)
        self.decoder_start_id = self.bos_id
        self.source = PrunedSide(tuple(mapping["source"]), self.unk_id)
        self.target = PrunedSide(tuple(mapping["target"]), self.unk_id)
        self._tag_ids = {lang: int(new) for lang, new in mapping["tags"].items()}
        # the decoder's first input per target language (empty: every target starts from bos)
        self.decoder_starts = {lang: int(new) for lang, new in mapping.get("target_tags", {}).items()}
        self.vocab_size = len(self.target) + len(self.decoder_starts)
        self.source_vocab_size = len(self.source) + len(self._tag_ids)
        self._special_ids = {self.bos_id, self.pad_id, self.eos_id, *self.decoder_starts.values()}

    @property
    def languages(self) -> list[str]:
        return list(self._tag_ids)

    def lang_tag_id(self, lang: str) -> int:
        try:
            return self._tag_ids[lang]
        except KeyError:
            raise KeyError(f"language {lang!r} has no tag {lang_tag(lang)!r} in this pruned vocabulary; "
                           f"tagged languages are {self.languages}") from None

    def encode_source(self, text: str, lang_tag: Optional[str] = None) -> list[int]:
        first = self.bos_id if lang_tag is None else self.lang_tag_id(lang_tag)
        pieces = self.backend.encode(text, add_special_tokens=False).ids
        return [first, *self.source.to_new(pieces), self.eos_id]

    def encode_target(self, text: str, add_eos: bool = True) -> list[int]:
        ids = self.target.to_new(self.backend.encode(text, add_special_tokens=False).ids)
        return ids + [self.eos_id] if add_eos else ids

    def encode(self, text: str, lang_tag: Optional[str] = None, add_eos: bool = True) -> list[int]:
        """Source ids when a target-language tag is given (the encoder's input), else target ids (labels)."""
        return self.encode_source(text, lang_tag) if lang_tag is not None else self.encode_target(text, add_eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of target ids; bos, pad, decoder starts and -100 label padding are dropped, stopping at eos."""
        kept = []
        for piece_id in (int(i) for i in ids):
            if piece_id == self.eos_id:
                break
            if piece_id < 0 or piece_id in self._special_ids:
                continue
            kept.append(piece_id)
        return self.backend.decode(self.target.to_old(kept), skip_special_tokens=True)

    def __call__(self, texts: Sequence[str], padding: bool = True, truncation: bool = True,
                 max_length: Optional[int] = None, return_tensors: str = "pt", lang_tag: Optional[str] = None) -> dict:
        """Padded encoder inputs (`input_ids`, `attention_mask`), as a transformers tokenizer returns them."""
        if isinstance(texts, str):
            texts = [texts]
        if return_tensors != "pt" or not padding:
            raise ValueError("PrunedTokenizer(...) returns padded PyTorch tensors only (return_tensors='pt')")
        rows = [self.encode_source(text, lang_tag) for text in texts]
        return padded_inputs(rows, self.pad_id, max_length if truncation else None)

    def tokenize(self, text: str) -> list[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    def __len__(self) -> int:
        return self.vocab_size

    def save(self, folder: str | os.PathLike) -> Path:
        """The base tokenizer and the mapping in `folder`, each file written atomically (the mapping last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / BASE_TOKENIZER_NAME, lambda temporary: self.backend.save(temporary))
        write_json(folder / MAPPING_NAME, self.mapping)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "PrunedTokenizer":
        from tokenizers import Tokenizer

        folder = Path(folder)
        for name in (BASE_TOKENIZER_NAME, MAPPING_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} does not exist: {folder} is not a saved PrunedTokenizer")
        mapping = json.loads((folder / MAPPING_NAME).read_text(encoding="utf-8"))
        return cls(Tokenizer.from_file(str(folder / BASE_TOKENIZER_NAME)), mapping, folder)


def default_cache_dir() -> Path:
    """`cache_root()/pruned_vocab`: `$POLYPEFT_CACHE/pruned_vocab`, else `~/.cache/polypeft/pruned_vocab`."""
    return cache_root() / "pruned_vocab"


def pruned_tokenizer(tokenizer, source_texts: Sequence[str], target_texts: Sequence[str],
                     tag_languages: Sequence[str], cache_dir: Optional[str | os.PathLike] = None,
                     target_tags: Sequence[str] = ()) -> PrunedTokenizer:
    """`tokenizer` (a transformers fast tokenizer) pruned to the pieces of the texts, the mapping cached.

    The cache key covers the base vocabulary, the texts of each side and the tags, so any change builds anew.
    """
    backend = tokenizer.backend_tokenizer
    specials = special_ids(tokenizer)
    digest = hashlib.sha256()
    for part in (str(FORMAT), tokenizer_sha256(backend), json.dumps(specials, sort_keys=True),
                 json.dumps(list(tag_languages)), *sorted(set(source_texts)), "\0side\0", *sorted(set(target_texts)),
                 *(["\0target tags\0", json.dumps(list(target_tags))] if target_tags else [])):
        digest.update(part.encode("utf-8") + b"\0")
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{digest.hexdigest()[:16]}.json"
    if path.is_file():
        mapping = json.loads(path.read_text(encoding="utf-8"))
    else:
        mapping = build_mapping(backend, specials, sorted(set(source_texts)), sorted(set(target_texts)), tag_languages,
                                target_tags)
        write_json(path, mapping)
    return PrunedTokenizer(backend, mapping)

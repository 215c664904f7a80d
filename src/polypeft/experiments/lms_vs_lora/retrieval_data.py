"""The retrieval testbed's data, built once and cached: query states below the adapted blocks, English passages.

Train, valid and test verses come from disjoint books; every query's English verse is among its candidates.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ...backbones.e5 import PASSAGE_PREFIX, QUERY_PREFIX, embed
from ...core.fileio import cache_root, write_json, write_safetensors
from ...data.bible import NUM_BOOKS
from ..demo_retrieval import spread
from ..demo_store import settings_key
from .settings import RetrievalTestbed

KJV = "kjv"  # the English queries of the English check: KJV verses against the WEB index


@dataclass
class QuerySet:
    """Queries as cached hidden states (no padding), each with its language and its gold candidate's row."""

    states: list[torch.Tensor]  # per query: (tokens, hidden), float16
    langs: list[str]
    gold: torch.Tensor  # row of the query's English verse in the candidate passages

    def __len__(self) -> int:
        return len(self.states)

    def batch(self, index: list[int]) -> dict[str, torch.Tensor]:
        """Padded `inputs_embeds` (float32) and `attention_mask` of the queries at `index`."""
        items = [self.states[i] for i in index]
        length = max(len(item) for item in items)
        embeds = torch.zeros(len(items), length, items[0].shape[1])
        mask = torch.zeros(len(items), length, dtype=torch.long)
        for row, item in enumerate(items):
            embeds[row, :len(item)] = item.float()
            mask[row, :len(item)] = 1
        return {"inputs_embeds": embeds, "attention_mask": mask}

    def of_language(self, lang: str) -> list[int]:
        return [i for i, code in enumerate(self.langs) if code == lang]


@dataclass
class Split:
    """One part of the testbed: its queries and the normalised English passages they are searched among."""

    queries: QuerySet
    passages: torch.Tensor  # (candidates, hidden), float32, L2-normalised


@dataclass
class TestbedData:
    train: Split
    valid: Split
    test: Split


def verse_keys(corpus, books, languages: list[str]) -> list:
    """The verses of `books` present in English and in every one of `languages`, in canonical order."""
    keys = set(corpus.verses("en", books))
    for lang in languages:
        keys &= set(corpus.verses(lang, books))
    return sorted(keys)


def split_verses(corpus, testbed: RetrievalTestbed) -> dict[str, dict]:
    """Per part: the English candidate verses and, per language, the query verses (as rows of the candidates)."""
    held_out = {testbed.test_book, *testbed.valid_books}
    train_books = [b for b in range(1, NUM_BOOKS + 1) if b not in held_out]
    train_keys = spread(verse_keys(corpus, train_books, testbed.languages), testbed.train_verses)
    valid_keys = verse_keys(corpus, testbed.valid_books, testbed.languages)
    valid_queries = spread(list(range(len(valid_keys))), testbed.valid_queries)
    # Test: every English verse of the book competes; each language asks for the verses it has.
    test_keys = sorted(corpus.verses("en", [testbed.test_book]))
    if testbed.test_candidates:
        test_keys = spread(test_keys, testbed.test_candidates)
    parts = {"train": (train_keys, {lang: list(range(len(train_keys))) for lang in testbed.languages}),
             "valid": (valid_keys, {lang: valid_queries for lang in testbed.languages})}
    test_rows = {}
    for lang in [*testbed.languages, KJV]:
        present = corpus.verses(lang, [testbed.test_book])
        rows = [row for row, key in enumerate(test_keys) if key in present]
        test_rows[lang] = spread(rows, testbed.test_queries) if testbed.test_queries else rows
    parts["test"] = (test_keys, test_rows)
    return parts


def query_states(encoder, tokenizer, texts: list[str], layer: int, max_length: int,
                 batch_size: int = 64) -> list[torch.Tensor]:
    """Each text's token states at the input of block `layer` (the frozen lower blocks run once), float16."""
    from tqdm.auto import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    states: list[Optional[torch.Tensor]] = [None] * len(texts)
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=f"query states below block {layer}", unit="batch",
                          disable=len(texts) <= 4 * batch_size):
            index = order[start:start + batch_size]
            batch = tokenizer([QUERY_PREFIX + texts[i] for i in index], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True).hidden_states[layer]
            lengths = batch["attention_mask"].sum(1).tolist()
            for row, i in enumerate(index):
                states[i] = hidden[row, :lengths[row]].to(torch.float16).clone()
    return states  # type: ignore[return-value]


def build_split(encoder, tokenizer, corpus, keys: list, rows: dict[str, list[int]], testbed: RetrievalTestbed,
                book_texts: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and index of one part: English passages, and every language's query states."""
    english = [book_texts["en"][key] for key in keys]
    passages = embed(encoder, tokenizer, english, prefix=PASSAGE_PREFIX, max_length=testbed.max_length)
    texts, langs, gold = [], [], []
    for lang, lang_rows in rows.items():
        texts += [book_texts[lang][keys[row]] for row in lang_rows]
        langs += [lang] * len(lang_rows)
        gold += lang_rows
    states = query_states(encoder, tokenizer, texts, testbed.cache_layer, testbed.max_length)
    lengths = torch.tensor([len(s) for s in states])
    tensors = {"passages": passages, "states": torch.cat(states), "lengths": lengths, "gold": torch.tensor(gold)}
    return tensors, {"langs": langs, "refs": [list(keys[row]) for row in gold]}


def load_split(folder: Path, part: str) -> Split:
    tensors = load_file(folder / f"{part}.safetensors")
    index = json.loads((folder / f"{part}.json").read_text(encoding="utf-8"))
    states = list(torch.split(tensors["states"], tensors["lengths"].tolist()))
    return Split(QuerySet(states, index["langs"], tensors["gold"]), tensors["passages"])


def testbed_data(encoder, tokenizer, corpus, testbed: RetrievalTestbed, root: Optional[Path] = None) -> TestbedData:
    """The cached data of these settings, built on first use (each part written atomically, so a killed build
    resumes at the part it stopped in)."""
    folder = (root or cache_root() / "lms_vs_lora") / f"retrieval-{settings_key(testbed.data_dict())}"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "settings.json", testbed.data_dict())
    parts = None
    for part in ("train", "valid", "test"):
        if (folder / f"{part}.safetensors").exists() and (folder / f"{part}.json").exists():
            continue
        parts = parts or split_verses(corpus, testbed)
        keys, rows = parts[part]
        books = sorted({key[0] for key in keys})
        book_texts = {lang: corpus.verses(lang, books) for lang in ["en", *rows]}
        tensors, index = build_split(encoder, tokenizer, corpus, keys, rows, testbed, book_texts)
        write_safetensors(folder / f"{part}.safetensors", tensors)
        write_json(folder / f"{part}.json", index)
    return TestbedData(*(load_split(folder, part) for part in ("train", "valid", "test")))

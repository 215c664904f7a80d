"""Token classification (WikiANN-style NER) on any HF encoder: readers, transformers' own head, seqeval F1.

Reads HF datasets with `tokens`/`ner_tags` columns, JSON lines, and CoNLL-style TSV (one token per line).
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..data.lines import decode_line, numbered_lines
from ..model.example_routes import example_routes, route_arguments
from .example_languages import language_from_column
from .heads import attach_head
from .records import Source, TaskDataError, is_path, read_records

WIKIANN_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
IGNORE_INDEX = -100
# WikiANN's raw files prefix every token with its language: "en:Paris".
_LANGUAGE_PREFIX = re.compile(r"^([a-z]{2,3}(?:-[a-z]+)?):(?=.)")


@dataclass(frozen=True)
class TaggedSentence:
    tokens: list[str]
    tags: list[int]
    lang: Optional[str] = None


@dataclass
class TokenData:
    sentences: list[TaggedSentence]
    label_names: list[str]


def _tag_id(tag, names: list[str], index: dict[str, int], where: str) -> int:
    if isinstance(tag, int) and not isinstance(tag, bool):
        if 0 <= tag < len(names):
            return tag
        raise TaskDataError(f"{where}: tag id {tag} outside 0..{len(names) - 1} (labels {names})")
    if isinstance(tag, str) and tag in index:
        return index[tag]
    raise TaskDataError(f"{where}: tag {tag!r} is not in the label set {names}")


def read_conll(path: str | os.PathLike, label_names: Sequence[str] = WIKIANN_LABELS,
               strip_language_prefix: bool = True, language: Optional[str] = None) -> TokenData:
    """Read a CoNLL-style file: `token<TAB>tag` per line (tag in the last column), blank line between sentences.

    A sentence's language is `language`, else its tokens' WikiANN prefix ("en:Paris"), which must agree.
    """
    names = list(label_names)
    index = {n: i for i, n in enumerate(names)}
    sentences, tokens, tags = [], [], []
    prefix: Optional[str] = None
    for number, raw in numbered_lines(path):
        line = decode_line(raw, f"{path} line {number}", TaskDataError)
        if not line.strip() or line.startswith("-DOCSTART-"):
            if tokens:
                sentences.append(TaggedSentence(tokens, tags, language or prefix))
                tokens, tags, prefix = [], [], None
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise TaskDataError(f"{path} line {number}: expected 'token<TAB>tag', got {line!r}")
        token = fields[0]
        found = _LANGUAGE_PREFIX.match(token) if strip_language_prefix else None
        if found:
            if language is None and prefix is not None and found.group(1) != prefix:
                raise TaskDataError(f"{path} line {number}: token {token!r} has language prefix "
                                    f"{found.group(1)!r} but its sentence began in {prefix!r}; "
                                    "one sentence is one language (or pass language=)")
            prefix = prefix or found.group(1)
            token = token[found.end():]
        tokens.append(token)
        tags.append(_tag_id(fields[-1].strip(), names, index, f"{path} line {number}"))
    if tokens:
        sentences.append(TaggedSentence(tokens, tags, language or prefix))
    return TokenData(sentences, names)


def read_tokens(source: Source, label_names: Optional[Sequence[str]] = None, tokens_column: str = "tokens",
                tags_column: str = "ner_tags", file_format: Optional[str] = None, language: Optional[str] = None,
                language_column: Optional[str] = None) -> TokenData:
    """Read tagged sentences from a `datasets.Dataset`, a JSONL/JSON file, or a CoNLL `.tsv`/`.conll`/`.txt` file.

    Tags may be names or ids; the label set comes from `label_names`, else the dataset's `ClassLabel`
    feature, else WikiANN's seven tags. A sentence's language is `language` (the whole source), else
    its `language_column` (a code, or WikiANN's per-token `langs` list), else a CoNLL token prefix.
    """
    if language is not None and language_column is not None:
        raise ValueError(f"read_tokens got language={language!r} and language_column={language_column!r}; "
                         "pass one code for the whole source or a column, not both")
    if is_path(source) and (file_format or Path(source).suffix.lstrip(".").lower()) in ("tsv", "conll", "txt", "iob"):
        if language_column is not None:
            raise ValueError(f"language_column={language_column!r} does not apply to CoNLL file {source}: it has "
                             "no columns; its tokens' prefixes ('en:Paris') or language= give the language")
        return read_conll(source, label_names or WIKIANN_LABELS, language=language)
    names = list(label_names) if label_names is not None else None
    if names is None and hasattr(source, "features"):
        feature = source.features.get(tags_column)
        inner = getattr(feature, "feature", None)
        names = list(inner.names) if inner is not None and hasattr(inner, "names") else None
    names = names or list(WIKIANN_LABELS)
    index = {n: i for i, n in enumerate(names)}
    sentences = []
    required = [tokens_column, tags_column] + ([language_column] if language_column else [])
    for record in read_records(source, required, file_format=file_format):
        tokens, tags = record.data[tokens_column], record.data[tags_column]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise record.fail(f"column {tokens_column!r} must be a list of strings, got {tokens!r}")
        if not isinstance(tags, list) or len(tags) != len(tokens):
            raise record.fail(f"{len(tokens)} tokens but {tags_column!r} is {tags!r}; need one tag per token")
        lang = language_from_column(record, language_column) if language_column else language
        sentences.append(TaggedSentence(list(tokens), [_tag_id(t, names, index, record.where) for t in tags], lang))
    return TokenData(sentences, names)


def token_classification_model(encoder: torch.nn.Module, label_names: Sequence[str]) -> torch.nn.Module:
    """The encoder under transformers' token-classification head (e.g. `BertForTokenClassification`)."""
    from transformers import AutoModelForTokenClassification

    names = list(label_names)
    return attach_head(encoder, AutoModelForTokenClassification, num_labels=len(names),
                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})


def encode_tokens(tokenizer, sentences: Sequence[TaggedSentence], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Model inputs with `labels` on each word's first sub-token and -100 elsewhere (needs a fast tokenizer)."""
    batch = tokenizer([s.tokens for s in sentences], is_split_into_words=True, padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
    labels = torch.full(batch["input_ids"].shape, IGNORE_INDEX)
    for row, sentence in enumerate(sentences):
        previous = None
        for position, word in enumerate(batch.word_ids(row)):
            if word is not None and word != previous:
                labels[row, position] = sentence.tags[word]
            previous = word
    batch["labels"] = labels
    return dict(batch)


def predict_tokens(model: torch.nn.Module, tokenizer, sentences: Sequence[TaggedSentence], batch_size: int = 32,
                   max_length: int = 128, route: Optional[str] = None) -> list[list[int]]:
    """Tag id per word (words cut off by truncation get tag 0, normally "O").

    A PolyModel runs each sentence on its language's route, or every sentence on `route` when given.
    """
    routes = example_routes(model, [s.lang for s in sentences], route)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            chunk = sentences[start:start + batch_size]
            batch = encode_tokens(tokenizer, chunk, max_length)
            labels = batch.pop("labels")
            inputs = {k: v.to(device) for k, v in batch.items()}
            logits = model(**inputs, **route_arguments(routes, range(start, start + len(chunk)))).logits
            logits = logits.argmax(-1).cpu()
            for row, sentence in enumerate(chunk):
                first = (labels[row] != IGNORE_INDEX).nonzero().flatten()
                tags = logits[row, first].tolist()
                predictions.append(tags + [0] * (len(sentence.tokens) - len(tags)))
    model.train(was_training)
    return predictions


def seqeval_scores(predictions: Sequence[Sequence[int]], gold: Sequence[Sequence[int]],
                   label_names: Sequence[str]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval, CoNLL evaluation) over id sequences."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} predicted sentences for {len(gold)} gold ones")
    for i, (p, g) in enumerate(zip(predictions, gold)):
        if len(p) != len(g):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(g)} gold tags")
    names = list(label_names)
    predicted = [[names[t] for t in p] for p in predictions]
    expected = [[names[t] for t in g] for g in gold]
    return {"precision": precision_score(expected, predicted), "recall": recall_score(expected, predicted),
            "f1": f1_score(expected, predicted)}


def evaluate_tokens(model: torch.nn.Module, tokenizer, data: TokenData, batch_size: int = 32,
                    max_length: int = 128, route: Optional[str] = None) -> dict[str, float]:
    """seqeval precision/recall/F1 of the model on `data` (`route` as in `predict_tokens`)."""
    predictions = predict_tokens(model, tokenizer, data.sentences, batch_size, max_length, route)
    return seqeval_scores(predictions, [s.tags for s in data.sentences], data.label_names)

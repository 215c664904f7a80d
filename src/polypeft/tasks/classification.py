"""Sequence classification on any HF encoder: a reader, transformers' own head, accuracy.

The cross-lingual transfer tasks (XNLI-style, Bible verse classification) are all this shape.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ..model.example_routes import example_routes, route_arguments
from .example_languages import language_from_column
from .heads import attach_head
from .records import Source, read_records


@dataclass(frozen=True)
class ClassificationExample:
    """`label` is an id into the label names of the read that made the example; `label_name` is the
    label itself, which is what evaluation compares, so splits read separately still agree."""

    text: str
    label: int
    text_pair: Optional[str] = None
    lang: Optional[str] = None
    label_name: Optional[str] = None


@dataclass
class ClassificationData:
    examples: list[ClassificationExample]
    label_names: list[str]


def _label_names_of(source: Source, column: str) -> Optional[list[str]]:
    # A `datasets.ClassLabel` column knows its names; use them rather than guessing from the values.
    feature = getattr(source, "features", {}).get(column) if hasattr(source, "features") else None
    return list(feature.names) if feature is not None and hasattr(feature, "names") else None


def _sorted_labels(labels: set[str]) -> list[str]:
    # Integer labels ("0", "2", "10") in numeric order, so ids follow them; names alphabetically.
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


def read_classification(source: Source, text_column: str = "text", label_column: str = "label",
                        text_pair_column: Optional[str] = None, label_names: Optional[Sequence[str]] = None,
                        file_format: Optional[str] = None, language: Optional[str] = None,
                        language_column: Optional[str] = None) -> ClassificationData:
    """Read `(text[, text_pair], label)` rows from a JSONL/JSON/TSV file or a `datasets.Dataset`.

    Labels may be names or integer ids. With `label_names` (or a `ClassLabel` column) a label outside
    the set is an error naming its file and line; otherwise the set is the labels seen, sorted
    (numerically when they are all integers). Each example keeps its label's name: pass the training
    split's `label_names` when reading the other splits, or evaluate by name (`evaluate_classification`).
    An example's language is `language` (the whole source) or its row's `language_column`.
    """
    if language is not None and language_column is not None:
        raise ValueError(f"read_classification got language={language!r} and language_column="
                         f"{language_column!r}; pass one code for the whole source or a column, not both")
    optional = [c for c in (text_pair_column, language_column) if c]
    required = [text_column, label_column] + optional
    records = read_records(source, required, file_format=file_format)
    names = list(label_names) if label_names is not None else _label_names_of(source, label_column)
    if names is None:
        names = _sorted_labels({str(r.data[label_column]) for r in records})
    index = {name: i for i, name in enumerate(names)}
    examples = []
    for record in records:
        raw, text = record.data[label_column], record.data[text_column]
        if not isinstance(text, str):
            raise record.fail(f"column {text_column!r} must be text, got {text!r}")
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise record.fail(f"label {raw!r} must be a name or an integer id")
        if isinstance(raw, int) and str(raw) not in index:
            if not 0 <= raw < len(names):
                raise record.fail(f"label id {raw} outside 0..{len(names) - 1} (labels {names})")
            label = raw
        elif str(raw) in index:
            label = index[str(raw)]
        else:
            raise record.fail(f"label {raw!r} is not in the label set {names}")
        pair = record.data[text_pair_column] if text_pair_column else None
        lang = language_from_column(record, language_column) if language_column else language
        examples.append(ClassificationExample(text, label, pair, lang, names[label]))
    return ClassificationData(examples, names)


def classification_model(encoder: torch.nn.Module, label_names: Sequence[str]) -> torch.nn.Module:
    """The encoder under transformers' sequence-classification head (e.g. `BertForSequenceClassification`)."""
    from transformers import AutoModelForSequenceClassification

    names = list(label_names)
    return attach_head(encoder, AutoModelForSequenceClassification, num_labels=len(names),
                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})


def encode_classification(tokenizer, examples: Sequence[ClassificationExample], max_length: int = 128,
                          prefix: str = "") -> dict[str, torch.Tensor]:
    """Padded model inputs plus `labels` for a batch of examples."""
    texts = [prefix + e.text for e in examples]
    pairs = [e.text_pair or "" for e in examples] if any(e.text_pair for e in examples) else None
    batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch["labels"] = torch.tensor([e.label for e in examples])
    return dict(batch)


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the label."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy of zero examples is undefined")
    return sum(int(p) == int(g) for p, g in zip(predictions, labels)) / len(labels)


def predict_classification(model: torch.nn.Module, tokenizer, examples: Sequence[ClassificationExample],
                           batch_size: int = 32, max_length: int = 128, prefix: str = "",
                           route: Optional[str] = None) -> list[int]:
    """Arg-max label id per example.

    A PolyModel runs each example on its language's route, or every example on `route` when given.
    """
    routes = example_routes(model, [e.lang for e in examples], route)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = encode_classification(tokenizer, chunk, max_length, prefix)
            batch.pop("labels")
            inputs = {k: v.to(device) for k, v in batch.items()}
            logits = model(**inputs, **route_arguments(routes, range(start, start + len(chunk)))).logits
            predictions += logits.argmax(-1).tolist()
    model.train(was_training)
    return predictions


def evaluate_classification(model: torch.nn.Module, tokenizer, examples: Sequence[ClassificationExample],
                            batch_size: int = 32, max_length: int = 128, prefix: str = "",
                            route: Optional[str] = None) -> dict[str, float]:
    """`{"accuracy": ...}` of the model on the examples (`route` as in `predict_classification`).

    Predictions and gold labels are compared by name (the model's `id2label` against each example's
    `label_name`), so a test split read on its own, whose ids may differ, is scored right.
    """
    predictions = predict_classification(model, tokenizer, examples, batch_size, max_length, prefix, route)
    model_names = model_label_names(model)
    if model_names is None or any(e.label_name is None for e in examples):
        return {"accuracy": accuracy(predictions, [e.label for e in examples])}
    unknown = sorted({e.label_name for e in examples} - set(model_names))
    if unknown:
        raise ValueError(f"examples have labels {unknown} that the model's head does not know; its labels are "
                         f"{model_names} (read the split with label_names= of the training split)")
    return {"accuracy": accuracy(predictions, [model_names.index(e.label_name) for e in examples])}


def model_label_names(model: torch.nn.Module) -> Optional[list[str]]:
    """The head's label names in id order, or None where the config holds only transformers' LABEL_i defaults."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names

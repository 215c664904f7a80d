"""Extractive QA (SQuAD / TyDiQA-GoldP format) on any HF encoder: reader, transformers' own span head, EM/F1.

Long contexts are cut into overlapping windows; answers are read back through the tokenizer's offsets.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..model.example_routes import example_routes, route_arguments
from .example_languages import language_from_column
from ..data.lines import UTF8_BOM, read_text
from .heads import attach_head
from .qa_metrics import exact_match, normalize_answer, token_f1  # noqa: F401 (public names of this module)
from .records import Record, Source, TaskDataError, is_path, read_records


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]
    lang: Optional[str] = None


# TyDiQA-GoldP ids start with the language's English name: "finnish-1234...".
TYDIQA_LANGUAGES = {"arabic": "ar", "bengali": "bn", "english": "en", "finnish": "fi", "indonesian": "id",
                    "korean": "ko", "russian": "ru", "swahili": "sw", "telugu": "te"}


def tydiqa_language(example_id: str) -> Optional[str]:
    """The code a TyDiQA-GoldP id's language prefix names ("finnish-123" -> "fi"), else None."""
    name, dash, _ = str(example_id).partition("-")
    return TYDIQA_LANGUAGES.get(name) if dash else None


def _answers_of(raw, where: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    # Two layouts: SQuAD files list {"text", "answer_start"} objects; HF datasets hold parallel lists.
    if isinstance(raw, dict) and "text" in raw and "answer_start" in raw:
        texts, starts = list(raw["text"]), list(raw["answer_start"])
    elif isinstance(raw, list) and all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in raw):
        texts, starts = [a["text"] for a in raw], [a["answer_start"] for a in raw]
    else:
        raise TaskDataError(f"{where}: answers must be [{{'text', 'answer_start'}}, ...] or "
                            f"{{'text': [...], 'answer_start': [...]}}, got {raw!r}")
    if len(texts) != len(starts):
        raise TaskDataError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
    for text, start in zip(texts, starts):
        if not isinstance(text, str):
            raise TaskDataError(f"{where}: answer text {text!r} must be a string")
        if isinstance(start, bool) or not isinstance(start, int):
            raise TaskDataError(f"{where}: answer_start {start!r} of answer {text!r} must be an integer "
                                "character offset into the context")
    return tuple(texts), tuple(starts)


def _example(qid, question, context, raw_answers, where: str, lang: Optional[str] = None) -> QAExample:
    if not isinstance(context, str) or not isinstance(question, str):
        raise TaskDataError(f"{where}: question and context must be text")
    texts, starts = _answers_of(raw_answers, where)
    for text, start in zip(texts, starts):
        if start < 0 or context[start:start + len(text)] != text:
            found = context[max(start, 0):max(start, 0) + len(text)]
            raise TaskDataError(f"{where}: answer {text!r} at answer_start {start} is outside the context "
                                f"(the context has {found!r} there, length {len(context)})")
    return QAExample(str(qid), question, context, texts, starts, lang or tydiqa_language(str(qid)))


def _line_of(text: str, needle: str, default: int) -> int:
    position = text.find(needle)
    return text.count("\n", 0, position) + 1 if position >= 0 else default


def _objects(container: dict, key: str, location: str, path: Path) -> list[dict]:
    """`container[key]` (absent: empty) as a list of JSON objects, else an error at `location.key`."""
    items = container.get(key, [])
    if not isinstance(items, list):
        raise TaskDataError(f"{path} {location}{key}: expected a list of objects, got {type(items).__name__} {items!r}")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise TaskDataError(f"{path} {location}{key}[{index}]: expected a JSON object, got "
                                f"{type(item).__name__} {item!r}")
    return items


def _read_squad_file(path: Path, language: Optional[str]) -> list[QAExample]:
    text = read_text(path, TaskDataError)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise TaskDataError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(document, dict) or "data" not in document:
        raise TaskDataError(f"{path}: a SQuAD/TyDiQA file is {{'data': [{{'paragraphs': [...]}}]}}; "
                            f"top level has {sorted(document) if isinstance(document, dict) else type(document).__name__}")
    examples = []
    for a, article in enumerate(_objects(document, "data", "", path)):
        for p, paragraph in enumerate(_objects(article, "paragraphs", f"data[{a}].", path)):
            for q, qa in enumerate(_objects(paragraph, "qas", f"data[{a}].paragraphs[{p}].", path)):
                location = f"data[{a}].paragraphs[{p}].qas[{q}]"
                missing = [k for k in ("id", "question", "answers") if k not in qa]
                if missing or "context" not in paragraph:
                    raise TaskDataError(f"{path} {location}: missing {missing or ['context']}")
                # json keeps no positions: find the line through the question id, unique in SQuAD files.
                line = _line_of(text, json.dumps(qa["id"], ensure_ascii=False), 1)
                examples.append(_example(qa["id"], qa["question"], paragraph["context"], qa["answers"],
                                         f"{path} line {line} ({location}, id {qa['id']!r})", language))
    return examples


def read_qa(source: Source, file_format: Optional[str] = None, language: Optional[str] = None,
            language_column: Optional[str] = None) -> list[QAExample]:
    """Read QA examples from a SQuAD/TyDiQA-GoldP JSON file, a flat JSONL file, or a `datasets.Dataset`.

    Flat rows have `id`, `question`, `context` and `answers` (`{"text": [...], "answer_start": [...]}`).
    An answer that is not at its `answer_start` in the context is an error naming file and line.
    An example's language is `language` (the whole source), else a flat row's `language_column`,
    else the TyDiQA-GoldP id prefix ("finnish-..." -> "fi").
    """
    if language is not None and language_column is not None:
        raise ValueError(f"read_qa got language={language!r} and language_column={language_column!r}; "
                         "pass one code for the whole source or a column, not both")
    if is_path(source) and (file_format or Path(source).suffix.lstrip(".").lower()) == "json":
        with open(source, "rb") as handle:
            head = handle.read(4096).removeprefix(UTF8_BOM).lstrip()
        if head.startswith(b"{"):
            if language_column is not None:
                raise ValueError(f"language_column={language_column!r} applies to flat rows, not the SQuAD-nested "
                                 f"file {source}; pass language= or rely on TyDiQA id prefixes")
            return _read_squad_file(Path(source), language)
    required = ["question", "context", "answers"] + ([language_column] if language_column else [])
    records: list[Record] = read_records(source, required, file_format=file_format)
    return [_example(r.data.get("id", r.line), r.data["question"], r.data["context"], r.data["answers"], r.where,
                     language_from_column(r, language_column) if language_column else language)
            for r in records]


def qa_model(encoder: torch.nn.Module) -> torch.nn.Module:
    """The encoder under transformers' span head (e.g. `BertForQuestionAnswering`)."""
    from transformers import AutoModelForQuestionAnswering

    return attach_head(encoder, AutoModelForQuestionAnswering)


def encode_qa(tokenizer, examples: Sequence[QAExample], max_length: int = 384, stride: int = 128,
              with_labels: bool = True) -> dict:
    """Windowed inputs: question first, context cut into windows overlapping by `stride` tokens.

    Returns the tensors plus `example_index` (window -> example) and `offset_mapping` (context tokens
    only, others None); with labels, `start_positions`/`end_positions` point at the first answer,
    or at token 0 where a window does not contain it.
    """
    batch = tokenizer([e.question for e in examples], [e.context for e in examples], truncation="only_second",
                      max_length=max_length, stride=stride, return_overflowing_tokens=True,
                      return_offsets_mapping=True, padding=True)
    example_index = batch.pop("overflow_to_sample_mapping")
    offsets = batch.pop("offset_mapping")
    starts, ends, context_offsets = [], [], []
    for window, offset in enumerate(offsets):
        sequence_ids = batch.sequence_ids(window)
        context_offsets.append([o if s == 1 else None for o, s in zip(offset, sequence_ids)])
        example = examples[example_index[window]]
        if not with_labels or not example.answers:
            starts.append(0)
            ends.append(0)
            continue
        char_start = example.answer_starts[0]
        char_end = char_start + len(example.answers[0])
        context_tokens = [i for i, s in enumerate(sequence_ids) if s == 1]
        first, last = context_tokens[0], context_tokens[-1]
        if offset[first][0] > char_start or offset[last][1] < char_end:
            starts.append(0)
            ends.append(0)
            continue
        start = first
        while start <= last and offset[start][1] <= char_start:
            start += 1
        end = last
        while end >= first and offset[end][0] >= char_end:
            end -= 1
        starts.append(start)
        ends.append(end)
    tensors = {k: torch.tensor(v) for k, v in batch.items()}
    if with_labels:
        tensors["start_positions"] = torch.tensor(starts)
        tensors["end_positions"] = torch.tensor(ends)
    return {"inputs": tensors, "example_index": list(example_index), "offset_mapping": context_offsets}


def predict_qa(model: torch.nn.Module, tokenizer, examples: Sequence[QAExample], batch_size: int = 16,
               max_length: int = 384, stride: int = 128, max_answer_tokens: int = 30,
               route: Optional[str] = None) -> dict[str, str]:
    """Best-scoring span text per example id, over all of its windows.

    A PolyModel runs each window on its example's language route, or every window on `route` when given.
    """
    routes = example_routes(model, [e.lang for e in examples], route)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    best: dict[int, tuple[float, str]] = {}
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            encoded = encode_qa(tokenizer, chunk, max_length, stride, with_labels=False)
            inputs = {k: v.to(device) for k, v in encoded["inputs"].items()}
            example_of_window = [start + i for i in encoded["example_index"]]
            output = model(**inputs, **route_arguments(routes, example_of_window))
            for window in range(len(encoded["example_index"])):
                offsets = encoded["offset_mapping"][window]
                example_id = start + encoded["example_index"][window]
                context = examples[example_id].context
                start_logits, end_logits = output.start_logits[window].cpu(), output.end_logits[window].cpu()
                valid = torch.tensor([o is not None for o in offsets])
                start_logits = start_logits.masked_fill(~valid, -1e9)
                end_logits = end_logits.masked_fill(~valid, -1e9)
                # score[i, j] = start[i] + end[j] for i <= j < i + max_answer_tokens
                scores = start_logits[:, None] + end_logits[None, :]
                n = scores.shape[0]
                span = torch.ones(n, n, dtype=torch.bool).triu().tril(max_answer_tokens - 1)
                scores = scores.masked_fill(~span, -1e18)
                flat = int(scores.argmax())
                i, j = divmod(flat, n)
                if offsets[i] is None or offsets[j] is None:
                    continue
                score = float(scores[i, j])
                if example_id not in best or score > best[example_id][0]:
                    best[example_id] = (score, context[offsets[i][0]:offsets[j][1]])
    model.train(was_training)
    return {e.id: best.get(i, (0.0, ""))[1] for i, e in enumerate(examples)}


def squad_scores(predictions: dict[str, str], examples: Sequence[QAExample]) -> dict[str, float]:
    """Exact match and F1 in percent, each the best over an example's gold answers, with answers
    normalised for the example's language (MLQA-style; English rules where it has none)."""
    if not examples:
        raise ValueError("squad_scores needs at least one example")
    missing = [e.id for e in examples if e.id not in predictions]
    if missing:
        raise ValueError(f"no prediction for example ids {missing[:5]} ({len(missing)} in all)")
    em = f1 = 0.0
    for example in examples:
        golds = example.answers or ("",)
        em += max(exact_match(predictions[example.id], g, example.lang) for g in golds)
        f1 += max(token_f1(predictions[example.id], g, example.lang) for g in golds)
    return {"exact_match": 100 * em / len(examples), "f1": 100 * f1 / len(examples)}


def evaluate_qa(model: torch.nn.Module, tokenizer, examples: Sequence[QAExample], **kwargs) -> dict[str, float]:
    """SQuAD EM/F1 of the model's best spans (kwargs go to `predict_qa`)."""
    return squad_scores(predict_qa(model, tokenizer, examples, **kwargs), examples)

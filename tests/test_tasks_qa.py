"""Extractive QA: SQuAD/TyDiQA reader with located errors, windowed span labels, EM/F1, span prediction."""
import json

import pytest
import torch
from transformers import BertConfig, BertModel

from polypeft.tasks.qa import encode_qa, evaluate_qa, predict_qa, qa_model, read_qa, squad_scores
from polypeft.tasks.records import TaskDataError
from tiny_models import bert_tokenizer

CONTEXT = "the tower was built in 1889 by gustave eiffel for the world fair in paris"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "who", "when", "built", "what"] + sorted(set(CONTEXT.split()))


def squad_file(path, answer_start):
    document = {"version": "1.1", "data": [{"title": "Eiffel", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "q-when", "question": "when built", "answers": [{"text": "1889", "answer_start": CONTEXT.index("1889")}]},
        {"id": "q-who", "question": "who built",
         "answers": [{"text": "gustave eiffel", "answer_start": answer_start}]},
    ]}]}]}
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path


def test_reads_squad_and_tydiqa_goldp_files(tmp_path):
    examples = read_qa(squad_file(tmp_path / "tydiqa-goldp-dev.json", CONTEXT.index("gustave")))
    assert [e.id for e in examples] == ["q-when", "q-who"]
    assert examples[1].answers == ("gustave eiffel",) and examples[1].context == CONTEXT


def test_answer_outside_the_context_names_file_and_line(tmp_path):
    path = squad_file(tmp_path / "bad.json", answer_start=60)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if '"q-who"' in text)
    with pytest.raises(TaskDataError, match=rf"bad.json line {line} .*id 'q-who'.*answer 'gustave eiffel' at "
                                            r"answer_start 60 is outside the context"):
        read_qa(path)
    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({"id": "a", "question": "q", "context": "short",
                                "answers": {"text": ["short text"], "answer_start": [0]}}) + "\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match="flat.jsonl line 1: answer 'short text'"):
        read_qa(flat)


def test_span_labels_and_windows_point_at_the_answer(tmp_path, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    examples = read_qa(squad_file(tmp_path / "dev.json", CONTEXT.index("gustave")))
    encoded = encode_qa(tokenizer, examples, max_length=12, stride=4)
    inputs = encoded["inputs"]
    assert len(encoded["example_index"]) > len(examples)  # the context needed several windows
    found = set()
    for window, example_index in enumerate(encoded["example_index"]):
        start, end = int(inputs["start_positions"][window]), int(inputs["end_positions"][window])
        if start == 0:
            continue
        offsets = encoded["offset_mapping"][window]
        found.add((example_index, CONTEXT[offsets[start][0]:offsets[end][1]]))
    assert found >= {(0, "1889"), (1, "gustave eiffel")}


def test_squad_metrics():
    examples = read_qa([{"id": "1", "question": "q", "context": "The Eiffel Tower!", "answers":
                         {"text": ["The Eiffel Tower", "Eiffel"], "answer_start": [0, 4]}},
                        {"id": "2", "question": "q", "context": "in Paris, France",
                         "answers": {"text": ["Paris"], "answer_start": [3]}}])
    scores = squad_scores({"1": "Eiffel tower", "2": "Paris, France"}, examples)
    assert scores["exact_match"] == pytest.approx(50.0)  # articles and case are ignored
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_head_predicts_spans_from_the_context(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model, tokenizer = qa_model(BertModel(config)), tiny_tokenizer
    assert type(model).__name__ == "BertForQuestionAnswering"
    examples = read_qa(squad_file(tmp_path / "train.json", CONTEXT.index("gustave")))
    encoded = encode_qa(tokenizer, examples, max_length=64, stride=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        model(**encoded["inputs"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    predictions = predict_qa(model, tokenizer, examples, max_length=16, stride=6)
    assert set(predictions) == {"q-when", "q-who"} and all(p in CONTEXT for p in predictions.values())
    assert evaluate_qa(model, tokenizer, examples, max_length=64, stride=16)["exact_match"] == 100.0

"""Sequence classification: reader with clear errors, transformers' head on a loaded encoder, accuracy."""
import json

import pytest
import torch
from transformers import BertConfig, BertModel

from polypeft.tasks.classification import (accuracy, classification_model, encode_classification,
                                           evaluate_classification, read_classification)
from polypeft.tasks.records import TaskDataError
from tiny_models import bert_tokenizer

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "great", "fine", "bad", "awful", "poor", "movie", "food", "very"]


def tiny_encoder():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return BertModel(config, add_pooling_layer=False).eval()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_reader_maps_names_and_ids(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "good movie", "label": "pos"},
                                                  {"text": "bad food", "label": "neg"}])
    data = read_classification(path)
    assert data.label_names == ["neg", "pos"]
    assert [e.label for e in data.examples] == [1, 0]
    by_id = read_classification([{"text": "x", "label": 1}], label_names=["neg", "pos"])
    assert by_id.examples[0].label == 1


def test_label_outside_the_set_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"text": "good", "label": "pos"}, {"text": "meh", "label": "neutral"}])
    with pytest.raises(TaskDataError, match=r"dev.jsonl line 2: label 'neutral' is not in the label set \['neg', 'pos'\]"):
        read_classification(path, label_names=["neg", "pos"])
    with pytest.raises(TaskDataError, match=r"dev.jsonl line 1: missing column\(s\) \['sentence'\]"):
        read_classification(path, text_column="sentence")
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("text\tlabel\ngood\t7\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"dev.tsv line 2: label '7' is not in the label set"):
        read_classification(tsv, label_names=["neg", "pos"])


def test_hf_dataset_class_labels_are_used():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "neu", "pos"])})
    dataset = datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [2, 0]}, features=features)
    data = read_classification(dataset)
    assert data.label_names == ["neg", "neu", "pos"] and [e.label for e in data.examples] == [2, 0]


def test_head_keeps_encoder_weights_and_learns(tiny_tokenizer):
    encoder, tokenizer = tiny_encoder(), tiny_tokenizer
    model = classification_model(encoder, ["neg", "pos"])
    assert type(model).__name__ == "BertForSequenceClassification"
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)
    data = read_classification([{"text": f"{a} {b}", "label": label}
                                for a, label in [("good", "pos"), ("great", "pos"), ("fine", "pos"),
                                                 ("bad", "neg"), ("awful", "neg"), ("poor", "neg")]
                                for b in ("movie", "food", "very")])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    batch = encode_classification(tokenizer, data.examples)
    for _ in range(40):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert evaluate_classification(model, tokenizer, data.examples, batch_size=4) == {"accuracy": 1.0}


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([1, 0, 1], [1, 0])

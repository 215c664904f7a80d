"""Issue 16 item 7: one label mapping governs a dataset's splits, even when each split is read on its own."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from polypeft.tasks.classification import (classification_model, evaluate_classification, model_label_names,
                                           read_classification)
from tiny_models import bert_tokenizer

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "meh"]
TRUTH = {"good": "pos", "bad": "neg", "meh": "neu"}


class FirstWordClassifier(nn.Module):
    """Predicts the true label of the first word, as ids of `label_names`: a model that is always right."""

    def __init__(self, label_names):
        super().__init__()
        self.config = SimpleNamespace(id2label=dict(enumerate(label_names)))
        table = torch.zeros(len(WORDS), len(label_names))
        for word, label in TRUTH.items():
            if label in label_names:
                table[WORDS.index(word), label_names.index(label)] = 1.0
        self.table = nn.Parameter(table)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids[:, 1]])


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "label": TRUTH[t]}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_splits_read_separately_are_scored_by_label_name(tmp_path):
    train = read_classification(write_jsonl(tmp_path / "train.jsonl", ["good", "bad", "meh"]))
    test = read_classification(write_jsonl(tmp_path / "test.jsonl", ["good", "bad", "good"]))
    assert train.label_names == ["neg", "neu", "pos"] and test.label_names == ["neg", "pos"]
    assert [e.label_name for e in test.examples] == ["pos", "neg", "pos"]
    model = FirstWordClassifier(train.label_names)  # its head speaks the training split's ids: pos = 2
    assert evaluate_classification(model, bert_tokenizer(WORDS), test.examples) == {"accuracy": 1.0}
    aligned = read_classification(tmp_path / "test.jsonl", label_names=train.label_names)
    assert [e.label for e in aligned.examples] == [2, 0, 2]


def test_a_label_the_model_does_not_know_is_named(tmp_path):
    test = read_classification(write_jsonl(tmp_path / "test.jsonl", ["good", "meh"]))
    model = FirstWordClassifier(["neg", "pos"])
    with pytest.raises(ValueError, match=r"labels \['neu'\] that the model's head does not know; its labels are \['neg', 'pos'\]"):
        evaluate_classification(model, bert_tokenizer(WORDS), test.examples)


def test_the_head_names_come_from_the_model_config():
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16), add_pooling_layer=False)
    assert model_label_names(classification_model(encoder, ["neg", "pos"])) == ["neg", "pos"]
    assert model_label_names(SimpleNamespace(config=SimpleNamespace(id2label={"1": "pos", "0": "neg"}))) == ["neg", "pos"]
    # transformers' LABEL_i placeholders carry no names: ids are compared as before
    assert model_label_names(SimpleNamespace(config=SimpleNamespace(id2label={0: "LABEL_0", 1: "LABEL_1"}))) is None


def test_integer_labels_sort_numerically(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\na\t10\nb\t2\nc\t0\nd\t1\n", encoding="utf-8")
    data = read_classification(path)
    assert data.label_names == ["0", "1", "2", "10"]
    assert [e.label for e in data.examples] == [3, 2, 0, 1]
    ints = read_classification([{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 0}])
    assert ints.label_names == ["0", "2", "10"] and [e.label_name for e in ints.examples] == ["10", "2", "0"]

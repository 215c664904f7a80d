"""Bitext retrieval: accuracy@1 by cosine of mean-pooled embeddings, at any layer of any encoder."""
import pytest
import torch
from transformers import BertConfig, BertModel

from polypeft.tasks.records import TaskDataError
from polypeft.tasks.retrieval import bitext_retrieval, read_bitext, retrieval_accuracy
from tiny_models import bert_tokenizer

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(30)]


def test_accuracy_counts_the_diagonal():
    targets = torch.eye(4)
    assert retrieval_accuracy(targets + 0.1, targets) == 1.0
    assert retrieval_accuracy(targets[[1, 0, 2, 3]], targets) == 0.5  # two rows swapped
    with pytest.raises(ValueError, match="must align row by row"):
        retrieval_accuracy(torch.eye(3), torch.eye(4)[:, :3][:4])


def test_read_bitext_from_tsv_and_rows(tmp_path):
    path = tmp_path / "de-en.tsv"
    path.write_text("source\ttarget\nHallo\tHello\nDanke\tThanks\n", encoding="utf-8")
    assert read_bitext(path) == (["Hallo", "Danke"], ["Hello", "Thanks"])
    with pytest.raises(TaskDataError, match=r"<list> row 1: columns 'de' and 'en' must be non-empty text"):
        read_bitext([{"de": "", "en": "x"}], source_column="de", target_column="en")


def test_retrieval_per_layer_on_a_tiny_encoder(tiny_tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    model, tokenizer = BertModel(config).eval(), tiny_tokenizer
    sentences = [" ".join(f"w{(i * 7 + j * 3) % 30}" for j in range(4)) for i in range(10)]
    scores = bitext_retrieval(model, tokenizer, sentences, sentences, layers=[0, 1, None])
    assert scores == {0: 1.0, 1: 1.0, None: 1.0}  # identical sides: every sentence finds itself
    shuffled = sentences[1:] + sentences[:1]
    assert bitext_retrieval(model, tokenizer, sentences, shuffled, layers=[None])[None] == 0.0

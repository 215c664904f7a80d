"""Token classification: WikiANN-format readers, first-sub-token label alignment, seqeval F1, the head."""
import json

import pytest
import torch
from transformers import BertConfig, BertModel

from polypeft.tasks.records import TaskDataError
from polypeft.tasks.tokens import (IGNORE_INDEX, WIKIANN_LABELS, encode_tokens, evaluate_tokens, predict_tokens,
                                   read_conll, read_tokens, seqeval_scores, token_classification_model)
from tiny_models import bert_tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "paris", "is", "in", "france", "berlin", "##er", "ber", "lin", "anna"]


def tiny_wordpiece():
    return bert_tokenizer(VOCAB, "WordPiece")


def test_conll_reader_strips_wikiann_language_prefixes(tmp_path):
    path = tmp_path / "wikiann-fr.tsv"
    path.write_text("fr:Anna\tB-PER\nfr:est\tO\nfr:à\tO\nfr:Paris\tB-LOC\n\nfr:Berlin\tB-LOC\n", encoding="utf-8")
    data = read_conll(path)
    assert [s.tokens for s in data.sentences] == [["Anna", "est", "à", "Paris"], ["Berlin"]]
    assert [s.lang for s in data.sentences] == ["fr", "fr"]  # the stripped prefix is kept as the language
    assert data.sentences[0].tags == [WIKIANN_LABELS.index(t) for t in ("B-PER", "O", "O", "B-LOC")]
    assert read_tokens(path).sentences == data.sentences


def test_bad_tags_name_file_and_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("Paris\tB-LOC\nis\tO\nnice\tB-MISC\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad.tsv line 3: tag 'B-MISC' is not in the label set"):
        read_conll(path)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"tokens": ["a", "b"], "ner_tags": [0, 0]}) + "\n"
                     + json.dumps({"tokens": ["a", "b"], "ner_tags": [0]}) + "\n"
                     + json.dumps({"tokens": ["a"], "ner_tags": [9]}) + "\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad.jsonl line 2: 2 tokens but 'ner_tags' is \[0\]"):
        read_tokens(jsonl)
    jsonl.write_text(json.dumps({"tokens": ["a"], "ner_tags": [9]}) + "\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad.jsonl line 1: tag id 9 outside 0..6"):
        read_tokens(jsonl)


def test_hf_dataset_with_sequence_of_class_labels():
    datasets = pytest.importorskip("datasets")
    names = ["O", "B-LOC", "I-LOC"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    dataset = datasets.Dataset.from_dict({"tokens": [["paris", "is"]], "ner_tags": [[1, 0]]}, features=features)
    data = read_tokens(dataset)
    assert data.label_names == names and data.sentences[0].tags == [1, 0]


def test_labels_sit_on_first_sub_token_only():
    tokenizer = tiny_wordpiece()
    data = read_tokens([{"tokens": ["berliner", "is", "in", "berlin"], "ner_tags": ["B-PER", "O", "O", "B-LOC"]}])
    batch = encode_tokens(tokenizer, data.sentences)
    pieces = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert pieces == ["[CLS]", "berlin", "##er", "is", "in", "berlin", "[SEP]"]
    b_per, b_loc = WIKIANN_LABELS.index("B-PER"), WIKIANN_LABELS.index("B-LOC")
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, b_per, IGNORE_INDEX, 0, 0, b_loc, IGNORE_INDEX]


def test_seqeval_is_entity_level():
    names = WIKIANN_LABELS
    gold = [[names.index(t) for t in ("B-PER", "I-PER", "O", "B-LOC")]]
    half = [[names.index(t) for t in ("B-PER", "O", "O", "B-LOC")]]  # PER span cut short: wrong entity
    assert seqeval_scores(gold, gold, names)["f1"] == 1.0
    assert seqeval_scores(half, gold, names) == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})


def test_head_learns_a_tagging():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    encoder, tokenizer = BertModel(config), tiny_wordpiece()
    model = token_classification_model(encoder, WIKIANN_LABELS)
    assert type(model).__name__ == "BertForTokenClassification"
    data = read_tokens([{"tokens": s.split(), "ner_tags": t.split()} for s, t in [
        ("anna is in paris", "B-PER O O B-LOC"), ("paris is in france", "B-LOC O O B-LOC"),
        ("berliner anna", "O B-PER")]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = encode_tokens(tokenizer, data.sentences)
    model.train()
    for _ in range(40):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert predict_tokens(model, tokenizer, data.sentences)[2] == data.sentences[2].tags
    assert evaluate_tokens(model, tokenizer, data)["f1"] == 1.0

"""Bible evaluations: canon sections, verse-level stratified splits shared by all languages, retrieval per layer."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from polypeft.experiments.bible_eval import SECTION_NAMES, canon_section, verse_classification, verse_retrieval


class FakeCorpus:
    """`BibleCorpus.parallel` over made-up verses: '<lang> w<book % 30> w<chapter> w<verse> <book>'."""

    def __init__(self, books=range(1, 67), chapters=2, verses=5):
        self.keys = [(b, c, v) for b in books for c in range(1, chapters + 1) for v in range(1, verses + 1)]

    def parallel(self, langs, books=None, max_verses=None):
        keys = [k for k in self.keys if books is None or k[0] in books][:max_verses]
        return [{**{lang: f"{lang} w{b % 30} w{c} w{v} {b}" for lang in langs}, "ref": f"{b}:{c}:{v}"} for b, c, v in keys]


def test_canon_sections():
    assert [canon_section(b) for b in (1, 5, 6, 17, 18, 22, 23, 39, 40, 44, 45, 65, 66)] == [
        "law", "law", "history", "history", "wisdom", "wisdom", "prophets", "prophets",
        "gospels_acts", "gospels_acts", "epistles", "epistles", "revelation"]
    with pytest.raises(ValueError, match="book number 67"):
        canon_section(67)


def test_verse_classification_holds_out_the_same_verses_everywhere():
    splits = verse_classification(["en", "fr"], valid_fraction=0.1, test_fraction=0.2, corpus=FakeCorpus())
    for part in ("train", "valid", "test"):
        en, fr = splits[part]["en"].examples, splits[part]["fr"].examples
        assert [e.text.split(" ", 1)[1] for e in en] == [e.text.split(" ", 1)[1] for e in fr]
        assert [e.label for e in en] == [e.label for e in fr]
    verses = {part: {e.text for e in splits[part]["en"].examples} for part in splits}
    assert not verses["train"] & verses["test"] and not verses["valid"] & verses["test"]
    # Stratified: every section shows up in the test split in proportion (revelation: 10 verses -> 2).
    test_labels = [e.label for e in splits["test"]["en"].examples]
    assert test_labels.count(SECTION_NAMES.index("revelation")) == 2
    assert test_labels.count(SECTION_NAMES.index("law")) == 10
    again = verse_classification(["en", "fr"], valid_fraction=0.1, test_fraction=0.2, corpus=FakeCorpus())
    assert again["test"]["en"].examples == splits["test"]["en"].examples  # seeded


def test_verse_retrieval_scores_every_layer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "en", "fr"] + [f"w{i}" for i in range(30)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    results = verse_retrieval(BertModel(config).eval(), tokenizer, ["en", "fr"], books=[43], prefix="",
                              corpus=FakeCorpus(chapters=3, verses=4))
    assert list(results) == ["fr"] and list(results["fr"]) == [0, 1, 2]
    assert all(0.0 <= acc <= 1.0 for acc in results["fr"].values())
    assert results["fr"][0] > 0.5  # at the embedding layer the shared verse words dominate


def test_classify_recipe_scores_the_valid_split_and_leaves_the_test_split_as_it_was(monkeypatch):
    import polypeft.experiments.bible_eval as bible_eval
    from polypeft.cli.encoder import ClassifyRecipe, classification_data
    from polypeft.core.config import ConfigError

    monkeypatch.setattr(bible_eval, "_corpus", lambda corpus: FakeCorpus())
    langs = ["en", "fr"]
    train0, test0, _ = classification_data(ClassifyRecipe(languages=langs, verses_per_section=None))
    recipe = ClassifyRecipe(languages=langs, verses_per_section=None, valid_fraction=0.2)
    train, test, _ = classification_data(recipe)
    _, valid, _ = classification_data(ClassifyRecipe(languages=langs, verses_per_section=None, valid_fraction=0.2,
                                                     score="valid"))
    texts = lambda split: {e.text for e in split["en"].examples}  # noqa: E731
    assert texts(test) == texts(test0)  # the held-out valid verses come out of training, never out of test
    assert texts(valid) and not texts(valid) & texts(test) and not texts(valid) & texts(train)
    assert texts(train) | texts(valid) == texts(train0)
    with pytest.raises(ConfigError, match="score='valid' needs valid_fraction > 0"):
        ClassifyRecipe(languages=langs, score="valid")
    with pytest.raises(ConfigError, match="valid_fraction=0.5 \\+ test_fraction=0.5 leave no training verses"):
        ClassifyRecipe(languages=langs, valid_fraction=0.5, test_fraction=0.5)

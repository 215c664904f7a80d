"""Encoder tasks with LMS (+FD): readers record each example's language, prediction routes by it, training learns."""
import json
from dataclasses import replace

import pytest
import torch
from transformers import BertConfig, BertModel

import polypeft as pp
from polypeft.backbones.e5 import embed_layers
from polypeft.tasks.classification import (ClassificationExample, classification_model, encode_classification,
                                           evaluate_classification, predict_classification, read_classification)
from polypeft.tasks.qa import QAExample, encode_qa, evaluate_qa, predict_qa, qa_model, read_qa
from polypeft.tasks.records import TaskDataError
from polypeft.tasks.retrieval import bitext_retrieval, retrieval_accuracy
from polypeft.tasks.tokens import (WIKIANN_LABELS, TaggedSentence, TokenData, encode_tokens, evaluate_tokens,
                                   predict_tokens, read_conll, read_tokens, token_classification_model)
from tiny_models import bert_tokenizer, randomize_added

CONTEXTS = ["anna was born in paris in 1889 and lives in berlin with her dog",
            "the tower in rome was built by marco for the fair in 1900"]
WORDS = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "who", "where", "when", "good", "bad", "movie"]
         + sorted({w for c in CONTEXTS for w in c.split()}))
LANGUAGES = ["de", "fr", "sw"]  # "sw" never appears in training data: its routes must stay untouched
TRAIN_LANGUAGES = ["de", "fr", "de", "fr"]


def tiny_encoder():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config, add_pooling_layer=False)


def lms(model, shared_route=False):
    # The whole encoder trains with its routes here (a tiny random encoder has nothing to keep frozen).
    return pp.wrap(model, pp.LMSConfig(languages=LANGUAGES, rank=2, synthesis="language", shared_route=shared_route,
                                       freeze_base=False))


# ---------------------------------------------------------------------------------------------- the three tasks

def token_sentences():
    tags = [WIKIANN_LABELS.index(t) for t in ("B-PER", "O", "O", "O", "B-LOC")]
    return [TaggedSentence(["anna", "was", "born", "in", "paris"], tags, "de"),
            TaggedSentence(["marco", "lives", "in", "rome"], [1, 0, 0, 5], "fr"),
            TaggedSentence(["her", "dog", "lives", "in", "berlin", "with", "anna"], [0, 0, 0, 0, 5, 0, 1], "de"),
            TaggedSentence(["the", "tower", "in", "rome"], [0, 0, 0, 5], "fr")]


def qa_examples():
    def example(qid, question, context, answer, lang):
        return QAExample(qid, question, context, (answer,), (context.index(answer),), lang)
    return [example("a", "who was born", CONTEXTS[0], "anna", "de"),
            example("b", "where", CONTEXTS[1], "rome", "fr"),
            example("c", "where was anna born", CONTEXTS[0], "paris", "de"),
            example("d", "when was the tower built", CONTEXTS[1], "1900", "fr")]


def classification_examples():
    return [ClassificationExample("good movie", 1, None, "de"), ClassificationExample("bad movie", 0, None, "fr"),
            ClassificationExample("bad dog", 0, None, "de"), ClassificationExample("good tower", 1, None, "fr")]


def as_list(predictions):
    return list(predictions.values()) if isinstance(predictions, dict) else list(predictions)


TASKS = {
    "tokens": dict(model=lambda: token_classification_model(tiny_encoder(), WIKIANN_LABELS), examples=token_sentences,
                   predict=predict_tokens,
                   evaluate=lambda m, t, xs, **kw: evaluate_tokens(m, t, TokenData(xs, WIKIANN_LABELS), **kw),
                   encode=lambda t, xs: (encode_tokens(t, xs), [x.lang for x in xs])),
    "qa": dict(model=lambda: qa_model(tiny_encoder()), examples=qa_examples, predict=predict_qa, evaluate=evaluate_qa,
               encode=lambda t, xs: (lambda e: (e["inputs"], [xs[i].lang for i in e["example_index"]]))(
                   encode_qa(t, xs, max_length=40, stride=8))),
    "classification": dict(model=lambda: classification_model(tiny_encoder(), ["neg", "pos"]),
                           examples=classification_examples, predict=predict_classification,
                           evaluate=evaluate_classification,
                           encode=lambda t, xs: (encode_classification(t, xs), [x.lang for x in xs])),
}


def routed_task(name, shared_route=False):
    task = TASKS[name]
    poly = lms(task["model"]().double(), shared_route)
    randomize_added(poly, scale=1.0)
    return poly, task


# ---------------------------------------------------------------------------------------------- readers

def test_readers_record_an_explicit_language():
    tokens = read_tokens([{"tokens": ["anna"], "ner_tags": [1]}], language="de")
    labels = read_classification([{"text": "good", "label": "pos"}], language="fr")
    qa = read_qa([{"id": "x", "question": "q", "context": "anna", "answers": {"text": ["anna"], "answer_start": [0]}}],
                 language="sw")
    assert (tokens.sentences[0].lang, labels.examples[0].lang, qa[0].lang) == ("de", "fr", "sw")
    assert read_tokens([{"tokens": ["anna"], "ner_tags": [1]}]).sentences[0].lang is None


def test_wikiann_prefixes_give_each_sentence_its_language(tmp_path):
    path = tmp_path / "wikiann.tsv"
    path.write_text("fr:Anna\tB-PER\nfr:à\tO\n\nde:Berlin\tB-LOC\n", encoding="utf-8")
    assert [s.lang for s in read_tokens(path).sentences] == ["fr", "de"]
    assert [s.lang for s in read_conll(path, language="sw").sentences] == ["sw", "sw"]  # explicit wins
    path.write_text("fr:Anna\tB-PER\nde:Berlin\tB-LOC\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"wikiann.tsv line 2: token 'de:Berlin' has language prefix 'de' "
                                            r"but its sentence began in 'fr'"):
        read_conll(path)


def test_language_columns_are_read_and_must_agree_within_an_example():
    rows = [{"tokens": ["anna", "paris"], "ner_tags": [1, 5], "langs": ["de", "de"]},
            {"tokens": ["rome"], "ner_tags": [5], "langs": ["fr"]}]
    assert [s.lang for s in read_tokens(rows, language_column="langs").sentences] == ["de", "fr"]
    rows[1]["langs"] = ["fr", "de"]
    with pytest.raises(TaskDataError, match=r"<list> row 2: language column 'langs' disagrees within the "
                                            r"example: \['de', 'fr'\]"):
        read_tokens(rows, language_column="langs")
    labelled = read_classification([{"text": "good", "label": "pos", "lang": "sw"}], language_column="lang")
    assert labelled.examples[0].lang == "sw"
    qa = read_qa([{"id": "x", "question": "q", "context": "anna", "lang": "fr",
                   "answers": {"text": ["anna"], "answer_start": [0]}}], language_column="lang")
    assert qa[0].lang == "fr"
    with pytest.raises(TaskDataError, match=r"<list> row 1: missing column\(s\) \['lang'\]"):
        read_classification([{"text": "good", "label": "pos"}], language_column="lang")
    with pytest.raises(ValueError, match="pass one code for the whole source or a column, not both"):
        read_tokens(rows, language="de", language_column="langs")


def test_tydiqa_goldp_ids_name_the_language(tmp_path):
    context = "anna was born in paris"
    qas = [{"id": qid, "question": "who", "answers": [{"text": "anna", "answer_start": 0}]}
           for qid in ("finnish-123-0", "swahili-9-1", "q-who", "klingon-1")]
    path = tmp_path / "tydiqa-goldp-dev.json"
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": context, "qas": qas}]}]}), encoding="utf-8")
    assert [e.lang for e in read_qa(path)] == ["fi", "sw", None, None]
    assert [e.lang for e in read_qa(path, language="en")] == ["en"] * 4
    flat = [{"id": "telugu-5", "question": "who", "context": context, "answers": {"text": ["anna"], "answer_start": [0]}}]
    assert read_qa(flat)[0].lang == "te"


# ---------------------------------------------------------------------------------------------- routed prediction

@pytest.mark.parametrize("name", list(TASKS))
def test_prediction_routes_each_example_by_its_language(name, tiny_tokenizer):
    poly, task = routed_task(name)
    tokenizer, examples, predict = tiny_tokenizer, task["examples"](), task["predict"]
    mixed = as_list(predict(poly, tokenizer, examples, batch_size=3))  # mixed languages, two batches
    alone = [as_list(predict(poly, tokenizer, [example]))[0] for example in examples]
    assert mixed == alone
    swapped = [replace(e, lang={"de": "fr", "fr": "de"}[e.lang]) for e in examples]
    assert as_list(predict(poly, tokenizer, swapped, batch_size=3)) != mixed


@pytest.mark.parametrize("name", list(TASKS))
def test_shared_route_overrides_languages_on_an_fd_model(name, tiny_tokenizer):
    poly, task = routed_task(name, shared_route=True)
    tokenizer, examples, predict = tiny_tokenizer, task["examples"](), task["predict"]
    unlabelled = [replace(e, lang=None) for e in examples]
    shared = as_list(predict(poly, tokenizer, unlabelled, route="shared"))
    assert shared == as_list(predict(poly, tokenizer, examples, route="shared"))
    assert shared != as_list(predict(poly, tokenizer, examples))
    assert task["evaluate"](poly, tokenizer, unlabelled, route="shared") == \
        task["evaluate"](poly, tokenizer, examples, route="shared")


@pytest.mark.parametrize("name", list(TASKS))
def test_a_missing_language_is_named_and_plain_models_refuse_routes(name, tiny_tokenizer):
    poly, task = routed_task(name)
    tokenizer, examples = tiny_tokenizer, task["examples"]()
    examples[2] = replace(examples[2], lang=None)
    with pytest.raises(pp.LanguageError, match=r"example 2 has no language .*pass language= to the reader"):
        task["evaluate"](poly, tokenizer, examples)
    plain = task["model"]()
    assert len(as_list(task["predict"](plain, tokenizer, examples))) == len(examples)
    with pytest.raises(pp.LanguageError, match=r"route='shared' was given but Bert\w+ has no language routes"):
        task["predict"](plain, tokenizer, examples, route="shared")


# ---------------------------------------------------------------------------------------------- training

def route_rows(poly, code):
    """Every LMS F factor row of one route (F starts at zero, so a non-zero row has been trained)."""
    route = poly.registry.id_of(code)
    return torch.cat([layer.lms_F[route].flatten() for layer in poly.routed_layers.values()])


@pytest.mark.slow
@pytest.mark.parametrize("shared_route", [False, True], ids=["lms", "lms_fd"])
@pytest.mark.parametrize("name", list(TASKS))
def test_training_lowers_the_loss_and_trains_only_the_routes_used(name, shared_route, tiny_tokenizer):
    task = TASKS[name]
    poly = lms(task["model"](), shared_route)
    inputs, languages = task["encode"](tiny_tokenizer, task["examples"]())
    settings = pp.TaskTrainingSettings.from_values(steps=30, batch_size=4, lr=3e-3, route_lr=1e-2, warmup=3)
    losses = pp.train_task(poly, inputs, languages, settings, progress=False)
    assert len(losses) == 30 and sum(losses[-3:]) < 0.5 * sum(losses[:3])
    assert route_rows(poly, "de").abs().sum() > 0 and route_rows(poly, "fr").abs().sum() > 0
    assert torch.count_nonzero(route_rows(poly, "sw")) == 0  # no "sw" example: no gradient reached its route
    if shared_route:
        assert route_rows(poly, "shared").abs().sum() > 0  # only FD's doubled pass uses the shared route


def test_training_a_plain_model_and_bad_inputs(tiny_tokenizer):
    task = TASKS["tokens"]
    inputs, languages = task["encode"](tiny_tokenizer, task["examples"]())
    settings = pp.TaskTrainingSettings.from_values(steps=20, batch_size=4, lr=3e-3, warmup=2)
    losses = pp.train_task(task["model"](), inputs, None, settings, progress=False)
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])
    with pytest.raises(pp.LanguageError, match="example 0 has no language"):
        pp.train_task(lms(task["model"]()), inputs, None, settings, progress=False)
    with pytest.raises(ValueError, match=r"3 languages for 4 input rows"):
        pp.train_task(task["model"](), inputs, languages[:3], settings, progress=False)
    unlabelled = {k: v for k, v in inputs.items() if k != "labels"}
    with pytest.raises(ValueError, match="but no labels: training needs 'labels'"):
        pp.train_task(task["model"](), unlabelled, languages, settings, progress=False)


def test_training_settings_are_checked_by_name():
    with pytest.raises(pp.ConfigError, match=r"TaskTrainingSettings: training.steps=0 must be a positive int"):
        pp.TaskTrainingSettings.from_values(steps=0)  # the flat key of older code, read into the training block
    with pytest.raises(pp.ConfigError, match=r"TaskTrainingSettings.route_lr=-1 must be a positive number or null"):
        pp.TaskTrainingSettings(route_lr=-1)
    with pytest.raises(pp.ConfigError, match=r"TaskTrainingSettings.kl_weight=-0.5 must be a number >= 0"):
        pp.TaskTrainingSettings(kl_weight=-0.5)
    for name, shown in (("lr", "training.lr"), ("route_lr", "route_lr"), ("kl_weight", "kl_weight"),
                        ("max_grad_norm", "training.clip_norm")):  # NaN slips past every `<` and `>` check
        for value in (float("nan"), float("inf")):
            with pytest.raises(pp.ConfigError, match=rf"{shown}={value} must be a finite number"):
                pp.TaskTrainingSettings.from_values(**{name: value})
    assert pp.TaskTrainingSettings(kl_weight=0.0, route_lr=None).kl_weight == 0.0


# ---------------------------------------------------------------------------------------------- retrieval

def test_embeddings_and_bitext_retrieval_follow_each_side_language(tiny_tokenizer):
    poly = lms(tiny_encoder().double(), shared_route=True)
    randomize_added(poly, scale=1.0)
    tokenizer = tiny_tokenizer
    texts = ["anna was born in paris", "rome", "the tower in rome was built by marco", "her dog"]
    langs = ["de", "fr", "de", "sw"]
    mixed = embed_layers(poly, tokenizer, texts, [None], prefix="", lang=langs, batch_size=3)[None]
    alone = torch.cat([embed_layers(poly, tokenizer, [t], [None], prefix="", lang=l)[None]
                       for t, l in zip(texts, langs)])
    assert torch.allclose(mixed, alone, atol=1e-6)  # length-sorted batches still route each text by its language
    german = embed_layers(poly, tokenizer, texts, [None], prefix="", lang="de")[None]
    french = embed_layers(poly, tokenizer, texts, [None], prefix="", lang="fr")[None]
    assert not torch.allclose(german, french, atol=1e-3)
    scores = bitext_retrieval(poly, tokenizer, texts, texts, layers=[None, 1], source_lang="de", target_lang="fr")
    assert scores[None] == retrieval_accuracy(german, french)
    assert bitext_retrieval(poly, tokenizer, texts, texts, source_lang="fr", target_lang="fr")[None] == 1.0
    assert bitext_retrieval(poly, tokenizer, texts, texts, route="shared")[None] == 1.0
    with pytest.raises(pp.LanguageError, match="source_lang and target_lang missing"):
        bitext_retrieval(poly, tokenizer, texts, texts)

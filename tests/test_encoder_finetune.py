"""Encoder fine-tuning with naive / LMS / LMS+FD, the frozen-layer cache, and the encode|retrieve|classify CLI."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from polypeft.cli.main import main as cli_main
from polypeft.core.config import ConfigError
from polypeft.model.poly_model import PolyModel
from polypeft.tasks import encoder_finetune as ef
from polypeft.tasks.encoder_finetune.evaluation import correct_per_language
from polypeft.tasks.classification import ClassificationData, ClassificationExample
from test_tasks_classification import WORDS, tiny_encoder  # noqa: F401 (tiny_tokenizer reads WORDS)

LABELS = ["neg", "pos"]
LANGS = ["en", "fr"]
# Two "languages" sharing a vocabulary: fr reverses the word order, so a route per language has something to learn.
TEXTS = {"pos": ["good movie", "great food", "very good", "fine movie", "very great food"],
         "neg": ["bad movie", "awful food", "very bad", "poor movie", "very poor food"]}


def toy_data():
    data = {}
    for lang in LANGS:
        examples = []
        for label, texts in TEXTS.items():
            for text in texts:
                words = text.split() if lang == "en" else text.split()[::-1]
                examples.append(ClassificationExample(" ".join(words), LABELS.index(label)))
        data[lang] = ClassificationData(examples, LABELS)
    return data


def settings(**changes):
    base = dict(steps=30, batch_size=8, lr=5e-3, route_lr=5e-3, warmup=2, max_length=16, rank=2)
    return ef.FinetuneSettings.from_values(**{**base, **changes})


def test_cached_lower_layers_give_the_same_logits_as_the_full_model(tiny_tokenizer):
    encoder, tokenizer = tiny_encoder(), tiny_tokenizer
    data = toy_data()
    full = ef.build_classifier(encoder, LABELS, LANGS, settings(method="lms", frozen_layers=0))
    cut = ef.build_classifier(encoder, LABELS, LANGS, settings(method="lms", frozen_layers=1))
    # Same seed, same head. The full model also routes layer 0, which the cut model froze: zero those routes.
    # Routes keep the full encoder's layer names; give layer 1's routes the same non-zero values in both.
    cut_state = cut.model.added_state_dict()
    with torch.no_grad():
        for name, value in full.model.added_state_dict().items():
            if ".layer.0." in name:
                value.zero_()
            else:
                value.copy_(torch.randn_like(value) * 0.3)
                cut_state[name].copy_(value)
    cut.model.base_model.classifier.load_state_dict(full.model.base_model.classifier.state_dict())
    ids = ef.encode_examples(encoder, tokenizer, data, 16, frozen_layers=0, progress=False)
    states = ef.encode_examples(encoder, tokenizer, data, 16, frozen_layers=1, progress=False)
    assert states.holds_states and not ids.holds_states
    index = list(range(len(ids)))
    for classifier, examples in ((full, ids), (cut, states)):
        classifier.model.eval()
    with torch.no_grad():
        expected = full.logits(ids.batch(index), ids.langs)
        got = cut.logits(states.batch(index), states.langs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # LMS only on the trained layer 1: its two FFN linears x 2 languages.
    assert cut.parameter_counts["language_specific"] == full.parameter_counts["language_specific"] // 2


@pytest.mark.parametrize("method", ef.METHODS)
def test_each_method_learns_and_reports_its_variants(method, tiny_tokenizer):
    encoder, tokenizer = tiny_encoder(), tiny_tokenizer
    train = ef.encode_examples(encoder, tokenizer, toy_data(), 16, progress=False)
    spec = ef.ExperimentSpec(LANGS, None, [method], [0])
    results = ef.run_experiment(encoder, spec, settings(steps=40), train, train, LABELS, progress=False)
    variants = {run["variant"] for run in results["runs"]}
    expected = {"naive": {"naive"}, "lms": {"lms"}, "lms_fd": {"lms_fd_share", "lms_fd_ls"}}[method]
    assert variants == expected
    for run in results["runs"]:
        assert run["last_loss"] < run["first_loss"]
        assert set(run["accuracy"]) == {"en", "fr", "average"}
        for lang in ("en", "fr"):  # per-example outcomes, what the bootstrap intervals resample, stored beside
            assert len(run["correct"][lang]) == sum(l == lang for l in train.langs)
            assert run["accuracy"][lang] == round(100.0 * sum(run["correct"][lang]) / len(run["correct"][lang]), 2)
    table = results["parameters"]
    if method == "lms_fd":
        share, ls = table["lms_fd_share"], table["lms_fd_ls"]
        assert 0 < share["inference_extra"] < ls["inference_extra"]
    if method == "naive":
        assert table["naive"]["inference_extra"] == 0
    assert "| variant |" in ef.markdown_report(results)


def test_per_example_outcomes_follow_the_predictions(tiny_tokenizer):
    encoder, tokenizer = tiny_encoder(), tiny_tokenizer
    test = ef.encode_examples(encoder, tokenizer, toy_data(), 16, progress=False)
    classifier = ef.build_classifier(encoder, LABELS, LANGS, settings())
    predictions = ef.predict(classifier, test, "none")
    correct = correct_per_language(classifier, test, "none")
    expected = {lang: [int(p == y) for p, y, l in zip(predictions, test.labels.tolist(), test.langs) if l == lang]
                for lang in LANGS}
    assert correct == expected and 0 < sum(map(sum, correct.values())) < len(predictions)


def test_only_routes_of_the_batch_languages_train(tiny_tokenizer):
    encoder, tokenizer = tiny_encoder(), tiny_tokenizer
    data = toy_data()
    train = ef.encode_examples(encoder, tokenizer, data, 16, progress=False)
    english_examples = train.subset(["en"])
    classifier = ef.build_classifier(encoder, LABELS, LANGS + ["de"], settings(method="lms"))
    assert isinstance(classifier.model, PolyModel)
    before = {k: v.clone() for k, v in classifier.model.added_state_dict().items()}
    ef.finetune(classifier, english_examples, settings(method="lms", steps=3), progress=False)
    after = classifier.model.added_state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the English routes should have moved"
    english = classifier.model.registry.id_of("en")
    for name in changed:  # every changed tensor is stored per language; only row "en" moved
        moved_rows = (before[name] != after[name]).flatten(1).any(1).nonzero().flatten().tolist()
        assert moved_rows == [english], name


def test_throughput_compares_every_method_on_the_same_batches(tiny_tokenizer):
    encoder, tokenizer = tiny_encoder(), tiny_tokenizer
    train = ef.encode_examples(encoder, tokenizer, toy_data(), 16, progress=False)
    # naive listed last: the ratios are still taken against it
    classifiers = {m: ef.build_classifier(encoder, LABELS, LANGS, settings(method=m)) for m in ef.METHODS[::-1]}
    result = ef.measure_throughput(classifiers, train, settings(), steps=2, progress=False)
    assert set(result["examples_per_s"]) == set(ef.METHODS)
    assert result["relative_to"] == "naive" and result["relative"]["naive"] == 1.0
    assert all(v > 0 for v in result["examples_per_s"].values())


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="method='adapter'"):
        ef.FinetuneSettings(method="adapter")
    with pytest.raises(ConfigError, match="FinetuneSettings.rank=0"):
        ef.FinetuneSettings(rank=0)
    with pytest.raises(ConfigError, match=r"FinetuneSettings.freeze_embeddings='false' must be true or false"):
        ef.FinetuneSettings(freeze_embeddings="false")  # a quoted "false" would have frozen them
    with pytest.raises(ConfigError, match=r"FinetuneSettings.kl_weight='1' must be a number >= 0"):
        ef.FinetuneSettings(kl_weight="1")
    with pytest.raises(ConfigError, match=r"train_languages \['xx'\] are not in languages"):
        ef.ExperimentSpec(LANGS, ["xx"])
    with pytest.raises(ConfigError, match=r"ExperimentSpec.methods\[0\]='adapter' is not allowed"):
        ef.ExperimentSpec(LANGS, methods=["adapter"])
    with pytest.raises(ConfigError, match=r"ExperimentSpec.seeds\[0\]=-1 must be an int >= 0"):
        ef.ExperimentSpec(LANGS, seeds=[-1])
    with pytest.raises(ConfigError, match="frozen_layers=5 but the encoder has 2 layers"):
        ef.build_classifier(tiny_encoder(), LABELS, LANGS, settings(frozen_layers=5))


# ----------------------------------------------------------------------------- CLI on a local model directory

@pytest.fixture()
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny-bert"
    tiny_encoder().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def test_cli_encode_writes_one_embedding_per_line(tmp_path, model_dir, capsys, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_text("good movie\nbad food\nvery great food\n", encoding="utf-8")
    out = tmp_path / "emb.safetensors"
    config = write_yaml(tmp_path / "encode.yaml", {"model": str(model_dir), "input": str(texts), "output": str(out),
                                                   "prefix": ""})
    assert cli_main(["encode", config]) == 0
    embeddings = load_file(out)["embeddings"]
    assert embeddings.shape == (3, 32)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    texts.write_text("good movie\n\nbad\n", encoding="utf-8")
    assert cli_main(["encode", config]) == 2  # bad input: the message, no traceback
    assert "texts.txt line 2: empty line" in capsys.readouterr().err
    monkeypatch.setenv("POLYPEFT_TRACEBACK", "1")
    with pytest.raises(ConfigError, match=r"texts.txt line 2: empty line"):
        cli_main(["encode", config])


def test_cli_retrieve_on_bitext_files(tmp_path, model_dir):
    rows = [{"source": s, "target": s} for s in ("good movie", "bad food", "very poor movie")]
    bitext = tmp_path / "fr-en.jsonl"
    bitext.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = write_yaml(tmp_path / "retrieve.yaml", {"model": str(model_dir), "bitext": {"fr": str(bitext)},
                                                     "layers": [0, 2], "prefix": "", "output_dir": str(tmp_path / "r")})
    assert cli_main(["retrieve", config]) == 0
    results = json.loads((tmp_path / "r" / "retrieve.json").read_text())
    # identical sentences on both sides: each finds itself
    assert results["accuracy_at_1"]["fr"] == {"0": 100.0, "2": 100.0}
    assert "| fr |" in (tmp_path / "r" / "retrieve.md").read_text()


def test_cli_classify_on_local_files_and_unknown_keys(tmp_path, model_dir, capsys):
    files = {}
    for lang, data in toy_data().items():
        path = tmp_path / f"{lang}.jsonl"
        path.write_text("".join(json.dumps({"text": e.text, "label": LABELS[e.label]}) + "\n" for e in data.examples),
                        encoding="utf-8")
        files[lang] = str(path)
    recipe = {"model": str(model_dir), "languages": LANGS, "methods": ["naive", "lms_fd"], "seeds": [0],
              "files": {"train": files, "test": files}, "steps": 20, "batch_size": 8, "lr": 5e-3, "rank": 2,
              "max_length": 16, "frozen_layers": 1, "prefix": "", "throughput_steps": 1,
              "output_dir": str(tmp_path / "c")}
    config = write_yaml(tmp_path / "classify.yaml", recipe)
    assert cli_main(["classify", config, "--set", "seeds=[3]"]) == 0
    results = json.loads((tmp_path / "c" / "classify.json").read_text())
    assert {r["seed"] for r in results["runs"]} == {3}
    assert set(results["summary"]) == {"naive", "lms_fd_share", "lms_fd_ls"}
    assert set(results["throughput"]["examples_per_s"]) == {"naive", "lms_fd"}
    assert cli_main(["classify", config, "--set", "epochs=3"]) == 2
    assert "unknown keys ['epochs']" in capsys.readouterr().err
    bad = tmp_path / "fr_bad.jsonl"
    bad.write_text(json.dumps({"text": "good", "label": "neutral"}) + "\n", encoding="utf-8")
    files_with_bad_line = f"files={{train: {{en: {files['en']}, fr: {bad}}}, test: {{en: {files['en']}, fr: {files['fr']}}}}}"
    assert cli_main(["classify", config, "--set", files_with_bad_line]) == 2
    assert "fr_bad.jsonl line 1: label 'neutral' is not in the label set" in capsys.readouterr().err


def test_lirp_on_cached_states_moves_each_language_onto_the_pivot_mean(tiny_tokenizer):
    encoder, tokenizer = tiny_encoder(), tiny_tokenizer
    states = ef.encode_examples(encoder, tokenizer, toy_data(), 16, frozen_layers=1, progress=False)
    means = ef.language_means(states)
    # the hand-computed mean of the French examples' token-averaged states
    french = [item.mean(0) for item, lang in zip(states.items, states.langs) if lang == "fr"]
    torch.testing.assert_close(means["fr"], torch.stack(french).mean(0))
    shifted = ef.lirp_shifted(states, means, pivot="en")
    after = ef.language_means(shifted)
    torch.testing.assert_close(after["fr"], means["en"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after["en"], means["en"])  # the pivot does not move
    with pytest.raises(ValueError, match=r"no language mean for \['de'\]"):
        ef.lirp_shifted(states, means, pivot="de")


def test_lirp_variant_is_scored_beside_the_plain_one(tiny_tokenizer):
    encoder, tokenizer = tiny_encoder(), tiny_tokenizer
    states = ef.encode_examples(encoder, tokenizer, toy_data(), 16, frozen_layers=1, progress=False)
    shifted = ef.lirp_shifted(states, ef.language_means(states))
    spec = ef.ExperimentSpec(LANGS, ["en"], ["naive"], [0], "zero-shot")
    results = ef.run_experiment(encoder, spec, settings(frozen_layers=1, steps=5), states, states, LABELS,
                                progress=False, test_variants={"+lirp": shifted})
    assert set(results["summary"]) == {"naive", "naive+lirp"}
    plain, lirp = (next(r for r in results["runs"] if r["variant"] == v) for v in ("naive", "naive+lirp"))
    assert plain["accuracy"]["en"] == lirp["accuracy"]["en"]  # English is the pivot: unchanged

"""Issue 27: no command writes over its own input; one model serves many threads without a silent wrong output;
degenerate input (odd language codes, a bad regex, a duplicated language, a negative seed, a newline in a name,
positions past the model's, training a merged route, wrapping twice) gets a message before any work."""
from __future__ import annotations

import re
import threading

import pytest
import torch
import yaml

import polypeft as pp
from polypeft.core.routing import ConcurrentUseError
from polypeft.interventions.capture import InterventionError
from polypeft.interventions.lrp2 import language_vectors
from test_bad_config import SMALL_MMT, no_data_preparation, refused, write_yaml  # noqa: F401  (a fixture)
from test_lrp2 import TEXTS, WORDS, tiny_bert  # noqa: F401  (WORDS: the tiny_tokenizer fixture's vocabulary)
from tiny_models import build, output_of, random_batch, randomize_added

LANGS = ["en", "de", "fr"]


def lms(kind: str = "bart") -> pp.PolyModel:
    poly = pp.wrap(build(kind), pp.LMSConfig(languages=LANGS, rank=2, synthesis="pair"))
    randomize_added(poly)
    return poly.eval()


# ---------------------------------------------------------------------------------------------- own inputs

def test_encode_refuses_to_write_its_embeddings_over_its_input(tmp_path, capsys, no_data_preparation):
    texts = tmp_path / "texts.txt"
    texts.write_text("in the beginning\n", encoding="utf-8")
    config = write_yaml(tmp_path / "encode.yaml", {"input": str(texts)})
    message = refused(["encode", config, "--set", f"output={texts}"], capsys)
    assert "encode: output=" in message and "is the same file or folder as encode: input=" in message
    assert texts.read_text(encoding="utf-8") == "in the beginning\n"
    (tmp_path / "link.safetensors").symlink_to(texts)  # a link to the input is the input
    assert "is the same file" in refused(["encode", config, "--set", f"output={tmp_path / 'link.safetensors'}"],
                                         capsys)
    assert "the recipe=" in refused(["encode", config, "--set", f"output={config}"], capsys)
    assert texts.read_text(encoding="utf-8") == "in the beginning\n"


def test_an_output_folder_holding_an_input_or_inside_one_is_refused(tmp_path, capsys, no_data_preparation):
    data = tmp_path / "data"
    data.mkdir()
    (data / "fr.tsv").write_text("source\ttarget\nun\tone\n", encoding="utf-8")
    config = write_yaml(tmp_path / "retrieve.yaml", {"bitext": {"fr": str(data / "fr.tsv")}})
    assert "is a folder holding the input retrieve: bitext.fr=" in refused(
        ["retrieve", config, "--set", f"output_dir={data}"], capsys)
    runs = tmp_path / "runs"
    (runs / "lms-seed0").mkdir(parents=True)
    assert "lies inside the input folder runs[0]=" in refused(
        ["mmt", "compare", str(runs / "lms-seed0"), "--out", str(runs / "lms-seed0" / "compare")], capsys)


def test_mmt_overwrite_never_clears_a_folder_holding_its_recipe(tmp_path, capsys, no_data_preparation):
    run = tmp_path / "runs" / "r-seed0"
    run.mkdir(parents=True)
    config = write_yaml(run / "recipe.yaml", {**SMALL_MMT, "output_dir": str(tmp_path / "runs")})
    message = refused(["mmt", "train", config, "--overwrite"], capsys)
    assert "output_dir/name=" in message and "is a folder holding the input the recipe=" in message
    assert (run / "recipe.yaml").is_file()


# ---------------------------------------------------------------------------------------------- threads

def test_disable_adapter_in_one_thread_leaves_the_others_on_their_routes():
    model = lms()
    batch = random_batch("bart", 2)
    routed = output_of(model, batch, src_lang="de", tgt_lang="fr")
    with model.disable_adapter():
        plain = output_of(model, batch)
    inside, leave, wrong, errors = threading.Event(), threading.Event(), [], []

    def disabled_thread():
        with model.disable_adapter():
            inside.set()
            torch.testing.assert_close(output_of(model, batch), plain)
            leave.wait(30)

    def routed_thread():
        inside.wait(30)
        try:
            for _ in range(20):
                if not torch.allclose(output_of(model, batch, src_lang="de", tgt_lang="fr"), routed):
                    wrong.append("a routed call gave another output")
        except Exception as error:  # handed to the test thread
            errors.append(error)
        leave.set()

    threads = [threading.Thread(target=disabled_thread), threading.Thread(target=routed_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and not wrong and not torch.allclose(plain, routed)


def test_merge_refuses_while_another_thread_runs_the_model_and_calls_refuse_during_a_merge():
    model = lms()
    batch = random_batch("bart", 2)
    inside, leave = threading.Event(), threading.Event()

    def running_thread():
        with model.routes(src_lang="de", tgt_lang="fr"):
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=running_thread)
    thread.start()
    inside.wait(30)
    try:
        with pytest.raises(ConcurrentUseError, match=r"merge\(\) changes the weights every thread uses, but 1 "
                                                     r"call\(s\) of this model are running in other threads"):
            model.merge(src="de", tgt="fr")
    finally:
        leave.set()
        thread.join(30)
    assert model.merged_route is None
    outcome = []
    with model.calls.alone("merge"):  # a merge in progress in this thread
        worker = threading.Thread(target=lambda: outcome.append(pytest.raises(
            ConcurrentUseError, lambda: model(**batch, src_lang="de", tgt_lang="fr"))))
        worker.start()
        worker.join(30)
    assert outcome and "being changed by merge() in another thread" in str(outcome[0].value)
    model.merge(src="de", tgt="fr")  # alone now: allowed
    model.unmerge()


# ---------------------------------------------------------------------------------------------- degenerate input

@pytest.mark.parametrize("languages, message", [
    (["en", " "], r"languages\[1\]=' ' holds whitespace \(' '\)"),
    (["en", "en\n"], r"languages\[1\]='en\\n' holds whitespace \('\\n'\)"),
    (["en", "d\u200be"], r"languages\[1\]='d\\u200be' holds the control or format character"),
    (["\u00e9n", "e\u0301n"], r"lists \['\u00e9n'\] more than once \(as '\\xe9n' and 'e\\u0301n': two Unicode "
                              r"spellings of one code; codes are compared in NFC\)"),
])
def test_language_codes_are_one_word_in_one_spelling(languages, message):
    with pytest.raises(pp.ConfigError, match=message):
        pp.LMSConfig(languages=languages)
    with pytest.raises(pp.LanguageError, match=message):
        pp.LanguageRegistry(languages)


def test_either_spelling_of_a_code_reaches_the_same_route():
    decomposed, composed = "e\u0301s", "\u00e9s"
    config = pp.LMSConfig(languages=["en", decomposed], rank=2)
    assert config.languages == ["en", composed], "codes are kept in NFC"
    model = pp.wrap(build("bart"), config)
    randomize_added(model)
    batch = random_batch("bart", 2)
    torch.testing.assert_close(output_of(model.eval(), batch, src_lang=decomposed, tgt_lang="en"),
                               output_of(model, batch, src_lang=composed, tgt_lang="en"))


def test_an_invalid_target_modules_regex_is_a_message_in_the_library_and_the_cli(tmp_path, capsys,
                                                                                    no_data_preparation):
    with pytest.raises(pp.ConfigError, match=r"target_modules='fc\[1' is not a valid regular expression "
                                             r"\(unterminated character set at position 2\)"):
        pp.LMSConfig(languages=LANGS, target_modules="fc[1")
    config = write_yaml(tmp_path / "r.yaml", {**SMALL_MMT, "output_dir": str(tmp_path / "runs")})
    message = refused(["mmt", "train", config, "--set", "method={name: lms, target_modules: 'fc[1'}"], capsys)
    assert "is not a valid regular expression" in message


@pytest.mark.parametrize("pairs, expected", [
    (["languages=[en, de, de]"], r"languages lists \['de'\] more than once"),
    ([r'name="a\nb"'], r"name='a\\nb' must be a single file or folder name.*no control characters such as a newline"),
])
def test_mmt_recipes_refuse_degenerate_values_before_any_data(tmp_path, capsys, no_data_preparation, pairs,
                                                              expected):
    config = write_yaml(tmp_path / "r.yaml", {**SMALL_MMT, "output_dir": str(tmp_path / "runs")})
    assert re.search(expected, refused(["mmt", "train", config, "--set", *pairs], capsys))
    assert not (tmp_path / "runs").exists()


def test_a_negative_seed_is_refused_up_front(tmp_path, capsys, no_data_preparation):
    config = write_yaml(tmp_path / "r.yaml", {**SMALL_MMT, "output_dir": str(tmp_path / "runs")})
    message = refused(["mmt", "train", config, "--seed", "-1"], capsys)
    assert "seed=-1 (command line)" in message and "must be an int >= 0" in message
    with pytest.raises(pp.ConfigError, match=r"seed=-1 must be an int >= 0"):
        pp.FinetuneSettings(seed=-1)


def test_lrp2_refuses_a_max_length_beyond_the_models_positions_before_reading_any_text(tiny_tokenizer):
    with pytest.raises(InterventionError, match=r"language_vectors: max_length=64 is beyond the 32 positions "
                                                r"BertModel has"):
        language_vectors(tiny_bert(), TEXTS, tiny_tokenizer, max_length=64, progress=False)
    from polypeft.interventions.lens import probe
    with pytest.raises(InterventionError, match=r"LENS probe: max_length=64 is beyond the 32 positions"):
        probe(tiny_bert(), tiny_tokenizer, TEXTS, max_length=64, progress=False)


def test_training_a_merged_route_is_refused_by_name():
    from polypeft.training.loop import TrainSettings, train

    model = lms()
    batch = random_batch("bart", 2)
    batch["labels"] = batch["decoder_input_ids"]
    model.merge(src="de", tgt="fr")
    with pytest.raises(pp.LanguageError, match=r"routed layers \(first .*fc1'\) hold route ids \(1, 2\) merged into the "
                                         r"base weights, so training would not reach their factors; call unmerge"):
        train(model, lambda: iter([batch] * 3), lambda m, b: (m(**b, src_lang="de", tgt_lang="fr").loss, 1),
              TrainSettings(steps=2, progress=False))
    model.unmerge()
    train(model, lambda: iter([batch] * 3), lambda m, b: (m(**b, src_lang="de", tgt_lang="fr").loss, 1),
          TrainSettings(steps=2, progress=False))  # unmerged, the same training runs


def test_wrapping_a_wrapped_model_is_refused_by_name():
    model = lms()
    with pytest.raises(pp.LanguageError, match=r"this model is already wrapped \(it is a PolyModel\)"):
        pp.wrap(model, pp.LMSConfig(languages=LANGS, rank=2))
    with pytest.raises(pp.LanguageError, match=r"already wrapped \('model.encoder.layers.0.fc1' is a routed layer\)"):
        pp.wrap(model.base_model, pp.LMSConfig(languages=LANGS, rank=2))
    pp.wrap(model.unload(), pp.LMSConfig(languages=LANGS, rank=2))  # given back, it wraps again

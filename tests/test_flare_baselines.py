"""FLARE's baselines beyond LoRA: X-Mixup, translate-test, and the English side at test from a translation run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from polypeft.core.config import ConfigError
from polypeft.experiments.flare_recipe import flare_stage, result_name, run_recipe
from polypeft.experiments.x_mixup import ManifoldMixup, XMixupSettings
from polypeft.methods.flare.layer import FLAREConfig, FLAREError, FLARELinear
from polypeft.model.poly_model import PolyModel
from polypeft.tasks.translation.translator import Translator, translation_run_recipe
from test_flare import batches, cli_config, flare, randomize_lora, run_cli, tiny_bert, tiny_llama


def labelled() -> tuple[dict, dict, dict]:
    """A target batch with labels, its English parallel batch, and that English batch labelled for stage 1."""
    target, source = batches()
    target["labels"] = torch.tensor([0, 2])
    return target, source, {**source, "labels": torch.tensor([0, 2])}


def block_output(model, block, batch: dict) -> torch.Tensor:
    """What `block` hands on during a forward of `model` on `batch` (after every hook registered before)."""
    seen = {}
    handle = block.register_forward_hook(lambda module, args, output: seen.update(hidden=output))
    try:
        model(**batch)
    finally:
        handle.remove()
    output = seen["hidden"]
    return output[0] if isinstance(output, tuple) else output


# -- X-Mixup ----------------------------------------------------------------------------------------

def test_x_mixup_mixes_the_chosen_layer_by_its_formula():
    model = flare(tiny_bert(), fusion=None)
    randomize_lora(model)
    target, source = batches()
    mixup = ManifoldMixup(model, XMixupSettings(layer=2, ratio=0.3))
    block = model.base_model.bert.encoder.layer[1]
    assert mixup.block is block
    plain_target = block_output(model, block, target)
    english = block_output(model, block, source)
    torch.testing.assert_close(mixup.english_states(source), english)
    with torch.no_grad(), mixup.mixing(english, source["attention_mask"], target["attention_mask"]):
        mixed = block_output(model, block, target)
    scores = plain_target @ english.transpose(1, 2) / math.sqrt(english.shape[-1])
    scores = scores.masked_fill(~source["attention_mask"].bool()[:, None, :], float("-inf"))
    attended = torch.softmax(scores, dim=-1) @ english
    real = target["attention_mask"].bool()
    expected = 0.7 * plain_target + 0.3 * attended
    torch.testing.assert_close(mixed[real], expected[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[~real], plain_target[~real])  # padding is left as it was
    assert not torch.allclose(mixed[real], plain_target[real])


def test_x_mixup_loss_reads_the_english_batch_and_ratio_zero_is_translate_train():
    model = flare(tiny_bert(), fusion=None)
    randomize_lora(model)
    target, source, _ = labelled()
    other = {**source, "input_ids": torch.flip(source["input_ids"], dims=[1])}
    mixup = ManifoldMixup(model, XMixupSettings(ratio=0.5))
    with torch.no_grad():
        assert not torch.isclose(mixup.loss(target, source), mixup.loss(target, other))
        assert not torch.isclose(mixup.loss(target, source), model(**target).loss)
        unmixed = ManifoldMixup(model, XMixupSettings(ratio=0.0))
        torch.testing.assert_close(unmixed.loss(target, source), model(**target).loss)


def test_x_mixup_runs_on_a_decoder_only_model():
    model = flare(tiny_llama(), fusion=None)
    randomize_lora(model)
    target, source = batches()
    target["labels"] = target["input_ids"]
    mixup = ManifoldMixup(model, XMixupSettings(layer=3, ratio=0.5))
    assert mixup.block is model.base_model.model.layers[2]
    loss = mixup.loss(target, source)
    loss.backward()
    assert torch.isfinite(loss) and not torch.isclose(loss, model(**target).loss)
    assert all(layer.lora_A.grad is not None for layer in model.routed_layers.values())


def test_x_mixup_recipe_trains_with_the_mixup_and_reads_no_english_at_test():
    target, source, english = labelled()
    steps = flare_stage(steps=3, lr=1e-2, progress=False)

    def trained(ratio: float):
        return run_recipe(tiny_bert(), "x_mixup", [english], [(target, source)], FLAREConfig(rank=4), stage1=steps,
                          stage2=steps, x_mixup=XMixupSettings(ratio=ratio))

    x_mixup, unmixed = trained(0.5), trained(0.0)
    assert any(isinstance(m, FLARELinear) for m in x_mixup.model.modules())
    with torch.no_grad():
        logits = x_mixup(target).logits
        torch.testing.assert_close(x_mixup(target, source).logits, logits)  # English is not read at test
        # Same seeds, data and passes: only the mixing in training sets the two apart.
        assert not torch.allclose(logits, unmixed(target).logits)


def test_x_mixup_settings_are_refused_by_value_before_anything_trains():
    target, source, _ = labelled()
    with pytest.raises(FLAREError, match=r"x_mixup.layer=4 is not allowed: .* has 3 blocks"):
        # no English batches: stage 1 would fail with another message had it started
        run_recipe(tiny_bert(), "x_mixup", [], [(target, source)], FLAREConfig(rank=2),
                   x_mixup=XMixupSettings(layer=4))
    with pytest.raises(FLAREError, match="ratio"):
        XMixupSettings(ratio=1.5)
    assert ManifoldMixup(tiny_bert(), XMixupSettings()).layer == 1  # the middle of 3 blocks


# -- translate-test and the English side at test from a translation run ----------------------------

@pytest.fixture(scope="module")
def translation_run(tmp_path_factory):
    """A one-step toy translation run (en, de, fr): it translates badly, but always into the same words."""
    from polypeft.tasks.translation.run import train_run
    from toy_mmt import toy_data, toy_recipe

    folder = tmp_path_factory.mktemp("mt")
    recipe = toy_recipe(folder / "runs", {"name": "naive"}, steps=1, checkpoint_every=1, valid_every=0)
    return str(train_run(recipe, data=toy_data(folder)))


def test_translator_translates_each_text_into_english_in_order(translation_run):
    from polypeft.tasks.translation.run import load_translation_model

    texts = ["maison eau lumiere", "pain roi", "nuit"]
    translator = Translator(translation_run)
    translations = translator(texts, "fr")
    recipe, tokenizer, model = load_translation_model(translation_run)
    for text, translation in zip(texts, translations):
        ids = torch.tensor([tokenizer.encode(text, lang_tag="en")])
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=recipe.beam,
                                  max_new_tokens=min(int(ids.shape[1] * 1.5) + 10, recipe.max_length),
                                  early_stopping=True)
        assert translation == tokenizer.decode(expected[0].tolist())
    assert any(translations)
    with pytest.raises(ConfigError, match=r"not on \['ko'\]"):
        translator(texts, "ko")


def test_a_folder_that_is_no_translation_run_is_refused_by_name(tmp_path, translation_run):
    with pytest.raises(ConfigError, match=f"translation_run='{tmp_path / 'missing'}' is not a trained"):
        translation_run_recipe(tmp_path / "missing")
    flare_output = tmp_path / "flare_run"  # a `polypeft flare` output also holds a recipe.json
    flare_output.mkdir()
    (flare_output / "recipe.json").write_text(json.dumps({"recipe": "flare"}))
    (flare_output / "model.safetensors").write_text("")
    with pytest.raises(ConfigError, match="is not a `polypeft mmt` run: its recipe.json is not a translation recipe"):
        translation_run_recipe(flare_output)
    assert translation_run_recipe(translation_run, languages=["fr"]).pivot == "en"


def test_a_recipe_file_names_the_folder_its_build_trained_under_the_cache_root(tmp_path, monkeypatch,
                                                                              translation_run):
    import dataclasses
    import shutil

    import yaml

    from polypeft.tasks.translation.cached import cached_recipe
    from polypeft.tasks.translation.run import read_run_recipe

    monkeypatch.setenv("POLYPEFT_CACHE", str(tmp_path / "cache"))
    recipe_file = tmp_path / "translation.yaml"
    recipe = read_run_recipe(translation_run)
    recipe_file.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(recipe)))))
    with pytest.raises(ConfigError, match=r"is a recipe whose build has not finished .* run `polypeft mmt build "):
        translation_run_recipe(recipe_file)
    shutil.copytree(translation_run, cached_recipe(read_run_recipe(translation_run)).run_dir)
    assert translation_run_recipe(recipe_file, languages=["fr"]).test_books == recipe.test_books
    assert Translator(recipe_file)(["pain roi"], "fr") == Translator(translation_run)(["pain roi"], "fr")
    with pytest.raises(ConfigError, match=r"translation_run='.*missing.yaml': no such recipe file"):
        translation_run_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"translation.yaml' \(built in .*cache.*\) was trained on .*\['ko'\]"):
        translation_run_recipe(recipe_file, languages=["ko"])


def test_a_translation_run_whose_pivot_is_not_english_is_refused_by_name(tmp_path):
    french_pivot = tmp_path / "fr_pivot"  # a run that translates into French: its recipe is all that is read
    french_pivot.mkdir()
    (french_pivot / "recipe.json").write_text(json.dumps({"languages": ["en", "fr", "de"], "pivot": "fr"}))
    (french_pivot / "model.safetensors").write_text("")
    with pytest.raises(ConfigError, match=r"translation_run='.*fr_pivot' translates into its pivot 'fr', not into "
                                          r"'en'"):
        translation_run_recipe(french_pivot, languages=["de"])
    with pytest.raises(ConfigError, match=r"--translation-run='.*fr_pivot' translates into its pivot 'fr'"):
        Translator(french_pivot, setting="--translation-run")
    assert translation_run_recipe(french_pivot, pivot="fr").pivot == "fr"
    assert translation_run_recipe(french_pivot, pivot=None).pivot == "fr"


def test_translate_test_classifies_the_english_side_with_the_english_model():
    target, source, english = labelled()
    trained = run_recipe(tiny_bert(), "translate_test", [english], [], FLAREConfig(rank=4),
                         stage1=flare_stage(steps=2, lr=1e-2, progress=False))
    assert not isinstance(trained.model, PolyModel) and not any(
        isinstance(m, FLARELinear) for m in trained.model.modules())
    with torch.no_grad():
        logits = trained(target, source).logits
        torch.testing.assert_close(logits, trained.model(**source).logits)
        assert not torch.allclose(logits, trained.model(**target).logits)
    with pytest.raises(FLAREError, match="translate_test.*source_batch"):
        trained(target)


def test_result_names_say_where_the_english_at_test_came_from():
    assert result_name("flare", "gold") == "flare (gold English, upper bound)"
    assert result_name("input_fusion", "translated") == "input_fusion (machine-translated English)"
    assert result_name("x_mixup", "gold") == "x_mixup"


def metrics_of(tmp_path, side: str | None = None) -> dict:
    """The metrics of the last eval: `side` names the English at test of a recipe that reads one."""
    return json.loads((tmp_path / "run" / (f"metrics_{side}.json" if side else "metrics.json")).read_text())


def english_at_test(tmp_path) -> list[str]:
    return [json.loads(line)["english"] for line in (tmp_path / "run" / "english_at_test.jsonl").read_text().splitlines()]


def predictions_on(tmp_path, recipe: str, english: list[str]) -> list[int]:
    """What the saved run of `recipe` predicts for fr.jsonl with `english` as its English side."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from polypeft.experiments.flare_recipe import TrainedRecipe

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "stage1_merged")
    if (tmp_path / "run" / "adapter").exists():
        model = PolyModel.from_pretrained(model, str(tmp_path / "run" / "adapter"))
    texts = [json.loads(line)["text"] for line in (tmp_path / "fr.jsonl").read_text().splitlines()]
    target = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    source = dict(tokenizer(english, padding=True, return_tensors="pt"))
    with torch.no_grad():
        return TrainedRecipe(recipe, model.eval())(target, source).logits.argmax(-1).tolist()


def saved_predictions(tmp_path, side: str) -> list[int]:
    lines = (tmp_path / "run" / f"predictions_{side}.jsonl").read_text().splitlines()
    return [json.loads(line)["prediction"] for line in lines]


def drop_source_text(tmp_path) -> None:
    """fr.jsonl without its gold English: what is read as English at test must then come from elsewhere."""
    rows = [json.loads(line) for line in (tmp_path / "fr.jsonl").read_text().splitlines()]
    (tmp_path / "fr.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                                               for r in rows))


def test_cli_translate_test_classifies_the_runs_translations(tmp_path, translation_run):
    config = {**cli_config(tmp_path), "recipe": "translate_test", "translation_run": translation_run,
              "target_lang": "fr"}
    run_cli(tmp_path, {**config, "english_at_test": "gold", "translation_run": None}, "train", "eval")
    assert metrics_of(tmp_path, "gold")["name"] == "translate_test (gold English, upper bound)"
    gold_predictions = saved_predictions(tmp_path, "gold")
    drop_source_text(tmp_path)
    run_cli(tmp_path, config, "eval")
    metrics = metrics_of(tmp_path, "translated")
    assert metrics["name"] == "translate_test (machine-translated English)" and metrics["examples"] == 4
    assert metrics["english_at_test"] == "translated"
    assert not (tmp_path / "run" / "adapter").exists(), "translate-test trains no stage 2"
    texts = [json.loads(line)["text"] for line in (tmp_path / "fr.jsonl").read_text().splitlines()]
    translations = Translator(translation_run)(texts, "fr")
    assert english_at_test(tmp_path) == translations
    assert saved_predictions(tmp_path, "translated") == predictions_on(tmp_path, "translate_test", translations)
    # the gold evaluation of the same folder is kept beside it, not replaced
    assert metrics_of(tmp_path, "gold")["english_at_test"] == "gold"
    assert saved_predictions(tmp_path, "gold") == gold_predictions
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_cli_flare_reads_gold_or_translated_english_at_test_and_says_which(tmp_path, translation_run):
    config = cli_config(tmp_path)
    run_cli(tmp_path, config, "train", "eval")
    gold = metrics_of(tmp_path, "gold")
    assert gold["name"] == "flare (gold English, upper bound)"
    assert not (tmp_path / "run" / "english_at_test.jsonl").exists()
    translated = {**config, "english_at_test": "translated", "translation_run": translation_run, "target_lang": "fr"}
    drop_source_text(tmp_path)
    run_cli(tmp_path, translated, "eval")
    metrics = metrics_of(tmp_path, "translated")
    assert metrics["name"] == "flare (machine-translated English)" and metrics["english_at_test"] == "translated"
    assert len(english_at_test(tmp_path)) == 4
    assert metrics_of(tmp_path, "gold") == gold, "the gold score of the same folder is kept"


def test_cli_eval_refuses_a_recipe_other_than_the_one_the_folder_was_trained_with(tmp_path, capsys):
    from polypeft.cli.main import main

    config = cli_config(tmp_path)
    run_cli(tmp_path, config, "train")  # recipe.json says flare
    code = main(["flare", "eval", str(tmp_path / "flare.yaml"), "--set", "recipe=translate_train"])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert ("recipe='translate_train' in the eval file, but output_dir=" in error
            and "was trained with recipe='flare'" in error)
    assert not list((tmp_path / "run").glob("metrics*.json")), "nothing is scored"


def test_cli_x_mixup_trains_and_evaluates_without_english_at_test(tmp_path):
    config = {**cli_config(tmp_path), "recipe": "x_mixup", "x_mixup": {"layer": 2, "ratio": 0.4}}
    run_cli(tmp_path, config, "train")
    drop_source_text(tmp_path)  # nothing reads English at test
    run_cli(tmp_path, config, "eval")
    metrics = metrics_of(tmp_path)
    assert metrics["name"] == "x_mixup" and metrics["examples"] == 4 and "english_at_test" not in metrics
    assert (tmp_path / "run" / "adapter" / "polypeft_model.safetensors").exists()


@pytest.mark.parametrize("changes, message", [
    ({"recipe": "translate_test"}, r"recipe='translate_test' classifies .* translation_run=None"),
    ({"recipe": "flare", "english_at_test": "translated"}, r"recipe='flare' reads .* translation_run=None"),
    ({"recipe": "translate_train", "english_at_test": "translated", "translation_run": "RUN"},
     r"english_at_test='translated' with recipe='translate_train'"),
    ({"recipe": "translate_test", "translation_run": "RUN"}, r"translation_run='.*' .* target_lang"),
    ({"recipe": "translate_test", "translation_run": "RUN", "target_lang": "ko"}, r"not on \['ko'\]"),
    ({"recipe": "translate_test", "translation_run": "BASE", "target_lang": "fr"},
     r"translation_run='.*base' is not a trained `polypeft mmt` run"),
    ({"recipe": "flare", "translation_run": "RUN", "target_lang": "fr"}, r"nothing reads it"),
    ({"recipe": "flare", "english_at_test": "silver"}, r"english_at_test"),
    ({"recipe": "x_mixup", "x_mixup": {"ratio": 2}}, r"x_mixup.ratio"),
])
def test_cli_refuses_bad_baseline_settings_before_training(tmp_path, translation_run, changes, message):
    config = cli_config(tmp_path)
    places = {"RUN": translation_run, "BASE": config["model"]["name_or_path"]}
    changes = {key: places.get(value, value) if isinstance(value, str) else value for key, value in changes.items()}
    with pytest.raises(FLAREError, match=message):
        run_cli(tmp_path, {**config, **changes}, "train")
    assert not (tmp_path / "run").exists()

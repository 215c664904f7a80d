"""The FLARE Bible bench tests on verses its translation run never trained on: the run's test books alone.

Without a translation run the split is the canon-section task's own, as before.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from polypeft.experiments.bible_eval import verse_classification
from test_tasks_bible_eval import FakeCorpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import flare_bible as bench  # noqa: E402  (a bench script: fails loudly if it breaks)


def book_of(row: dict) -> int:
    return int(row["en"].split()[-1])  # FakeCorpus ends each verse with its book number


def fake_translation_run(folder: Path, test_books: list[int]) -> str:
    """A folder read as a trained `polypeft mmt` run: its recipe is all the split reads."""
    folder.mkdir()
    (folder / "recipe.json").write_text(json.dumps({"languages": ["en", "fr"], "test_books": test_books,
                                                    "valid_books": [49]}))
    (folder / "model.safetensors").write_text("")
    return str(folder)


def test_with_a_translation_run_the_test_verses_come_from_its_test_books_alone():
    corpus = FakeCorpus()
    train, test = bench.load_rows("fr", 4, 3, test_books=[1, 43], corpus=corpus)
    assert {book_of(row) for row in test} == {1, 43}
    assert sorted(row["label"] for row in test) == [0, 0, 0, 4, 4, 4]  # law and gospels_acts, 3 verses each
    assert not {book_of(row) for row in train} & {1, 43}, "the classifier trains on no test-book verse either"
    assert len(train) == len(bench.load_rows("fr", 4, 3, corpus=corpus)[0]), "as many training verses as before"


def test_without_a_translation_run_the_split_is_unchanged():
    train, test = bench.load_rows("fr", 4, 3, corpus=FakeCorpus())
    data = verse_classification(["en", "fr"], valid_fraction=0.0, test_fraction=3 / 7, seed=0,
                                max_verses_per_section=7, corpus=FakeCorpus())
    assert [row["en"] for row in test] == [example.text for example in data["test"]["en"].examples]
    assert sorted(row["en"] for row in train) == sorted(example.text for example in data["train"]["en"].examples)
    assert bench.translation_test_books(None, ["fr"]) is None


def test_test_books_of_one_section_are_refused_naming_them(tmp_path):
    john = fake_translation_run(tmp_path / "john", [43])
    with pytest.raises(ValueError, match=r"test_books=\[43\], one canon section \(\['gospels_acts'\]\)"):
        bench.translation_test_books(john, ["fr"])
    assert bench.translation_test_books(fake_translation_run(tmp_path / "wide", [1, 43]), ["fr"]) == [1, 43]


def bench_results(flare_correct: list[int], reference_correct: list[int], targets=("fr", "ko")) -> dict:
    """flare_bible.py's results layout: per target and recipe, one run per seed with each verse's outcome."""
    def runs(correct, step):
        return [{"seed": seed, "accuracy": sum(correct) / len(correct), "train_step_s": step, "inference_s": 1.0,
                 "correct": correct} for seed in (0, 1)]
    return {target: {"translate_train": runs(reference_correct, 1.0), "flare_add_relu": runs(flare_correct, 1.5)}
            for target in targets}


def test_report_compares_each_recipe_with_translate_train_on_the_same_verses(tmp_path):
    import flare_report

    results = bench_results([1] * 30 + [0] * 10, [1] * 10 + [0] * 30)
    summary = flare_report.figures(results, [{"step_ratios": flare_report.step_ratios(results)}], replicates=300)
    flare = summary["recipes"]["flare_add_relu"]
    assert flare["accuracy"]["mean"]["score"] == 75.0 and flare["step_over_lora"] == 1.5
    assert flare["vs_translate_train"]["mean"]["difference"] == 50.0 and flare["vs_translate_train"]["mean"]["low"] > 0
    text = flare_report.markdown(summary, {"fr": {"bleu": 12.3, "chrf": 40.1}})
    assert "| flare_add_relu | 2 | 75.0 [" in text and "better" in text and "| BLEU | 12.3 |" in text
    even = flare_report.figures(bench_results([1, 0] * 20, [0, 1] * 20), [], replicates=300)
    assert flare_report.verdict(even["recipes"]["flare_add_relu"]["vs_translate_train"]["mean"]) == "within noise"
    uneven = bench_results([1, 0], [0, 1])
    del uneven["ko"]["flare_add_relu"][1]
    with pytest.raises(ValueError, match=r"flare_add_relu: seeds \[0, 1\] for fr but \{'ko': \[0\]\}"):
        flare_report.figures(uneven, [], replicates=10)


def test_report_command_writes_its_table_figures_and_plot(tmp_path, monkeypatch, capsys):
    import flare_report

    path = tmp_path / "a.json"
    path.write_text(json.dumps({"settings": {"layers": 12}, "results": bench_results([1] * 30 + [0] * 10,
                                                                                      [1] * 10 + [0] * 30)}))
    monkeypatch.setattr(sys, "argv", ["flare_report.py", str(path), "--out", str(tmp_path / "out"), "--replicates",
                                      "100"])
    flare_report.main()
    written = json.loads((tmp_path / "out" / "flare_report.json").read_text())
    assert written["recipes"]["flare_add_relu"]["step_over_lora"] == 1.5 and written["targets"] == ["fr", "ko"]
    assert "| flare_add_relu | 2 | 75.0 [" in (tmp_path / "out" / "flare_report.md").read_text()
    assert (tmp_path / "out" / "flare_report.png").read_bytes()[:4] == b"\x89PNG" and "75.0" in capsys.readouterr().out


def test_report_merges_seeds_and_recipes_across_files_and_refuses_a_run_that_differs(tmp_path):
    import flare_report

    first, second, third = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    gold = bench_results([1, 0], [0, 1], targets=("fr",))
    first.write_text(json.dumps({"settings": {}, "results": gold}))
    later = bench_results([1, 1], [0, 1], targets=("fr",))
    later["fr"] = {"translate_train": gold["fr"]["translate_train"],  # a rerun: the same outcomes, kept once
                   "translate_test": [{**run, "seed": run["seed"] + 2} for run in later["fr"]["flare_add_relu"]]}
    second.write_text(json.dumps({"settings": {}, "results": later}))
    results, _, settings = flare_report.merged([first, second])
    assert [run["seed"] for run in results["fr"]["translate_train"]] == [0, 1] and len(settings) == 2
    assert [run["seed"] for run in results["fr"]["translate_test"]] == [2, 3]
    assert flare_report.step_ratio(settings, "flare_add_relu", ["fr"]) == 1.5
    assert flare_report.step_ratio(settings, "translate_test", ["fr"]) == 1.5, "b.json ran translate-train too"
    assert flare_report.step_ratio(settings[:1], "translate_test", ["fr"]) is None
    changed = bench_results([1, 0], [1, 1], targets=("fr",))
    third.write_text(json.dumps({"settings": {}, "results": changed}))
    with pytest.raises(ValueError, match=r"c.json: fr/translate_train seed 0 is in .*a.json too, with other outcomes"):
        flare_report.merged([first, third])
    other_books = tmp_path / "d.json"
    other_books.write_text(json.dumps({"settings": {"test_books": [1, 43]}, "results": gold}))
    with pytest.raises(ValueError, match=r"d.json: test_books=\[1, 43\] where .*a.json has \[None\]"):
        flare_report.merged([first, other_books])
    reordered = tmp_path / "f.json"
    first.write_text(json.dumps({"settings": {"recipes": ["translate_train", "flare_add_relu"]}, "results": gold}))
    reordered.write_text(json.dumps({"settings": {"recipes": ["x_mixup", "flare_add_relu"]}, "results": gold}))
    with pytest.raises(ValueError, match=r"f.json: flare_add_relu ran after \['x_mixup'\] where .*a.json ran it "
                                         r"after \['translate_train'\]"):
        flare_report.merged([first, reordered])
    longer = tmp_path / "g.json"  # more recipes after the shared ones change nothing before them
    longer.write_text(json.dumps({"settings": {"recipes": ["translate_train", "flare_add_relu", "flare_mul"]},
                                  "results": gold}))
    assert len(flare_report.merged([first, longer])[2]) == 2
    retranslated = tmp_path / "e.json"
    for path, bleu in ((second, 1.0), (retranslated, 2.0)):
        path.write_text(json.dumps({"settings": {}, "results": later, "translations": {"fr": {"bleu": bleu}}}))
    with pytest.raises(ValueError, match=r"e.json: the fr test verses were translated differently"):
        flare_report.merged([second, retranslated])


def test_report_refuses_results_without_verse_outcomes():
    import flare_report

    old = bench_results([1, 0], [0, 1])
    del old["ko"]["flare_add_relu"][1]["correct"]
    with pytest.raises(ValueError, match=r"ko/flare_add_relu: written before flare_bible.py kept each verse's outcome"):
        flare_report.figures(old, [], replicates=10)


def test_evaluate_keeps_each_verse_outcome_in_order():
    import torch
    from types import SimpleNamespace

    class Fixed:
        """Predicts class 1 for every verse."""
        model = torch.nn.Linear(1, 1)

        def __call__(self, inputs, source):
            return SimpleNamespace(logits=torch.tensor([[0.0, 1.0]] * len(inputs["input_ids"])))

    batches = [({"input_ids": torch.zeros(2, 3), "labels": torch.tensor([1, 0])}, None),
               ({"input_ids": torch.zeros(1, 3), "labels": torch.tensor([1])}, None)]
    accuracy, _, outcomes = bench.evaluate(Fixed(), batches)
    assert outcomes == [1, 0, 1] and accuracy == 2 / 3


def test_translation_record_scores_the_translations_against_the_gold_english():
    rows = [{"en": "in the beginning god created the heaven and the earth", "target": "au commencement", "label": 0}]
    exact = bench.translation_record(rows, rows)
    assert exact["bleu"] == 100.0 and exact["verses"][0] == {"source": "au commencement", "translation": rows[0]["en"],
                                                            "gold": rows[0]["en"]}
    wrong = bench.translation_record(rows, [{**rows[0], "en": "a cat sat"}])
    assert wrong["bleu"] < 5 and wrong["verses"][0]["translation"] == "a cat sat"


def test_test_books_alone_or_agreeing_with_the_translation_run(tmp_path):
    wide = fake_translation_run(tmp_path / "wide", [1, 43])
    assert bench.translation_test_books(None, ["fr"], [43, 1]) == [1, 43]
    assert bench.translation_test_books(wide, ["fr"], [1, 43]) == [1, 43]
    with pytest.raises(ValueError, match=r"--test-books=\[1, 66\] differs from the test_books=\[1, 43\]"):
        bench.translation_test_books(wide, ["fr"], [1, 66])
    with pytest.raises(ValueError, match=r"--test-books=\[43\], one canon section"):
        bench.translation_test_books(None, ["fr"], [43])


def test_summary_without_translate_train_prints_no_ratios():
    results = bench_results([1, 0], [0, 1], targets=("fr",))
    assert "| fr | flare_add_relu | 0.500 (± 0.000) | 1.50 | 1.00 |" in bench.summarize(results)
    del results["fr"]["translate_train"]
    assert "| fr | flare_add_relu | 0.500 (± 0.000) | - | - |" in bench.summarize(results)


def test_recorded_translations_are_reused_only_for_the_same_run_and_the_same_verses(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "translation_build", lambda run: None)  # run folders, not recipe files, here
    earlier = tmp_path / "seed0.json"
    verses = [{"source": "Au commencement", "translation": "In the beginning", "gold": "In the beginning"},
              {"source": "Dieu dit", "translation": "God said", "gold": "And God said"}]
    earlier.write_text(json.dumps({"settings": {"translation_run": "mt.yaml"},
                                   "translations": {"fr": {"bleu": 50.0, "verses": verses}}}))
    recorded = bench.RecordedTranslations(str(earlier), "mt.yaml")
    assert recorded(["Au commencement", "Dieu dit"], "fr") == ["In the beginning", "God said"]
    with pytest.raises(ValueError, match=r"seed0.json' holds no translations from 'de'; it holds \['fr'\]"):
        recorded(["Am Anfang"], "de")
    with pytest.raises(ValueError, match=r"its 'fr' verses are not this run's test verses"):
        recorded(["Dieu dit", "Au commencement"], "fr")
    with pytest.raises(ValueError, match=r"was translated by \{'translation_run': 'mt.yaml', 'translation_build': "
                                         r"None\}, not by \{'translation_run': 'other.yaml'"):
        bench.RecordedTranslations(str(earlier), "other.yaml")
    rebuilt = tmp_path / "rebuilt.json"  # the same recipe path, but another model: the recipe file was edited
    rebuilt.write_text(json.dumps({"settings": {"translation_run": "mt.yaml", "translation_build": "00aa-seed0"},
                                   "translations": {}}))
    monkeypatch.setattr(bench, "translation_build", lambda run: "11bb-seed0")
    with pytest.raises(ValueError, match=r"'translation_build': '00aa-seed0'\}, not by .*'11bb-seed0'"):
        bench.RecordedTranslations(str(rebuilt), "mt.yaml")
    rows = [{"en": "In the beginning", "target": "Au commencement", "label": 0},
            {"en": "And God said", "target": "Dieu dit", "label": 0}]
    sets = bench.test_sets(rows, FakeTokenizer(), None, "fr", recorded, argparse.Namespace(max_length=8))
    assert sets["record"]["verses"] == verses and sets["translated"][2] is None, "no time is claimed for a lookup"


class FakeTokenizer:
    """Just enough of a tokenizer for make_batches: every text four tokens."""

    def __call__(self, texts, **_):
        import torch
        return {"input_ids": torch.ones(len(texts), 4, dtype=torch.long),
                "attention_mask": torch.ones(len(texts), 4, dtype=torch.long)}


def test_a_recipe_files_test_books_are_read_before_its_build_exists(tmp_path, monkeypatch):
    from polypeft.core.config import ConfigError
    from polypeft.core.fileio import CACHE_ENV
    from polypeft.tasks.translation.translator import Translator

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # an empty cache: nothing is built
    recipe = str(Path(__file__).resolve().parents[1] / "bench" / "experiments" / "flare_translate" / "translation.yaml")
    assert bench.translation_test_books(recipe, ["fr", "ko"]) == [3, 8, 22, 32, 43, 59]
    with pytest.raises(ConfigError, match="is a recipe whose build has not finished"):
        Translator(recipe)  # translating still needs the build
    with pytest.raises(ConfigError, match=r"was trained on .*not on \['xx'\]"):
        bench.translation_test_books(recipe, ["xx"])


def test_a_recipe_files_translation_build_names_the_model_it_builds():
    recipe = str(Path(__file__).resolve().parents[1] / "bench" / "experiments" / "flare_translate" / "translation.yaml")
    assert bench.translation_build(recipe) == "0d0fa70d3f1598a2-seed0"
    assert bench.translation_build("runs/some-run") is None and bench.translation_build(None) is None


def test_recorded_translations_with_no_recipe_reading_them_are_refused(capsys):
    args = argparse.Namespace(mixup_layer=None, mixup_ratio=0.5, recipes=["translate_train"], english_at_test=["gold"],
                              translation_run=None, targets=["fr"], test_books=None, translations_from="seed0.json")
    with pytest.raises(SystemExit):
        bench.check_settings(argparse.ArgumentParser(prog="flare_bible.py"), args)
    assert "--translations-from 'seed0.json': no recipe reads translated English" in capsys.readouterr().err


def test_the_log_says_no_training_for_a_recipe_that_trains_nothing():
    assert bench.progress_line("fr", 1, "translate_test", 0.5, {}, 1.234) == \
        "fr seed 1 translate_test acc 0.500 no training inference 1.23s"
    assert bench.progress_line("fr", 1, "x_mixup", 0.5, {"train_step_s": 0.25}, 2.0) == \
        "fr seed 1 x_mixup acc 0.500 step 0.250s inference 2.00s"

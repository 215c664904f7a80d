"""bench/mmt_warm_table.py: every method's block lands on the warm model's decoder FFNs, LoRA at LMS's trainable
parameters, and the table runner resumes, relabels and compares (builds and decoding faked: they are tested in
test_warm_start.py)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from dataclasses import replace

from polypeft.core.config import ConfigError
from polypeft.core.fileio import write_json

from polypeft.tasks.translation.run import build_model
from test_translation_significance import result, shortened
from test_warm_start import base_dir, own_cache, toy_tokenizer, warm_recipe  # noqa: F401  (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import mmt_warm_table as table  # noqa: E402  (a bench script: fails loudly if it breaks)


def own_names(model) -> dict[str, bool]:
    """Parameter name (from the encoder-decoder down, whatever wraps it) -> whether it trains."""
    return {re.search(r"(encoder|decoder)\..*", name).group(0): p.requires_grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("method", [m for m in table.METHODS if m != "naive"])
def test_every_method_adds_to_the_decoder_ffns_alone(method, base_dir, tmp_path):  # noqa: F811
    naive = own_names(build_model(warm_recipe(tmp_path, base_dir), toy_tokenizer(base_dir)))
    routed = own_names(build_model(warm_recipe(tmp_path, base_dir, method=table.method_block(method, ["en", "de", "fr"])),
                                   toy_tokenizer(base_dir)))
    added = [name for name in routed if name not in naive and ".base_layer." not in name]  # base_layer: the FFN itself
    assert added and all(re.match(r"decoder\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense\.", name)
                         for name in added), added
    assert all(routed[name] for name in added)
    assert {name for name, trains in routed.items() if trains and name.startswith("encoder.")} == \
        {name for name, trains in naive.items() if trains and name.startswith("encoder.")}, "the encoder trains as in naive"


def test_lora_trains_as_many_parameters_as_pair_wise_lms(base_dir, tmp_path):  # noqa: F811
    counts = {}
    for method in ("lms_pair", "lora"):
        model = build_model(warm_recipe(tmp_path, base_dir, method=table.method_block(method, ["en", "de", "fr"])),
                            toy_tokenizer(base_dir))
        counts[method] = sum(p.numel() for name, p in model.named_parameters()
                             if ("lms_" in name or "lora_" in name) and p.requires_grad)
    assert counts["lora"] == counts["lms_pair"] > 0


def test_the_runner_builds_scores_relabels_and_resumes(tmp_path, monkeypatch):
    from polypeft.data.bible import BibleCorpus
    from polypeft.data.parallel import ParallelExample

    rows = BibleCorpus().parallel(["en", "fr"], books=[43], max_verses=30)
    examples = [ParallelExample("fr", "en", row["fr"], row["en"], row["ref"]) for row in rows]
    built, evaluated, recipes, prepared = [], [], {}, []

    def fake_build(recipe, data=None):
        built.append((recipe.name, recipe.seed, recipe.method))
        run_dir = tmp_path / "cache" / f"{recipe.name}-seed{recipe.seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        recipes.setdefault(run_dir, recipe)  # as a finished build keeps the recipe it was built with
        return run_dir

    def fake_evaluate(run_dir, books=None):
        evaluated.append(run_dir.name)
        keep = 0.8 if "lms" in run_dir.name else 0.5
        scores = result(run_dir.name, recipes[run_dir].seed, examples, shortened(examples, keep))
        if "lms_fd" in run_dir.name:  # FD is scored both ways
            scores["variants"] = {"fd_share": scores["variants"]["default"], "fd_ls": scores["variants"]["default"]}
        write_json(run_dir / f"eval_test_books-{books[0]}.json", scores)
        return scores

    monkeypatch.setattr(table, "build_cached", fake_build)
    monkeypatch.setattr(table.mmt, "evaluate_run", fake_evaluate)
    monkeypatch.setattr(table.mmt, "read_run_recipe", lambda run_dir: recipes[run_dir])
    monkeypatch.setattr(table.mmt, "prepare", lambda recipe: prepared.append(recipe.name) or "data")
    recipe = Path(table.ROOT / "configs" / "mmt_warm_e5.yaml")
    methods = ["naive", "lms_pair", "lms_fd"]
    comparison = table.run_table(recipe, methods, [0, 1], [43], tmp_path / "out")
    assert [(name, seed) for name, seed, _ in built] == [(f"warm-e5-{m}", s) for s in (0, 1) for m in methods]
    assert built[1][2]["target_modules"] == table.DECODER_FFN and prepared == ["warm-e5-naive"]
    assert sorted(comparison["rows"]) == ["lms_fd (fd-ls)", "lms_fd (fd-share)", "lms_pair", "naive"]
    for label in ("lms_pair", "lms_fd (fd-share)", "lms_fd (fd-ls)"):
        assert comparison["rows"][label]["seeds"] == [0, 1]
        assert comparison["rows"][label]["paired"]["directions_better"] == 1
    assert "| lms_fd (fd-share) | +" in (tmp_path / "out" / "compare" / "comparison.md").read_text()
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())[:2] == ["lms_fd-seed0.json", "lms_fd-seed1.json"]
    table.run_table(recipe, methods, [0, 1], [43], tmp_path / "out")
    assert len(evaluated) == 6, "a second run scores nothing again"
    recipes[tmp_path / "cache" / "warm-e5-naive-seed0"] = replace(recipes[tmp_path / "cache" / "warm-e5-naive-seed0"],
                                                                beam=1)
    with pytest.raises(SystemExit, match="decodes with beam 1, length penalty 1.0; the table asks beam 5"):
        table.run_table(recipe, methods, [0], [43], tmp_path / "out")


def test_the_runner_refuses_a_table_it_cannot_make(tmp_path):
    recipe = Path(table.ROOT / "configs" / "mmt_warm_e5.yaml")
    with pytest.raises(SystemExit, match=r"unknown \['lms_pairs'\]"):
        table.run_table(recipe, ["naive", "lms_pairs"], [0], [43], tmp_path)
    with pytest.raises(SystemExit, match="the table compares with naive; add it"):
        table.run_table(recipe, ["lms_pair"], [0], [43], tmp_path)
    with pytest.raises(SystemExit, match=r"\['ls_ffn'\]: in the decoder they route by the target language"):
        table.run_table(recipe, ["naive", "ls_ffn"], [0], [43], tmp_path)
    with pytest.raises(ConfigError, match="49"):
        table.run_table(recipe, ["naive"], [0], [49], tmp_path)


@pytest.mark.parametrize("method", ["lms_pair", "lora"])
def test_a_methods_own_recipe_file_builds_the_tables_model(method):
    """configs/mmt_warm_e5_<method>.yaml builds what the runner's row builds: the same cache key, so either reuses the
    other's build, and a row scored alone compares with the table's."""
    from polypeft.tasks.translation.cached import recipe_key
    from polypeft.tasks.translation.run import MMTRecipe

    configs = Path(__file__).resolve().parents[1] / "configs"
    base = MMTRecipe.from_yaml(configs / "mmt_warm_e5.yaml")
    alone = MMTRecipe.from_yaml(configs / f"mmt_warm_e5_{method}.yaml")
    assert recipe_key(alone) == recipe_key(table.recipe_for(base, method, seed=0))
    assert recipe_key(alone) != recipe_key(base)


def test_rows_scored_before_join_the_table_without_a_build(tmp_path, monkeypatch):
    """--scored naive=EVAL: the repository's two naive evaluations are the baseline of a LMS row built (faked) here."""
    experiments = table.ROOT / "bench" / "experiments"
    naive = [f"naive={experiments / 'warm_start' / 'heldout' / folder / 'eval_test_books-43.json'}"
             for folder in ("wsd", "wsd-seed1")]
    lms = {0: experiments / "warm_lms" / "pair", 1: experiments / "warm_lms" / "pair-seed1"}
    built = []

    def fake_build(recipe, data=None):
        built.append(recipe.name)
        return lms[recipe.seed]  # the folders hold the build's recipe and evaluation, as a finished build does

    monkeypatch.setattr(table, "build_cached", fake_build)
    monkeypatch.setattr(table.mmt, "evaluate_run", lambda *args, **kwargs: pytest.fail("scored again"))
    monkeypatch.setattr(table.mmt, "prepare", lambda recipe: "data")
    monkeypatch.setattr(table.mmt, "read_run_recipe", lambda run_dir: table.mmt.MMTRecipe.from_dict(
        json.loads((run_dir / "recipe.json").read_text())))  # the folders hold no weights
    recipe = table.ROOT / "configs" / "mmt_warm_e5.yaml"
    comparison = table.run_table(recipe, ["lms_pair"], [0, 1], [43], tmp_path / "out", scored_before=naive)
    assert built == ["warm-e5-lms_pair", "warm-e5-lms_pair"], "naive is not built"
    assert comparison["rows"]["naive"]["seeds"] == comparison["rows"]["lms_pair"]["seeds"] == [0, 1]
    assert comparison["rows"]["lms_pair"]["paired"]["bleu_difference"]["mean"]["difference"] == pytest.approx(0.03, abs=0.01)
    with pytest.raises(SystemExit, match="both in --methods and in --scored"):
        table.run_table(recipe, ["naive", "lms_pair"], [0], [43], tmp_path / "out", scored_before=naive)
    with pytest.raises(SystemExit, match="write NAME=EVAL_JSON"):
        table.run_table(recipe, ["naive"], [0], [43], tmp_path / "out", scored_before=[naive[0].split("=", 1)[1]])
    with pytest.raises(SystemExit, match="'naive' seed 0 is given twice"):
        table.run_table(recipe, ["lms_pair"], [0], [43], tmp_path / "out", scored_before=[naive[0], naive[0]])
    with pytest.raises(SystemExit, match="--scored: run '=x': write NAME=RUN"):
        table.run_table(recipe, ["lms_pair"], [0], [43], tmp_path / "out", scored_before=["=x"])
    with pytest.raises(SystemExit, match=r"scores books \[43\]; the table scores \[8\]"):
        table.run_table(recipe, ["lms_pair"], [0], [8], tmp_path / "out", scored_before=naive)

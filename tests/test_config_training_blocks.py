"""The optimisation fields are declared once (TrainSettings) and nested: old flat keys still read, the classify
recipe's warm-up follows its steps, and the English-centric LM's cache key stays what it was before the block."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import polypeft as pp
from polypeft.backbones.causal_lm import CausalLmSettings, causal_lm_dir, lm_schedule
from polypeft.cli.encoder import ClassifyRecipe, finetune_settings
from polypeft.cli.recipes import load_recipe
from polypeft.core.config import ConfigError, build
from polypeft.tasks.encoder_finetune import FinetuneSettings
from polypeft.training.loop import TrainSettings, train

ROOT = Path(__file__).resolve().parents[1]
CLASSIFY = ROOT / "configs" / "classify_bible.yaml"
LM_RESULTS = ROOT / "bench" / "experiments" / "english_centric_lm"

# ---------------------------------------------------------------------------------------------- warm-up


def test_a_null_warmup_is_a_tenth_of_the_steps_and_an_explicit_one_wins():
    assert TrainSettings(steps=600, warmup=None).warmup_steps == 60
    assert TrainSettings(steps=5, warmup=None).warmup_steps == 1  # at least one step
    assert TrainSettings(steps=600, warmup=7).warmup_steps == 7
    assert TrainSettings(steps=600, warmup=0).warmup_steps == 0
    with pytest.raises(ConfigError, match=r"warmup=-1 must be an int >= 0 or null"):
        TrainSettings(warmup=-1)


def test_the_loop_warms_up_over_a_tenth_of_the_steps_when_warmup_is_null():
    def rates(warmup):
        model = torch.nn.Linear(2, 1)
        batches = lambda: iter(lambda: torch.ones(1, 2), None)  # noqa: E731 (an endless stream)
        settings = TrainSettings(steps=30, lr=1e-2, warmup=warmup, schedule="linear", progress=False)
        history = train(model, batches, lambda m, x: (m(x).pow(2).mean(), 1), settings)["history"]
        return [record["lr"] for record in history]

    assert rates(None) == rates(3) != rates(10)


# ---------------------------------------------------------------------------------------------- classify

def old_finetune_settings(steps: int, warmup: int) -> FinetuneSettings:
    """What the classify recipe built before its training block (flat steps and lr, warm-up a tenth of steps)."""
    return FinetuneSettings.from_values(steps=steps, batch_size=32, lr=2e-4, route_lr=2e-3, warmup=warmup,
                                        max_length=48, frozen_layers=10, rank=8, prefix="query: ")


def test_classify_reads_its_old_flat_keys_and_builds_the_same_fine_tune(tmp_path):
    recipe = load_recipe(ClassifyRecipe, str(CLASSIFY))  # the shipped recipe says steps and lr at its top
    assert (recipe.training.steps, recipe.training.lr, recipe.training.warmup) == (300, 2e-4, None)
    assert finetune_settings(recipe) == old_finetune_settings(300, 30)
    # bench/RESULTS.md's command (a): --set steps=600 on that file
    pairs = ["verses_per_section=300", "steps=600", "seeds=[1]", "throughput_steps=0",
             f"output_dir={tmp_path / 'runs'}"]
    recipe = load_recipe(ClassifyRecipe, str(CLASSIFY), pairs)
    assert (recipe.verses_per_section, recipe.training.steps, recipe.seeds) == (300, 600, [1])
    assert finetune_settings(recipe) == old_finetune_settings(600, 60)
    # and from Python, as bench/fd_classify_recheck.py builds its recipes
    assert finetune_settings(ClassifyRecipe.from_values(steps=600, lr=2e-4)) == old_finetune_settings(600, 60)
    # the default recipe's block is the fine-tune's own, at classify's length, rate and warm-up
    assert finetune_settings(ClassifyRecipe()).training == replace(FinetuneSettings().training, steps=300, lr=2e-4,
                                                                   warmup=30)


def test_classify_warmup_follows_the_steps_unless_it_is_given(tmp_path):
    block = tmp_path / "block.yaml"
    block.write_text("training:\n  steps: 400\nseeds: [0]\n", encoding="utf-8")
    recipe = load_recipe(ClassifyRecipe, str(block))
    assert finetune_settings(recipe).training.warmup == 40
    assert (recipe.training.lr, recipe.training.schedule, recipe.training.betas) == (2e-4, "linear", (0.9, 0.999))
    assert load_recipe(ClassifyRecipe, str(block), ["steps=50"]).training.steps == 50  # into the file's block
    assert finetune_settings(load_recipe(ClassifyRecipe, str(CLASSIFY), ["warmup=5"])).training.warmup == 5
    zero = tmp_path / "zero.yaml"
    zero.write_text("training:\n  steps: 400\n  warmup: 0\n", encoding="utf-8")
    assert finetune_settings(load_recipe(ClassifyRecipe, str(zero))).training.warmup == 0


def test_classify_refuses_a_key_given_twice_and_a_block_seed_by_name(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("steps: 300\ntraining:\n  steps: 400\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'steps' and 'training.steps' are both given"):
        load_recipe(ClassifyRecipe, str(both))
    with pytest.raises(ConfigError, match=r"--set steps=0: training.steps=0 must be a positive int"):
        load_recipe(ClassifyRecipe, str(CLASSIFY), ["steps=0"])
    with pytest.raises(ConfigError, match=r"training.seed=3 would seed every run"):
        load_recipe(ClassifyRecipe, str(CLASSIFY), ["training={seed: 3}"])


# ---------------------------------------------------------------------------------------------- the causal LM

# Keys computed before the training block existed (when steps, lr, warmup and checkpoint_every were flat fields).
KEY_OF_DEFAULT = "4049baf7d098933e"  # bench/experiments/english_centric_lm's build
KEY_OF_ALL_LANGUAGES = "86791e65be1c5949"  # the twelve-language build of the LMS-vs-LoRA decoder testbed
KEY_OF_FLAT_300 = "55c1f5acf2127607"  # steps=300, lr=1e-3, warmup=10, checkpoint_every=7


def test_the_cache_key_of_every_earlier_build_is_unchanged():
    from polypeft.experiments.lms_vs_lora.lm_bed import base_lm_settings
    from polypeft.experiments.lms_vs_lora.settings import LanguageModelTestbed

    assert CausalLmSettings().key() == KEY_OF_DEFAULT
    assert base_lm_settings(LanguageModelTestbed()).key() == KEY_OF_ALL_LANGUAGES
    flat = CausalLmSettings.from_values(steps=300, lr=1e-3, warmup=10, checkpoint_every=7)
    nested = CausalLmSettings(training=lm_schedule(steps=300, lr=1e-3, warmup=10, checkpoint_every=7))
    assert flat == nested and flat.key() == KEY_OF_FLAT_300
    assert causal_lm_dir(CausalLmSettings(), "cache").name == KEY_OF_DEFAULT
    # what does not shape the model stays out of the key; what does shape it changes it
    assert CausalLmSettings.from_values(training={"checkpoint_every": 5, "valid_every": 3}).key() == KEY_OF_DEFAULT
    assert CausalLmSettings.from_values(training={"schedule": "constant"}).key() != KEY_OF_DEFAULT
    assert CausalLmSettings.from_values(training={"warmup": None}).key() == CausalLmSettings.from_values(
        warmup=70).key()  # a null warm-up is a tenth of the 700 steps


def test_the_lm_settings_hash_and_their_key_does_not_move_under_them():
    import copy
    import pickle
    from dataclasses import FrozenInstanceError

    block = lm_schedule(steps=300, lr=1e-3, warmup=10, checkpoint_every=7)
    settings = CausalLmSettings(training=block)
    block.steps = 5  # the caller's object: the settings hold a copy of it
    assert settings.training.steps == 300 and settings.key() == KEY_OF_FLAT_300
    with pytest.raises(FrozenInstanceError, match=r"cannot set steps=9: these training settings are frozen"):
        settings.training.steps = 9
    assert settings.key() == KEY_OF_FLAT_300 and CausalLmSettings().key() == KEY_OF_DEFAULT
    same = CausalLmSettings.from_values(steps=300, lr=1e-3, warmup=10, checkpoint_every=7)
    assert hash(settings) == hash(same) and {settings: "built"}[same] == "built"
    assert settings.training == lm_schedule(steps=300, lr=1e-3, warmup=10, checkpoint_every=7) == settings.training
    longer = replace(settings, training=replace(settings.training, steps=400))  # a change is a new settings object
    assert longer.training.steps == 400 and longer.key() != KEY_OF_FLAT_300
    loop = settings.loop_settings(progress=False)
    loop.steps = 1  # the loop's copy stays changeable and is the settings' no longer
    assert type(loop) is TrainSettings and settings.training.steps == 300
    for again in (copy.deepcopy(settings), pickle.loads(pickle.dumps(settings))):
        assert again == settings and again.key() == KEY_OF_FLAT_300
        with pytest.raises(FrozenInstanceError):
            again.training.lr = 1.0


@pytest.mark.parametrize("results", ["results.json", "all_languages/results.json"])
def test_the_committed_results_read_back_to_the_key_of_their_build(results):
    data = json.loads((LM_RESULTS / results).read_text(encoding="utf-8"))
    assert "steps" in data["settings"]["lm"]  # written with the flat keys
    settings = CausalLmSettings.from_values(**data["settings"]["lm"])
    assert settings.training.steps == data["settings"]["lm"]["steps"]
    assert settings.key() == data["build"]["key"]
    assert CausalLmSettings.from_values(**data["build"]["settings"]) == settings


def test_the_lm_reads_its_old_flat_keys_and_trains_as_before():
    from polypeft.experiments.english_centric_lm import EnglishCentricExperiment, earlier_parts

    old = CausalLmSettings.from_values(steps=300, lr=1e-3)
    training = old.training
    assert (training.steps, training.lr, training.warmup, training.betas) == (300, 1e-3, 50, (0.9, 0.95))
    experiment = build(EnglishCentricExperiment, {"lm": {"steps": 300, "warmup": 5}}, "lm.yaml")
    assert (experiment.lm.training.steps, experiment.lm.training.warmup, experiment.lm.training.lr) == (300, 5, 2e-3)
    # the loop runs what the build ran before: the block seeded with the LM's seed
    assert CausalLmSettings(seed=3).loop_settings(progress=False) == TrainSettings(
        steps=700, lr=2e-3, warmup=50, schedule="linear", betas=(0.9, 0.95), weight_decay=0.01, checkpoint_every=100,
        valid_every=70, log_every=10, seed=3, progress=False)
    with pytest.raises(ConfigError, match=r"training.seed=1: the LM has one seed"):
        CausalLmSettings.from_values(training={"seed": 1})
    with pytest.raises(ConfigError, match=r"lm.yaml: lm: 'steps' and 'training.steps' are both given"):
        build(EnglishCentricExperiment, {"lm": {"steps": 300, "training": {"steps": 4}}}, "lm.yaml")
    # the committed results (flat lm settings) still allow a part to be measured again
    kept = earlier_parts(LM_RESULTS, ["lens"], asdict(EnglishCentricExperiment()))
    assert sorted(kept) == ["base", "lrp2", "timings_seconds"]


def test_a_dotted_set_changes_one_key_of_a_block_and_keeps_the_rest(tmp_path):
    from polypeft.tasks.translation.run import MMTRecipe

    file = tmp_path / "mmt.yaml"
    file.write_text("training:\n  steps: 300\n  warmup: 50\n  checkpoint_every: 100\n", encoding="utf-8")
    recipe = load_recipe(MMTRecipe, str(file), ["training.steps=200"])
    assert (recipe.training.steps, recipe.training.warmup, recipe.training.checkpoint_every) == (200, 50, 100)
    bare = tmp_path / "bare.yaml"
    bare.write_text("name: bare\n", encoding="utf-8")  # no block in the file: the recipe's own default block
    recipe = load_recipe(MMTRecipe, str(bare), ["training.steps=5"])
    assert recipe.training.steps == 5 and recipe.training.valid_every == MMTRecipe().training.valid_every == 200
    with pytest.raises(ConfigError, match=r"--set training.steps=0: training.steps=0 must be a positive int"):
        load_recipe(MMTRecipe, str(file), ["training.steps=0"])
    with pytest.raises(ConfigError, match=r"--set name.x=1: 'name' is not a block of keys"):
        load_recipe(MMTRecipe, str(file), ["name.x=1"])

def test_a_dotted_set_beside_the_files_old_flat_keys_reads_both(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("steps: 600\nseeds: [0]\n", encoding="utf-8")  # the old layout, no block in the file
    recipe = load_recipe(ClassifyRecipe, str(flat), ["training.lr=1.0e-3"])
    assert (recipe.training.steps, recipe.training.lr) == (600, 1e-3)


def test_a_moved_key_works_as_a_constructor_argument_too():
    assert pp.TaskTrainingSettings(steps=300) == pp.TaskTrainingSettings.from_values(steps=300)
    assert pp.TaskTrainingSettings(steps=300, batch_size=4).training.steps == 300
    assert TrainSettings(learning_rate=1e-3, max_grad_norm=0.5) == TrainSettings(lr=1e-3, clip_norm=0.5)
    with pytest.raises(ConfigError, match=r"training.steps='300' must be a positive int"):
        pp.TaskTrainingSettings(steps="300")
    with pytest.raises(ConfigError, match=r"'learning_rate' and 'lr' are both given"):
        TrainSettings(learning_rate=1e-3, lr=2e-3)
    # positional arguments beside a moved key read as the dataclass reads them: fields in order
    assert TrainSettings(100, learning_rate=1e-3) == TrainSettings(steps=100, lr=1e-3)
    with pytest.raises(TypeError, match=r"TrainSettings got multiple values for \['steps'\]"):
        TrainSettings(100, steps=200, learning_rate=1e-3)
    with pytest.raises(TypeError, match="TrainSettings takes at most"):
        TrainSettings(*range(1, 100), learning_rate=1e-3)
    with pytest.raises(TypeError, match="not_a_setting"):
        pp.TaskTrainingSettings(not_a_setting=1)
    with pytest.raises(ConfigError, match=r"steps=300 is training.steps, and training is given too: set steps in "
                                          r"that training \(with dataclasses.replace: training=replace\(old.training, "
                                          r"steps=...\)\), or leave training out"):
        replace(pp.TaskTrainingSettings(), steps=300)

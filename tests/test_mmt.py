"""The translation pipeline on a tiny synthetic parallel corpus: every method trains, resume, BLEU, CLI."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

import polypeft as pp
from polypeft.tasks.translation.evaluate import score_directions, translate
from polypeft.tasks.translation.run import MMTData, MMTRecipe, _rows, batch_stream, build_model, make_loss_fn, train_run
from polypeft.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from toy_mmt import mean_loss, toy_data, toy_recipe

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> MMTData:
    return toy_data(tmp_path_factory.mktemp("spm"))


recipe = toy_recipe


def with_training(recipe: MMTRecipe, **changes) -> MMTRecipe:
    """The recipe with some of its training block's settings changed."""
    return dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, **changes))


METHODS = [
    {"name": "naive"},
    {"name": "lms", "rank": 4, "synthesis": "pair"},
    {"name": "lms", "rank": 4, "synthesis": "language"},
    {"name": "lms", "rank": 4, "fd": True},
    {"name": "ls_ffn"},
    {"name": "ls_ffn", "fd": True},
    {"name": "switch", "num_experts": 2},
    {"name": "clsr"},
    {"name": "clsr", "language_weights": "per_sublayer"},
    {"name": "lora", "rank": 4, "freeze_base": False},
]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_a_few_steps_lower_the_loss(method, data, tmp_path):
    run = recipe(tmp_path, method, steps=25)
    before = mean_loss(build_model(run, data.tokenizer), data, run)
    run_dir = train_run(run, data=data)
    from polypeft.tasks.translation.run import load_run

    _, _, trained = load_run(run_dir, data=data)
    after = mean_loss(trained, data, run)
    assert after < before - 0.5, (before, after)
    params = json.loads((run_dir / "parameters.json").read_text())
    if method["name"] in ("switch", "clsr"):
        assert params["training_extra"] > 0
    if method["name"] == "lms":
        assert params["language_specific"] == trained.num_language_parameters() > 0
        assert (params["shared_route"] > 0) == bool(method.get("fd"))


@pytest.mark.slow
def test_resume_ends_where_an_uninterrupted_run_ends(data, tmp_path):
    method = {"name": "lms", "rank": 4, "fd": True}
    full = recipe(tmp_path / "full", method, steps=6, checkpoint_every=3)
    train_run(full, data=data)
    interrupted = recipe(tmp_path / "cut", method, steps=3, checkpoint_every=3)
    train_run(interrupted, data=data)
    resumed = with_training(interrupted, steps=6)
    train_run(resumed, data=data, resume=True)
    from safetensors.torch import load_file

    a = load_file(str(full.run_dir / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # and the stopped run really was behind
    c = load_checkpoint(interrupted.run_dir / CHECKPOINT_NAME)
    assert c["step"] == 6


@pytest.mark.slow
def test_a_resumed_run_logs_every_step_once(data, tmp_path):
    stopped = recipe(tmp_path, {"name": "naive"}, steps=3, checkpoint_every=3)
    train_run(stopped, data=data)
    log = stopped.run_dir / "train_log.jsonl"
    with open(log, "a", encoding="utf-8") as handle:  # steps 4 and 5 ran, then the run died before a checkpoint
        handle.write(json.dumps({"step": 4, "loss": 9.9}) + "\n" + json.dumps({"step": 5, "loss": 9.9}) + "\n")
    first_part = json.loads((stopped.run_dir / "train_summary.json").read_text())["training_seconds"]
    train_run(with_training(stopped, steps=6), data=data, resume=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((stopped.run_dir / "train_summary.json").read_text())
    assert summary["resumed"] and summary["training_seconds"] == records[-1]["elapsed_s"] > first_part > 0
    assert all(r["loss"] != 9.9 for r in records), "the steps after the checkpoint are the resumed run's"


def test_resume_without_a_checkpoint_is_refused(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_run(recipe(tmp_path, {"name": "naive"}), data=data, resume=True)


@pytest.mark.slow
def test_resume_refuses_another_recipe_and_a_checkpoint_past_the_steps(data, tmp_path):
    stopped = recipe(tmp_path, {"name": "naive"}, steps=3, checkpoint_every=3)
    train_run(stopped, data=data)
    with pytest.raises(pp.ConfigError, match=r"lr: 0\.003 in the run, 0\.01 now"):
        train_run(with_training(stopped, steps=6, lr=1e-2), data=data, resume=True)
    with pytest.raises(ValueError, match="at step 3, past the 2 steps asked for"):
        train_run(with_training(stopped, steps=2), data=data, resume=True)
    train_run(dataclasses.replace(with_training(stopped, steps=4, checkpoint_every=2), beam=1), data=data, resume=True)
    assert load_checkpoint(stopped.run_dir / CHECKPOINT_NAME)["step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "naive"}, {"name": "lms", "rank": 4}, {"name": "lms", "rank": 4, "fd": True}],
                         ids=["naive", "lms", "lms_fd"])
def test_translation_encoder_reads_english_tagged_for_the_target(method, data, tmp_path):
    from polypeft.tasks.translation.mt_encoder import translation_encoder
    from polypeft.tasks.translation.run import load_translation_model

    run_dir = train_run(recipe(tmp_path, method), data=data)
    encoder, tokenizer = translation_encoder(run_dir, "de")
    inputs = tokenizer(["house water light", "king"])
    assert (inputs["input_ids"][:, 0] == data.tokenizer.lang_tag_id("de")).all()
    _, _, model = load_translation_model(run_dir)  # the run dir alone holds everything: no corpus
    if isinstance(model, pp.PolyModel):
        route = "shared" if method.get("fd") else None
        with model.routes(src_lang=route or "en", tgt_lang=route or "de"):
            expected = model.get_encoder()(**inputs).last_hidden_state
    else:
        expected = model.get_encoder()(**inputs).last_hidden_state
    torch.testing.assert_close(encoder(**inputs).last_hidden_state, expected)
    assert not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(pp.ConfigError, match="target language 'ko' is not among"):
        translation_encoder(run_dir, "ko")


@pytest.mark.slow
def test_overfit_model_translates_its_training_pairs(data, tmp_path):
    handful = [e for e in data.train if e.ref in ("0", "5", "10")]
    few = MMTData(data.tokenizer, handful, handful, handful)
    run = recipe(tmp_path, {"name": "lms", "rank": 4}, steps=200, lr=3e-3, warmup=10, dropout=0.0,
                 label_smoothing=0.0, max_tokens=512)
    from polypeft.tasks.translation.run import load_run

    _, _, model = load_run(train_run(run, data=few), data=few)
    scores = score_directions(handful, translate(model, data.tokenizer, handful, beam=2, progress=False))
    assert scores["averages"]["bleu_all"] > 60, scores
    assert set(scores["directions"]) == {"en-de", "de-en", "en-fr", "fr-en"}


def test_size_limited_splits_are_the_same_for_every_seed(tmp_path):
    class FakeCorpus:  # 50 verses per split, each a row of the multi-way parallel corpus
        def parallel(self, languages, books):
            return [{"ref": f"{books}:{i}", **{lang: f"{lang} {i}" for lang in languages}} for i in range(50)]

    rows = {seed: _rows(FakeCorpus(), recipe(tmp_path, {"name": "naive"}, seed=seed), "test", 10) for seed in (0, 1)}
    assert len(rows[0]) == 10
    assert rows[0] == rows[1], "runs of different seeds must be scored on the same test verses"
    assert rows[0] != _rows(FakeCorpus(), recipe(tmp_path, {"name": "naive"}), "valid", 10)


def test_recipe_refuses_unknown_keys_and_methods(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"languages": ["en", "de"], "stpes": 3}))
    with pytest.raises(pp.ConfigError, match=r"r.yaml: unknown keys \['stpes'\]"):
        MMTRecipe.from_yaml(path)
    with pytest.raises(pp.ConfigError, match=r"unknown method 'lmz'"):
        MMTRecipe(languages=["en", "de"], method={"name": "lmz"})
    with pytest.raises(pp.ConfigError, match=r"pivot 'en' is not among languages"):
        MMTRecipe(languages=["de", "fr"])


@pytest.mark.slow
def test_cli_trains_evaluates_and_compares_on_the_bible(tmp_path):
    """`polypeft mmt train --eval` then `compare`, from a YAML recipe, on the real corpus (tiny sizes)."""
    from polypeft.cli.main import main

    config = tmp_path / "mmt.yaml"
    common = dict(languages=["en", "de"], vocab_size=600, spm_max_sentences=600, max_train_verses=150,
                  max_eval_verses=6, steps=4, warmup=2, checkpoint_every=2, max_tokens=1024, beam=2,
                  output_dir=str(tmp_path / "runs"))
    config.write_text(yaml.safe_dump({**common, "name": "naive", "method": {"name": "naive"}}))
    assert main(["mmt", "train", str(config), "--eval"]) == 0
    assert main(["mmt", "train", str(config), "--eval", "--set", "name=lms", "method={name: lms, rank: 2, fd: true}"]) == 0
    runs = [str(tmp_path / "runs" / "naive-seed0"), str(tmp_path / "runs" / "lms-seed0")]
    assert main(["mmt", "compare", *runs, "--baseline", "naive", "--out", str(tmp_path / "cmp")]) == 0
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert set(comparison["rows"]) == {"naive", "lms (fd-share)", "lms (fd-ls)"}
    assert (tmp_path / "cmp" / "bleu_gain_vs_parameters.png").stat().st_size > 1000
    result = json.loads((tmp_path / "runs" / "lms-seed0" / "eval_test.json").read_text())
    assert set(result["variants"]["fd_share"]["directions"]) == {"en-de", "de-en"}


@pytest.mark.slow
def test_cross_entropy_scores_the_shared_route_when_asked(data, tmp_path):
    from polypeft.tasks.translation.run import load_run, valid_loss_fn

    run_dir = train_run(recipe(tmp_path, {"name": "lms", "rank": 4, "fd": True}, steps=12), data=data)
    run, _, model = load_run(run_dir, data=data)
    model.eval()
    with torch.no_grad():
        own = valid_loss_fn(run, data, model.config)(model)
        own_again = valid_loss_fn(run, data, model.config, examples=list(data.valid))(model)
        subset = valid_loss_fn(run, data, model.config, examples=data.valid[:3])(model)
        shared = valid_loss_fn(run, data, model.config, route="shared")(model)
    assert own == pytest.approx(own_again)
    assert subset != pytest.approx(own, abs=1e-4), "`examples` must replace the validation book"
    assert shared != pytest.approx(own, abs=1e-4), "the shared route must be a different function after FD training"
    assert 0 < shared < 10 and 0 < own < 10


@pytest.mark.slow
def test_a_recipe_trains_in_bf16_and_refuses_an_unknown_precision(data, tmp_path):
    with pytest.raises(pp.ConfigError, match=r"training.mixed_precision='fp8' is not allowed; choose one of "
                                             r"\['no', 'bf16', 'fp16'\]"):
        recipe(tmp_path, {"name": "naive"}, mixed_precision="fp8")
    run_dir = train_run(recipe(tmp_path, {"name": "lms", "rank": 4, "fd": True}, steps=2, mixed_precision="bf16"),
                        data=data)
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "model.safetensors"))
    assert weights and all(value.dtype == torch.float32 for value in weights.values())
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == 2


@pytest.mark.slow
def test_validation_loss_is_logged_every_n_steps_and_at_the_end(data, tmp_path):
    run_dir = train_run(recipe(tmp_path, {"name": "naive"}, steps=7, valid_every=3), data=data)
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid_loss" in r] == [3, 6, 7]
    assert all(0 < r["valid_loss"] < 10 for r in records if "valid_loss" in r)


def test_the_training_block_reads_old_flat_keys_and_flat_overrides(tmp_path):
    from polypeft.core.yaml_files import recipe_from_yaml

    path = tmp_path / "r.yaml"
    path.write_text("training: {steps: 300, lr: 0.001}\n", encoding="utf-8")
    recipe = recipe_from_yaml(MMTRecipe, path, {"steps": 2})  # `--set steps=2`
    assert (recipe.training.steps, recipe.training.lr, recipe.training.valid_every) == (2, 0.001, 200)
    path.write_text("steps: 300\nwarmup: 5\n", encoding="utf-8")  # a recipe written before the block
    old = recipe_from_yaml(MMTRecipe, path)
    assert (old.training.steps, old.training.warmup, old.training.lr) == (300, 5, 5e-4)

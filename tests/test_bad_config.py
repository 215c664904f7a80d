"""Bad configs and recipes (issue 16 items 6 and 11): each is refused with a message that names the field, the
value, where it came from and what is allowed, before any data is prepared and without writing anything."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import polypeft as pp
import polypeft.experiments.demo  # noqa: F401  imported before any patch, so their bindings stay the real ones
import polypeft.experiments.demo_mmt  # noqa: F401
from polypeft.cli.main import main
from polypeft.tasks.translation.run import MMTRecipe

SMALL_MMT = {"name": "r", "languages": ["en", "de"], "steps": 2, "method": {"name": "lms", "rank": 2}}


@pytest.fixture
def no_data_preparation(monkeypatch):
    """Any data preparation fails the test loudly (an AssertionError is no user error: main re-raises it)."""
    def refuse(*args, **kwargs):
        raise AssertionError("data preparation started before the recipe was checked")

    monkeypatch.setattr("polypeft.tasks.translation.run.prepare", refuse)
    monkeypatch.setattr("polypeft.cli.encoder._load", refuse)
    monkeypatch.setattr("polypeft.cli.lrp2_lens.load_model", refuse)
    monkeypatch.setattr("polypeft.cli.flare.load_models", refuse)


def write_yaml(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return str(path)


def refused(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit 2 and one message line without a traceback; return the message."""
    assert main(argv) == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message and message.count("\n") == 1, message
    return message


def line_of(config: str, key: str) -> int:
    """The line of top-level `key` in a YAML file (safe_dump sorts keys, so it moves with the others)."""
    lines = Path(config).read_text(encoding="utf-8").splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.startswith(f"{key}:"))


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ----------------------------------------------------------------------------- method configs (item 6)

@pytest.mark.parametrize("changes, message", [
    ({"freeze_base": "false"}, r"LMSConfig.freeze_base='false' must be true or false"),
    ({"shared_route": "false"}, r"LMSConfig.shared_route='false' must be true or false"),
    ({"languages": "en"}, r"LMSConfig.languages='en' must be a list of strings, not a string"),
    ({"languages": {"en", "de"}}, r"LMSConfig.languages=\{.*\} must be a list of strings, not set"),
    ({"init_std": float("inf")}, r"LMSConfig.init_std=inf must be a finite number"),
    ({"init_std": float("nan")}, r"LMSConfig.init_std=nan must be a finite number"),
    ({"rank": True}, r"LMSConfig.rank=True must be a positive int"),
    ({"rank": 2.0}, r"LMSConfig.rank=2.0 must be a positive int"),
    ({"target_modules": 5}, r"LMSConfig.target_modules=5 must be a list of strings or a string or null"),
])
def test_lms_config_fields_are_typed(changes, message):
    with pytest.raises(pp.ConfigError, match=message):
        pp.LMSConfig(**{"languages": ["en", "de"], **changes})


@pytest.mark.parametrize("make_config, message", [
    (lambda: pp.LoRAConfig(languages=["en"], freeze_base="no"), r"LoRAConfig.freeze_base='no' must be true or false"),
    (lambda: pp.LSFFNConfig(languages="de"), r"LSFFNConfig.languages='de' must be a list of strings"),
    (lambda: pp.SwitchConfig(languages=["en"], load_balance_weight=float("nan")), r"load_balance_weight=nan"),
    (lambda: pp.CLSRConfig(languages=["en"], hard_gate_at_inference="true"), r"hard_gate_at_inference='true'"),
    (lambda: pp.FLAREConfig(alpha=float("inf")), r"FLAREConfig.alpha=inf must be a finite number"),
    (lambda: pp.FLAREConfig(modules_to_save="classifier"), r"modules_to_save='classifier' must be a list of strings"),
])
def test_every_method_config_goes_through_the_typed_check(make_config, message):
    with pytest.raises(pp.ConfigError, match=message):
        make_config()


def test_flare_config_errors_stay_flare_errors():
    with pytest.raises(pp.FLAREError, match=r"rank='8' must be a positive int"):
        pp.FLAREConfig(rank="8")


def test_saved_config_with_a_quoted_boolean_names_the_file(tmp_path):
    path = tmp_path / "lms.json"
    path.write_text(json.dumps({"method": "lms", "languages": ["en"], "freeze_base": "false"}))
    with pytest.raises(pp.ConfigError, match=r"lms.json: freeze_base='false' must be true or false"):
        pp.load_config_file(str(path))


def test_a_set_of_languages_as_routes_is_refused():
    from tiny_models import build, random_batch

    poly = pp.wrap(build("bart"), pp.LMSConfig(languages=["en", "de"], rank=2))
    with pytest.raises(pp.LanguageError, match=r"src_lang=\{.*\} has no order: pass a list"):
        poly(**random_batch("bart", 2), src_lang={"en", "de"}, tgt_lang="en")


def test_one_registry_knows_every_method():
    from polypeft.methods.registry import registered_methods

    methods = registered_methods()  # tests/test_contract.py checks that the contract table covers them all
    assert methods["lms"].config_class is pp.LMSConfig and methods["flare"].config_class is pp.FLAREConfig
    with pytest.raises(pp.ConfigError, match=r"unknown method 'lmz'; known methods are \['clsr', 'flare', 'lms'"):
        pp.config_from_dict({"method": "lmz", "languages": ["en"]})


# ----------------------------------------------------------------------------- mmt recipes (items 6 and 11)

@pytest.mark.parametrize("changes, message", [
    ({"method": {"name": "lms", "fd": "no"}}, "method.fd='no' must be true or false (a YAML boolean, not quoted)"),
    ({"method": {"name": "lms", "rnak": 8}},
     "method: unknown keys ['rnak'] for method 'lms'; allowed keys are ['freeze_base', 'init_std', 'keep_base_dtype', 'languages'"),
    ({"method": {"name": "lms", "freeze_base": "false"}}, "method.freeze_base='false' must be true or false"),
    ({"method": {"name": "lms", "init_std": float("inf")}}, "method.init_std=inf must be a finite number"),
    ({"method": {"name": "lmz"}}, "method.name: unknown method 'lmz'; choose naive or one of ['clsr', 'flare', 'lms'"),
    ({"languages": "en"}, "languages='en' must be a list of strings, not a string"),
    ({"steps": -5}, "training.steps=-5 must be a positive int"),  # the old flat key, its line kept
    ({"accumulation": 0}, "training.accumulation=0 must be a positive int"),
    ({"lr": float("nan")}, "training.lr=nan must be a finite number"),
    ({"batching": "random"}, "batching='random' is not allowed; choose one of ['homogeneous', 'mixed']"),
    ({"pivot": "fr"}, "pivot 'fr' is not among languages ['en', 'de']"),
])
def test_mmt_recipe_values_are_refused_before_any_data(tmp_path, capsys, no_data_preparation, changes, message):
    out = tmp_path / "runs"
    config = write_yaml(tmp_path / "r.yaml", {**SMALL_MMT, "output_dir": str(out), **changes})
    key = next(iter(changes))
    assert f"r.yaml (line {line_of(config, key)}): {message}" in refused(["mmt", "train", config], capsys)
    assert files_under(out) == []


@pytest.mark.parametrize("pair, message", [
    ("steps=-5", r"--set steps=-5: training.steps=-5 must be a positive int"),
    ("accumulation=0", r"--set accumulation=0: training.accumulation=0 must be a positive int"),
    ("method={name: lms, rnak: 8}", r"--set method=\{name: lms, rnak: 8\}: method: unknown keys \['rnak'\]"),
    ("languages=[en, de", r"--set languages=\[en, de: the value is not valid YAML \(line 1, column"),
    ("steps", r"--set expects key=value, got 'steps'"),
])
def test_set_overrides_are_checked_the_same_way(tmp_path, capsys, no_data_preparation, pair, message):
    out = tmp_path / "runs"
    config = write_yaml(tmp_path / "r.yaml", {**SMALL_MMT, "output_dir": str(out)})
    assert re.search(message, refused(["mmt", "train", config, "--set", pair], capsys))
    assert files_under(out) == []


@pytest.mark.parametrize("command", ["train", "build"])
def test_eval_books_the_recipe_trains_on_are_refused_before_training(tmp_path, capsys, no_data_preparation, command):
    out = tmp_path / "runs"
    config = write_yaml(tmp_path / "r.yaml", {**SMALL_MMT, "output_dir": str(out), "test_books": [3, 43]})
    message = refused(["mmt", command, config, "--eval-books", "43", "1"], capsys)
    assert "books=[43, 1]: [1] not among the run's test_books [3, 43]; score only books the run never" in message
    assert "books=[43, 43] names a book twice" in refused(["mmt", command, config, "--eval-books", "43", "43"], capsys)
    assert files_under(out) == []


def test_eval_and_eval_books_each_score(monkeypatch):
    import argparse

    from polypeft.cli import main as cli
    from polypeft.tasks.translation import run as mmt

    scored = []
    monkeypatch.setattr(mmt, "evaluate_run", lambda run_dir, books=None: scored.append(books) or {})
    monkeypatch.setattr(cli, "print_scores", lambda results: None)
    cli.evaluate_after(argparse.Namespace(eval=True, eval_books=[43]), "runs/x")
    cli.evaluate_after(argparse.Namespace(eval=False, eval_books=[3, 43]), "runs/x")
    cli.evaluate_after(argparse.Namespace(eval=True, eval_books=None), "runs/x")
    assert scored == [None, [43], [3, 43], None]


def test_yaml_syntax_error_in_the_recipe_names_file_and_line(tmp_path, capsys, no_data_preparation):
    config = write_yaml(tmp_path / "r.yaml", "name: r\nlanguages: [en, de\nsteps: 2\n")
    message = refused(["mmt", "prepare", config], capsys)
    assert "r.yaml: not valid YAML (line 3, column" in message
    assert files_under(tmp_path) == [tmp_path / "r.yaml"]


def test_missing_recipe_file_is_a_message(tmp_path, capsys):
    assert "recipe file" in refused(["mmt", "train", str(tmp_path / "absent.yaml")], capsys)


def test_output_folder_below_a_regular_file_is_refused_first(tmp_path, capsys, no_data_preparation):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    config = write_yaml(tmp_path / "r.yaml", {**SMALL_MMT, "output_dir": str(blocker / "runs")})
    message = refused(["mmt", "train", config], capsys)
    assert f"{blocker}' is a file (it lies below" in message
    assert blocker.read_text() == "a file, not a folder"
    demo = refused(["demo", "--quick", "--output-dir", str(blocker / "demo")], capsys)
    assert "--output-dir=" in demo and "is a file" in demo


def test_demo_with_negative_steps_is_refused(tmp_path, capsys, no_data_preparation):
    message = refused(["demo", "--quick", "--steps", "-5", "--output-dir", str(tmp_path / "demo")], capsys)
    assert "steps=-5 must be a positive int" in message
    assert files_under(tmp_path) == []


def test_corrupt_weights_under_mmt_eval_name_the_file(tmp_path, capsys, no_data_preparation):
    run = tmp_path / "run"
    run.mkdir()
    recipe = MMTRecipe(languages=["en", "de"], method={"name": "lms", "rank": 2})
    (run / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe)))
    (run / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    message = refused(["mmt", "eval", str(run)], capsys)
    assert f"{run / 'model.safetensors'}: not a readable safetensors file" in message
    assert sorted(p.name for p in run.iterdir()) == ["model.safetensors", "recipe.json"]


def test_a_quoted_boolean_in_a_stored_run_recipe_is_refused(tmp_path, capsys, no_data_preparation):
    run = tmp_path / "run"
    run.mkdir()
    stored = {**dataclasses.asdict(MMTRecipe(languages=["en", "de"])), "method": {"name": "lms",
                                                                                                "fd": "false"}}
    (run / "recipe.json").write_text(json.dumps(stored))
    (run / "model.safetensors").write_bytes(b"")
    assert "recipe.json: method.fd='false' must be true or false" in refused(["mmt", "eval", str(run)], capsys)


# ----------------------------------------------------------------------------- lrp2 / lens, flare, encoder

LRP2_RECIPE = {"model": "e5-small", "languages": ["fr", "de"], "texts": {"bible": {"max_verses": 10}}}


@pytest.mark.parametrize("command", [["lrp2", "vectors"], ["lrp2", "search"], ["lens", "probe"], ["lens", "train"]])
def test_lrp2_and_lens_refuse_unknown_keys(tmp_path, capsys, no_data_preparation, command):
    config = write_yaml(tmp_path / "c.yaml", {**LRP2_RECIPE, "outptu_dir": str(tmp_path / "out")})
    message = refused([*command, config], capsys)
    assert "c.yaml: unknown keys ['outptu_dir']; allowed keys are [" in message and "'output_dir'" in message
    assert files_under(tmp_path) == [tmp_path / "c.yaml"]


@pytest.mark.parametrize("changes, line_offset, message", [
    ({"search": {"pairs": "false"}}, 1, "search.pairs='false' must be true or false"),
    ({"search": {"candidate_layrs": [1]}}, 0, "search: unknown keys ['candidate_layrs']"),
    ({"search": {"rule": "holm"}}, 1, "search.rule='holm' is not allowed; choose one of ['split', 'bonferroni', 'maxt']"),
    ({"lens": {"steps": 0}}, 1, "lens.training.steps=0 must be a positive int"),
    ({"languages": "fr"}, 0, "languages='fr' must be a list of strings, not a string"),
    ({"texts": {"bible": {"max_verses": "10"}}}, 2, "texts.bible.max_verses='10' must be a positive int or null"),
    ({"pooling": "max"}, 0, "pooling='max' must be one of ['mean', 'last'] or null"),
])
def test_lrp2_values_are_typed_and_located(tmp_path, capsys, no_data_preparation, changes, line_offset, message):
    config = write_yaml(tmp_path / "c.yaml", {**LRP2_RECIPE, **changes})
    line = line_of(config, next(iter(changes))) + line_offset
    assert f"c.yaml (line {line}): {message}" in refused(["lrp2", "search", config], capsys)


def test_lrp2_set_override_with_a_quoted_boolean(tmp_path, capsys, no_data_preparation):
    config = write_yaml(tmp_path / "c.yaml", LRP2_RECIPE)
    message = refused(["lrp2", "search", config, "--set", "search={pairs: 'no'}"], capsys)
    assert "--set search={pairs: 'no'}: search.pairs='no' must be true or false" in message


def test_flare_refuses_a_typo_in_its_method_block_by_line(tmp_path, capsys, no_data_preparation):
    data = tmp_path / "en.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    recipe = {"model": {"name_or_path": "m"}, "data": {"english_train": str(data)}, "output_dir": str(tmp_path / "o"),
              "flare": {"rnak": 2}}
    config = write_yaml(tmp_path / "f.yaml", recipe)
    message = refused(["flare", "train", config], capsys)
    assert f"f.yaml (line {line_of(config, 'flare')}): flare: unknown keys ['rnak'] for method 'flare'; allowed keys are ['alignment'" in message
    message = refused(["flare", "train", config, "--set", "flare={rank: 2}", "stage1={progress: 'false'}"], capsys)
    assert "--set stage1={progress: 'false'}: stage1.progress='false' must be true or false" in message
    missing = write_yaml(tmp_path / "g.yaml", {**recipe, "flare": {}, "data": {"eval": str(tmp_path / "nope.jsonl")}})
    assert "data.eval: " in refused(["flare", "eval", missing], capsys)
    assert not (tmp_path / "o").exists()


def test_encoder_recipes_are_typed(tmp_path, capsys, no_data_preparation):
    texts = tmp_path / "t.txt"
    texts.write_text("a\n")
    config = write_yaml(tmp_path / "e.yaml", {"input": str(texts), "batch_size": "32",
                                              "output": str(tmp_path / "e.safetensors")})
    assert f"e.yaml (line {line_of(config, 'batch_size')}): batch_size='32' must be a positive int" in refused(["encode", config], capsys)
    config = write_yaml(tmp_path / "c.yaml", {"methods": ["naive", "lora"], "output_dir": str(tmp_path / "c")})
    assert "methods[1]='lora' is not allowed; choose one of ['naive', 'lms', 'lms_fd']" in refused(
        ["classify", config], capsys)
    assert files_under(tmp_path) == sorted([texts, tmp_path / "e.yaml", tmp_path / "c.yaml"])


# ----------------------------------------------------------------------------- help and version (item 11)

@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_help_and_version_do_not_import_torch(flag):
    code = ("import sys\nfrom polypeft.cli.main import main\n"
            f"try:\n    main([{flag!r}])\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(pp.__file__).parents[1])})
    assert result.returncode == 0, result.stderr
    assert ("polypeft 0.1.0" in result.stdout) if flag == "--version" else ("usage: polypeft" in result.stdout)


# ----------------------------------------------------------------------------- the shipped recipes stay valid

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_recipe_passes_the_typed_check(path):
    from polypeft.cli.encoder import COMMANDS
    from polypeft.cli.flare_recipe import FlareRecipe
    from polypeft.core.yaml_files import recipe_from_yaml

    kind = path.name.split("_")[0]
    recipe_class = {"mmt": MMTRecipe, "flare": FlareRecipe}.get(kind) or COMMANDS[kind][0]
    overrides = {"input": "texts.txt"} if kind == "encode" else {}  # the file to embed is given with --set
    recipe = recipe_from_yaml(recipe_class, path, overrides)
    assert type(recipe) is recipe_class
    if kind == "mmt":
        assert recipe.method_config() is None or recipe.method_config().languages == recipe.languages


def test_a_damaged_language_vector_file_is_named_before_the_model_loads(tmp_path, capsys, no_data_preparation):
    out = tmp_path / "out"
    out.mkdir()
    (out / "language_vectors.safetensors").write_bytes(b"garbage")
    config = write_yaml(tmp_path / "c.yaml", {**LRP2_RECIPE, "output_dir": str(out)})
    message = refused(["lrp2", "search", config], capsys)
    assert f"{out / 'language_vectors.safetensors'}: not a readable safetensors file" in message

"""Issue 16 items 2, 3, 5: run names stay inside output_dir, runs are never silently mixed or scored stale,
killed runs' leftovers are cleaned, and written files honour the umask."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import yaml

import polypeft as pp
from polypeft.cli.main import build_parser, main
from polypeft.core.fileio import (PathNameError, file_sha256, process_start_time, remove_stale_temporaries,
                                  single_path_component, write_json)
from polypeft.data.spm import train_spm
from polypeft.tasks.translation.compare import StaleEvaluationError, load_results
from polypeft.tasks.translation.run import MMTData, evaluate_run, train_run
from toy_mmt import sentences, toy_data, toy_recipe

NAIVE = {"name": "naive"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> MMTData:
    return toy_data(tmp_path_factory.mktemp("spm"))


# ---- item 2: a name that becomes a path is one path component ---------------------------------------------

@pytest.mark.parametrize("name", ["../x", "../../escaped/x", "/tmp/abs", "", ".", "..", "a/b", "a\\b", "a\0b", 7])
def test_a_name_that_would_leave_its_folder_is_refused(name):
    with pytest.raises(PathNameError, match=re.escape(f"recipe: name={name!r} must be a single file or folder name")):
        single_path_component(name, "name")
    assert single_path_component("lms-pair_2", "name") == "lms-pair_2"


def test_a_run_name_outside_output_dir_writes_nothing(tmp_path, data):
    inside = tmp_path / "a" / "b"
    for name in ("../../escaped/x", str(tmp_path / "abs")):
        with pytest.raises(PathNameError, match="name="):
            train_run(toy_recipe(inside, NAIVE, name=name), data=data)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_refuses_an_escaping_name_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "ok", "output_dir": "runs/deep"}), encoding="utf-8")
    assert main(["mmt", "train", str(config), "--set", "name=../../escaped/x"]) == 2
    assert "name='../../escaped/x' must be a single file or folder name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_a_language_code_does_not_name_a_heat_map_outside_its_folder(tmp_path):
    from polypeft.interventions.search import search_layers

    result = search_layers(lambda language, i, j: 0.0, ["../../evil"], candidate_layers=[0, 1], progress=False)
    with pytest.raises(PathNameError, match=re.escape("LRP2 heat map: file name='lrp2_heatmap_../../evil.png' must be")):
        result.plot_heatmaps(tmp_path / "plots")
    assert list(tmp_path.rglob("*.png")) == []


def test_evaluation_splits_are_a_fixed_choice(tmp_path):
    with pytest.raises(ValueError, match=r"split='\.\./x'; choose one of \['test', 'valid'\]"):
        evaluate_run(tmp_path, split="../x")
    with pytest.raises(ValueError, match=r"split='\.\./x'; choose one of"):
        load_results([tmp_path], split="../x")


# ---- item 3: an existing run is continued, replaced or refused; evaluations know their weights ------------

def run_files(run_dir) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(run_dir.iterdir()) if p.is_file()}


def test_training_into_an_existing_run_is_refused_unless_asked(tmp_path, data):
    recipe = toy_recipe(tmp_path, NAIVE, steps=3)
    run_dir = train_run(recipe, data=data)
    (run_dir / "eval_test.json").write_text("{}", encoding="utf-8")
    before = run_files(run_dir)
    with pytest.raises(pp.ConfigError, match=rf"{run_dir} already holds a run \(.*model.safetensors.*\); pass "
                                             r"--resume \(resume=True\) to continue it or --overwrite"):
        train_run(dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, lr=1e-2)), data=data)
    assert run_files(run_dir) == before, "a refused run changes nothing"
    with pytest.raises(pp.ConfigError, match="--resume and --overwrite both given"):
        train_run(recipe, data=data, resume=True, overwrite=True)
    train_run(dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, lr=1e-2)), data=data,
              overwrite=True)
    assert not (run_dir / "eval_test.json").exists(), "the old evaluation went with the old run"
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3], "one loss history, not two"
    assert json.loads((run_dir / "recipe.json").read_text())["training"]["lr"] == 1e-2


def test_overwrite_leaves_a_folder_that_is_not_a_run_alone(tmp_path, data):
    recipe = toy_recipe(tmp_path, NAIVE)
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "thesis.tex").write_text("years of work", encoding="utf-8")
    with pytest.raises(pp.ConfigError, match=r"no recipe.json, so it is not a polypeft run folder; it is left alone"):
        train_run(recipe, data=data, overwrite=True)
    assert (recipe.run_dir / "thesis.tex").read_text(encoding="utf-8") == "years of work"


def test_the_cli_has_an_overwrite_flag():
    args = build_parser().parse_args(["mmt", "train", "recipe.yaml", "--overwrite"])
    assert args.overwrite and not args.resume


def test_compare_refuses_an_evaluation_of_other_weights(tmp_path, data):
    recipe = toy_recipe(tmp_path, NAIVE, steps=3, max_length=8)
    run_dir = train_run(recipe, data=data)
    evaluate_run(run_dir, data=data)
    evaluation = run_dir / "eval_test.json"
    assert json.loads(evaluation.read_text())["weights_sha256"] == file_sha256(run_dir / "model.safetensors")
    assert load_results([run_dir])[0]["name"] == "naive"
    train_run(dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, steps=6)), data=data,
              resume=True)  # the weights change, the eval stays
    with pytest.raises(StaleEvaluationError, match=rf"{evaluation} scored other weights than .*model.safetensors "
                                                   r"holds now .*run `polypeft mmt eval"):
        load_results([run_dir])
    result = json.loads(evaluation.read_text())
    del result["weights_sha256"]
    evaluation.write_text(json.dumps(result), encoding="utf-8")
    with pytest.raises(StaleEvaluationError, match=rf"{evaluation} does not record which weights it scored"):
        load_results([evaluation])


# ---- item 5: leftovers of killed runs go at the next start; files honour the umask ------------------------

def leave(path, age_seconds: float, directory: bool = False):
    """`path` (a new file, or an existing folder) last changed `age_seconds` before this process started."""
    if not directory:
        path.write_bytes(b"half")
    then = process_start_time() - age_seconds
    os.utime(path, (then, then))
    return path


def test_a_new_run_removes_what_killed_runs_left(tmp_path, data):
    recipe = toy_recipe(tmp_path, NAIVE, steps=3)
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True)
    stale = [leave(run_dir / ".checkpoint.pt.abc123_x.tmp", 3600), leave(run_dir / ".model.safetensors.q1w2e3r4.tmp", 60),
             leave(run_dir / f".model.safetensors.{2 ** 22 + 7}.k9j8h7g6.tmp", 60)]  # a pid that cannot be alive
    train_run(recipe, data=data)
    assert not any(path.exists() for path in stale)
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_only_leftovers_older_than_this_process_and_without_a_live_writer_go(tmp_path):
    old = leave(tmp_path / ".checkpoint.pt.abcdefgh.tmp", 60)
    live_writer = leave(tmp_path / f".checkpoint.pt.{os.getppid()}.abcdefgh.tmp", 60)
    newer = tmp_path / ".model.safetensors.zyxwvuts.tmp"
    newer.write_bytes(b"being written")
    unrelated = leave(tmp_path / "notes.tmp", 60)
    assert remove_stale_temporaries(tmp_path) == [old]
    assert live_writer.exists() and newer.exists() and unrelated.exists()


def test_spm_training_removes_scratch_folders_of_killed_trainings(tmp_path):
    scratch = tmp_path / ".spm-train-x1y2z3"
    scratch.mkdir()
    (scratch / "sentences.txt").write_text("29 MB of verses", encoding="utf-8")
    leave(scratch, 3600, directory=True)
    train_spm(sentences("en", 24), ["en"], tmp_path / "t.model", vocab_size=14, model_type="word")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.model", "t.vocab"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = write_json(tmp_path / "result.json", {"bleu": 1.0})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode

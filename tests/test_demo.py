"""`polypeft demo`: the quick run end to end on the real assets, reuse of finished parts, and its guards.

The quick run's figures mean nothing; these tests check that every part runs, reports and is reused.
"""
from __future__ import annotations

from polypeft.training.checkpoint import CHECKPOINT_NAME

import dataclasses
import json

import pytest

from polypeft.experiments.demo_store import PartResult, Row, finished_result, run_part, settings_key

pytestmark = pytest.mark.slow  # every test here takes many seconds


def test_a_part_is_stored_under_its_settings_and_reused_only_with_the_same_ones(tmp_path):
    calls = []

    def compute(folder):
        calls.append(folder)
        return PartResult("toy", {}, [Row("M", "task", "acc", "base", 1.0, 3.0)], ["a note"])

    first = run_part(tmp_path, "toy", {"steps": 2}, compute)
    again = run_part(tmp_path, "toy", {"steps": 2}, compute)
    other = run_part(tmp_path, "toy", {"steps": 3}, compute)
    assert len(calls) == 2, "the same settings must reuse the stored result"
    assert again.reused and not first.reused and not other.reused
    assert again.rows[0].gain == pytest.approx(2.0) and again.notes == ["a note"]
    assert calls[0].name == f"toy-{settings_key({'steps': 2})}" != calls[1].name
    assert finished_result(tmp_path, "toy", {"steps": 4}) is None


def test_gain_is_positive_when_the_method_is_better_whatever_the_metric_direction():
    assert Row("M", "t", "acc", "b", 50.0, 52.0).gain == pytest.approx(2.0)
    assert Row("M", "t", "CE", "b", 5.0, 4.5, higher_is_better=False).gain == pytest.approx(0.5)


def test_an_unknown_part_is_refused_by_name(tmp_path, capsys):
    from polypeft.cli.main import main

    assert main(["demo", "lora", "--output-dir", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert "'lora'" in message and "lrp2" in message and "mmt" in message


@pytest.mark.slow
def test_quick_demo_runs_every_part_end_to_end_and_reuses_them(tmp_path, capsys):
    from polypeft.cli.main import main

    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "NOT meaningful" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    methods = {row["method"] for row in summary["rows"]}
    assert methods == {"LRP2 (LIRP)", "LENS (s = -1, reversed from the paper's +1)", "LMS (language routes)",
                       "LMS+FD, FD-Share", "LMS+FD, FD-LS", "FLARE add_relu"}, "translation runs only when named"
    for row in summary["rows"]:
        assert all(isinstance(row[key], float) for key in ("baseline", "with_method", "gain", "seconds")), row
        low, high = row["interval"]
        assert low <= row["gain"] <= high and row["noise"], row
        assert row["outside_noise"] == (low > 0 or high < 0), row
    lms_rows = [row for row in summary["rows"] if row["method"].startswith("LMS")]
    assert all(row["baseline_name"].startswith("LoRA, equal trainable parameters") for row in lms_rows)
    assert any("2 seeds" in row["noise"] for row in lms_rows)
    table = (tmp_path / "summary.md").read_text()
    assert table.count("\n| ") == len(summary["rows"]) + 1  # the header and one line per row
    assert "mixed-language batch = per-example routes: max |difference|" in table
    assert "merged into a plain model: forward" in table
    assert (tmp_path / "summary.png").stat().st_size > 5000
    lms = next(part for part in summary["parts"] if part["part"] == "lms")
    assert lms["details"]["mixed_batch_max_abs_diff"] < 1e-4
    assert lms["details"]["merged_fd_share"]["max_abs_output_diff_to_shared_route"] < 1e-4
    assert lms["details"]["merged_fd_share"]["is_plain_model"]
    stored = {part: (tmp_path / f"{part}-{settings_key(entry['settings'])}" / "result.json").stat().st_mtime_ns
              for entry in summary["parts"] for part in [entry["part"]]}
    # Run again: every part is reused, nothing recomputed.
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("finished earlier with these settings, reused") == 4
    for part, mtime in stored.items():
        assert (tmp_path / f"{part}-{settings_key(next(e['settings'] for e in summary['parts'] if e['part'] == part))}"
                / "result.json").stat().st_mtime_ns == mtime
    assert all(part["reused"] for part in json.loads((tmp_path / "summary.json").read_text())["parts"])


@pytest.mark.slow
def test_demo_translation_part_runs_in_reduced_mode(tmp_path, capsys):
    from polypeft.cli.main import main
    from polypeft.experiments import demo_mmt
    from polypeft.experiments.demo import DEMO_METHODS, demo_recipe
    from polypeft.experiments.demo_store import part_dir

    assert main(["demo", "mmt", "--quick", "--steps", "6", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "6 steps per method" in printed
    assert "| lms_fd (fd-share) |" in printed and "| naive |" in printed
    quick = demo_recipe(True, "")
    base = dataclasses.replace(quick, training=dataclasses.replace(quick.training, steps=6))
    folder = part_dir(tmp_path, "mmt", demo_mmt.settings(base, DEMO_METHODS))
    comparison = json.loads((folder / "compare" / "comparison.json").read_text())
    assert set(comparison["rows"]) == {"naive", "lms", "lms_fd (fd-share)", "lms_fd (fd-ls)"}
    assert (folder / "compare" / "bleu_gain_vs_parameters.png").exists()
    # A stopped demo's finished runs are reused, not retrained, even when the part's result is gone.
    (folder / "result.json").unlink()
    assert main(["demo", "mmt", "--quick", "--steps", "6", "--output-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("already trained and evaluated") == 3


def test_demo_refuses_a_folder_holding_another_demo_setting(tmp_path):
    from polypeft.core.config import ConfigError
    from polypeft.experiments import demo_mmt
    from polypeft.experiments.demo import DEMO_METHODS, demo_recipe, run_demo
    from polypeft.experiments.demo_store import part_dir

    folder = part_dir(tmp_path, "mmt", demo_mmt.settings(demo_recipe(True, ""), DEMO_METHODS))
    stale = dataclasses.replace(demo_recipe(True, str(folder)), name="lms", max_tokens=999)
    stale.run_dir.mkdir(parents=True)
    (stale.run_dir / "recipe.json").write_text(json.dumps(dataclasses.asdict(stale)), encoding="utf-8")
    (stale.run_dir / CHECKPOINT_NAME).write_bytes(b"")
    with pytest.raises(ConfigError, match=r"polypeft demo: .*lms-seed0 holds a run of another demo setting.*max_tokens"):
        run_demo(["lrp2", "mmt"], quick=True, output_dir=str(tmp_path))


def test_every_part_takes_the_seed_and_the_test_book(tmp_path):
    from polypeft.experiments.demo import Assets, DEFAULT_PARTS, part_plans

    plans, recipe = part_plans(False, str(tmp_path), None, Assets(), seed=7, test_book=42)
    assert set(plans) >= set(DEFAULT_PARTS) and recipe.seed == 7 and recipe.test_books == [42]
    assert plans["lrp2"][0]["retrieval"]["test_book"] == 42
    assert plans["lens"][0]["seed"] == 7 and plans["lens"][0]["retrieval"]["test_book"] == 42
    assert plans["lms"][0]["testbed"]["seeds"] == [7, 8] and plans["lms"][0]["testbed"]["test_book"] == 42
    assert plans["flare"][0]["seed"] == 7 and plans["flare"][0]["test_book"] == 42
    default, _ = part_plans(False, str(tmp_path), None, Assets())
    assert all(default[part][0] != plans[part][0] for part in DEFAULT_PARTS), "a part ignored the seed or the book"


@pytest.mark.parametrize("flag, value", [("--test-book", "67"), ("--test-book", "45"), ("--seed", "-1")])
def test_a_bad_seed_or_test_book_is_refused_before_any_work(tmp_path, capsys, flag, value):
    from polypeft.cli.main import main

    assert main(["demo", "lrp2", flag, value, "--output-dir", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert value in message and ("book" in message or "seed" in message), message
    assert not any(tmp_path.iterdir()), "nothing may be written before the settings are checked"


def test_retrieval_settings_are_checked_by_the_typed_validator():
    from polypeft.core.config import ConfigError
    from polypeft.experiments.demo_retrieval import RetrievalSettings

    assert RetrievalSettings(valid_books=[1, 2]).valid_books == (1, 2)  # lists read as the tuples they declare
    for changes, message in (({"test_book": 67}, r"test_book=67 must be an int in \[1, 66\]"),
                             ({"test_book": 45}, r"valid_books=\[45, 46, 47, 48, 49\] holds the test book \(45\)"),
                             ({"valid_queries": 0}, r"valid_queries=0 must be a positive int"),
                             ({"valid_queries": 500}, r"valid_queries=500 exceeds valid_candidates=400"),
                             ({"max_length": "64"}, r"max_length='64' must be a positive int")):
        with pytest.raises(ConfigError, match=rf"RetrievalSettings.{message}"):
            RetrievalSettings(**changes)


def test_the_lrp2_part_is_stored_under_its_choice_rule(monkeypatch):
    # a result searched under another rule (the default changed once) must not be reused as this rule's
    from polypeft.experiments import demo_lrp2
    from polypeft.experiments.demo_retrieval import RetrievalSettings

    now = demo_lrp2.settings(False, RetrievalSettings())
    assert now["rule"] == "maxt"
    monkeypatch.setattr(demo_lrp2, "DEFAULT_RULE", "split")
    assert settings_key(demo_lrp2.settings(False, RetrievalSettings())) != settings_key(now)

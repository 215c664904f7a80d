"""bench/warm_start_report.py: the options' validation curves and the chosen run's test BLEU with intervals."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from polypeft.data.parallel import ParallelExample
from polypeft.tasks.translation.evaluate import score_directions, sentences_by_direction

BENCH = Path(__file__).resolve().parents[1] / "bench"
REFERENCES = ["In the beginning was the Word.", "Jesus wept.", "Come and see.", "We have found the Messiah."]
HYPOTHESES = ["In the beginning was a Word.", "Jesus cried.", "Come and see.", "We found the Messiah."]


def load_report():
    spec = importlib.util.spec_from_file_location("warm_start_report", BENCH / "warm_start_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_folder(folder: Path, curve: dict[int, float], evaluated: bool) -> Path:
    folder.mkdir(parents=True)
    rows = [{"step": step, "loss": 5.0} for step in range(10, 40, 10)] + [
        {"step": step, "loss": 5.0, "valid_loss": value} for step, value in curve.items()]
    (folder / "train_log.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    if evaluated:
        examples = [ParallelExample(lang, "en", "x", ref, f"43:{i}") for lang in ("fr", "de")
                    for i, ref in enumerate(REFERENCES)]
        hypotheses = HYPOTHESES + REFERENCES
        scores = {**score_directions(examples, hypotheses), "sentences": sentences_by_direction(examples, hypotheses)}
        (folder / "eval_test.json").write_text(json.dumps({"pivot": "en", "variants": {"default": scores}}),
                                               encoding="utf-8")
    return folder


def test_the_report_tables_both_curves_and_the_chosen_runs_intervals(tmp_path):
    chosen = run_folder(tmp_path / "upper", {100: 4.9, 200: 4.5}, evaluated=True)
    other = run_folder(tmp_path / "scratch", {100: 4.8, 200: 4.6}, evaluated=False)
    text = load_report().report(chosen, [chosen, other], tmp_path / "out")
    assert "| step | upper | scratch |" in text and "| 200 | 4.500 | 4.600 |" in text
    assert "| de-en | 4 | 100.00 | [100.00, 100.00] |" in text  # perfect hypotheses: no spread
    fr = [line for line in text.splitlines() if line.startswith("| fr-en |")][0]
    low, high = (float(x) for x in fr.split("|")[4].strip(" []").split(","))
    assert low < float(fr.split("|")[3]) < high
    assert "| mean xx_en |" in text and (tmp_path / "out" / "warm_start.png").stat().st_size > 0
    assert (tmp_path / "out" / "warm_start.md").read_text(encoding="utf-8") == text


def test_the_report_reads_the_eval_file_it_is_given(tmp_path):
    chosen = run_folder(tmp_path / "upper", {100: 4.9}, evaluated=True)
    (chosen / "eval_test.json").rename(chosen / "eval_test_books-43.json")
    text = load_report().report(chosen, [chosen], tmp_path / "out", scored="eval_test_books-43.json")
    assert "| de-en | 4 | 100.00 | [100.00, 100.00] |" in text
    with pytest.raises(FileNotFoundError, match="eval_test.json"):
        load_report().report(chosen, [chosen], tmp_path / "again")

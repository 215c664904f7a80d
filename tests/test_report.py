"""The comparison of evaluated runs: averages, spread over seeds, win ratios, gains, parameters, Markdown."""
from __future__ import annotations

import json

import pytest

from polypeft.tasks.translation.evaluate import averages, win_ratio
from polypeft.tasks.translation.compare import compare, load_results, markdown


def evaluated(name: str, seed: int, bleu: dict, variant: str = "default", shared_extra: int = 0) -> dict:
    """An eval_test.json as `polypeft mmt eval` writes it, with chrF = 10 x BLEU."""
    directions = {d: {"bleu": b, "chrf": 10 * b, "sentences": 5} for d, b in bleu.items()}
    return {"name": name, "seed": seed, "parameters": {
        "base": 1000, "training_extra": 120 if name != "naive" else 0,
        "inference_extra_language_routes": 100 if name != "naive" else 0,
        "inference_extra_shared_route": shared_extra},
        "variants": {variant: {"directions": directions, "averages": averages(directions)}}}


def test_averages_split_by_direction_around_the_pivot():
    directions = {"en-de": {"bleu": 10.0, "chrf": 1.0}, "en-fr": {"bleu": 20.0, "chrf": 1.0},
                  "de-en": {"bleu": 30.0, "chrf": 1.0}}
    got = averages(directions)
    assert (got["bleu_en_xx"], got["bleu_xx_en"], got["bleu_all"]) == (15.0, 30.0, 20.0)
    assert averages(directions, pivot="de")["bleu_de_xx"] == 30.0


def test_win_ratio_counts_strict_wins_over_shared_directions():
    a = {"en-de": {"bleu": 2.0}, "de-en": {"bleu": 1.0}, "en-fr": {"bleu": 5.0}}
    b = {"en-de": {"bleu": 1.0}, "de-en": {"bleu": 1.0}, "fr-en": {"bleu": 0.0}}
    assert win_ratio(a, b) == 0.5  # en-de won, de-en tied; en-fr and fr-en are not shared
    with pytest.raises(ValueError, match="share no direction"):
        win_ratio({"en-de": {"bleu": 1.0}}, {"fr-en": {"bleu": 1.0}})


def test_compare_means_spreads_gains_and_win_ratios_over_seeds():
    results = [
        evaluated("naive", 0, {"en-de": 10.0, "de-en": 20.0}),
        evaluated("naive", 1, {"en-de": 12.0, "de-en": 22.0}),
        evaluated("lms", 0, {"en-de": 11.0, "de-en": 19.0}),
        evaluated("lms", 1, {"en-de": 15.0, "de-en": 25.0}),
        evaluated("lms_fd", 0, {"en-de": 9.0, "de-en": 21.0}, variant="fd_share", shared_extra=7),
    ]
    rows = compare(results, "naive")["rows"]
    assert set(rows) == {"naive", "lms", "lms_fd (fd-share)"}
    lms = rows["lms"]
    assert lms["seeds"] == [0, 1]
    assert lms["averages"]["bleu_all"] == {"mean": 17.5, "std": 2.5}  # (15, 20) per seed
    assert lms["bleu_gain"] == 1.5  # naive: (15, 17) -> 16
    assert lms["win_ratio_vs_baseline"] == 0.75  # seed 0 wins 1 of 2 directions, seed 1 both
    assert lms["bleu_per_direction"] == {"de-en": 22.0, "en-de": 13.0}
    assert lms["chrf_per_direction"] == {"de-en": 220.0, "en-de": 130.0}
    assert rows["lms_fd (fd-share)"]["inference_extra"] == 7 and lms["inference_extra"] == 100
    table = markdown(compare(results, "naive"))
    assert "| lms | 0,1 |" in table and "+1.50" in table and "chrF per direction" in table
    with pytest.raises(ValueError, match="baseline 'switch' is not among the runs"):
        compare(results, "switch")


def test_load_results_names_a_file_that_is_not_an_evaluation(tmp_path):
    run = tmp_path / "naive-seed0"
    run.mkdir()
    (run / "eval_test.json").write_text(json.dumps(evaluated("naive", 0, {"en-fr": 1.0})), encoding="utf-8")
    assert load_results([run])[0]["name"] == "naive"
    log = tmp_path / "naive-seed0.log"
    log.write_text("training:  4%|\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"naive-seed0\.log is not an evaluation"):
        load_results([run, log])
    other = tmp_path / "other.json"
    other.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"other\.json .*no 'variants'"):
        load_results([other])

"""The LRP2 choice-rule power study reads its rates right: on synthetic per-query outcomes whose truth is known (a real
gain, a loss the validation set hides, nothing at all), and end to end from cached outcomes (no model)."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import lrp2_rule_power as study  # noqa: E402  (a bench script: fails loudly if it breaks)
import lrp2_rule_power_report as report  # noqa: E402


def cells(queries: int, rate: float, moves: dict, seed: int) -> dict:
    """0/1 outcomes: the plain model right `rate` of the time; cell lirp:k, with moves[k] = (up, down), right on `up`
    queries where the plain model is wrong and wrong on `down` where it is right, the same elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    base = (torch.rand(queries, generator=generator) < rate).to(torch.uint8)
    right, wrong = base.nonzero().flatten(), (base == 0).nonzero().flatten()
    outcomes = {"base": base}
    for layer in (2, 3):
        up, down = moves.get(layer, (0, 0))
        values = base.clone()
        values[wrong[torch.randperm(len(wrong), generator=generator)[:up]]] = 1
        values[right[torch.randperm(len(right), generator=generator)[:down]]] = 0
        outcomes[f"lirp:{layer}"] = values
    return outcomes


# aa: layer 2 gains 12 points on the pool and on John, layer 3 changes nothing (a real gain to find).
# bb: layer 3 gains 12 points on the pool but loses 5 on John (a loss the validation set leads every rule to keep).
# cc: on the pool both layers trade 30 queries for 30 (noise only), on John both lose: what a rule keeps there is a
#     false keep, at the noise's rate.
POOL, JOHN = 600, 800
OUTCOMES = {
    "valid": {"aa": cells(POOL, 0.6, {2: (72, 0)}, 1), "bb": cells(POOL, 0.6, {3: (72, 0)}, 2),
              "cc": cells(POOL, 0.6, {2: (30, 30), 3: (30, 30)}, 3)},
    "test": {"aa": cells(JOHN, 0.6, {2: (96, 0)}, 4), "bb": cells(JOHN, 0.6, {3: (0, 40)}, 5),
             "cc": cells(JOHN, 0.6, {2: (0, 40), 3: (20, 36)}, 6)},
}


def settings(**changes):
    return study.arguments(["--layers", "2,3", "--sizes", "200,400", "--draws", "30", *changes.get("argv", [])])


def test_rates_count_each_kept_layer_by_its_john_class():
    truth = {2: {"class": "gain", "gain": 4.0}, 3: {"class": "loss", "gain": -2.0}, 4: {"class": "unclear", "gain": 1.0}}
    got = report.rates([None, 2, 3, 2, 4], truth)
    assert got["power"] == pytest.approx(2 / 5) and got["false_keep"] == pytest.approx(1 / 5)
    assert got["unclear_keep"] == pytest.approx(1 / 5) and got["refused"] == pytest.approx(1 / 5)
    assert got["john_gain"] == pytest.approx((4 - 2 + 4 + 1) / 5)
    assert got["layers"] == {"2": 2, "3": 1, "4": 1, "None": 1}


def test_john_truth_classes_a_gain_a_loss_and_a_tie():
    truth = report.john_truth(OUTCOMES["test"]["aa"], [2, 3], resamples=500)
    assert truth[2]["class"] == "gain" and truth[2]["gain"] == pytest.approx(12.0) and truth[2]["low"] > 0
    assert truth[3] == {"gain": 0.0, "low": 0.0, "high": 0.0, "class": "loss"}  # no gain counts as a loss
    assert report.john_truth(OUTCOMES["test"]["bb"], [3], resamples=500)[3]["gain"] == pytest.approx(-5.0)


def test_power_and_false_keep_on_outcomes_whose_truth_is_known():
    result = report.analyse(OUTCOMES, ["aa", "bb", "cc"], settings())
    assert result["languages_with_a_real_gain"] == ["aa"] and result["pool"] == {"aa": POOL, "bb": POOL, "cc": POOL}
    assert result["pool_share"] == {"200": pytest.approx(1 / 3, abs=1e-3), "400": pytest.approx(2 / 3, abs=1e-3)}
    for size in ("200", "400"):
        by_rule = result["per_size"][size]
        for rule in ("split", "bonferroni", "maxt"):
            aa, bb, cc = (by_rule[rule]["per_language"][language] for language in ("aa", "bb", "cc"))
            assert aa["power"] >= 0.9 and aa["false_keep"] == 0.0  # the real gain is found
            assert bb["false_keep"] >= 0.9 and bb["power"] == 0.0  # a validation set that misleads every rule
            assert cc["false_keep"] <= 0.2 and cc["refused"] >= 0.8  # noise only: kept at the noise's rate at most
            pooled = by_rule[rule]["pooled"]
            assert pooled["power"] == pytest.approx(aa["power"])  # power: over the languages with a real gain only
            assert pooled["false_keep"] == pytest.approx((bb["false_keep"] + cc["false_keep"]) / 3)
            assert pooled["false_keep_no_gain_languages"] == pytest.approx((bb["false_keep"] + cc["false_keep"]) / 2)
            assert aa["john_gain"] == pytest.approx(12.0 * aa["power"])
        # the old unchecked argmax always keeps something: in cc every keep is a loss
        assert by_rule["argmax"]["per_language"]["cc"]["false_keep"] == 1.0
        assert by_rule["argmax"]["per_language"]["cc"]["refused"] == 0.0


def test_the_study_resumes_from_cached_outcomes_without_a_model(tmp_path, monkeypatch):
    args = settings(argv=["--languages", "fr,ko", "--pool-queries", "600", "--test-queries", "800"])
    folder = tmp_path / "outcomes" / study.outcome_key(args)
    folder.mkdir(parents=True)
    for language, source in (("fr", "aa"), ("ko", "cc")):
        for split in ("valid", "test"):
            save_file(OUTCOMES[split][source], str(study.outcome_path(folder, split, language, args)))
    assert sorted(path.name for path in folder.iterdir()) == [
        "test800_fr.safetensors", "test800_ko.safetensors", "valid600_fr.safetensors", "valid600_ko.safetensors"]

    def no_model(*_, **__):
        raise AssertionError("every outcome is cached: no model may load")

    monkeypatch.setattr(study.Models, "_load", no_model)
    got = study.main(["--languages", "fr,ko", "--layers", "2,3", "--sizes", "200,400", "--draws", "30",
                      "--pool-queries", "600", "--test-queries", "800", "--compare-with", "", "--out", str(tmp_path)])
    assert got["languages_with_a_real_gain"] == ["fr"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(got["summary"]))
    assert (tmp_path / "table.md").read_text().startswith("| validation verses per language | rule |")
    assert (tmp_path / "power.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((folder / "run.json").read_text())["runs"]) == 1


@pytest.mark.parametrize("argv, message", [
    (["--pool-queries", "300", "--sizes", "100,400"], "--sizes up to 400 cannot be drawn from --pool-queries 300"),
    (["--languages", "fr,xx"], "--languages: ['xx'] not among the corpus's languages"),
    (["--draws", "0"], "--draws at least 1"),
])
def test_bad_study_settings_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        study.arguments(argv)
    assert message in capsys.readouterr().err

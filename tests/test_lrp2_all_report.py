"""The all-languages LRP2 bench scores John only in the cells its choice rules can pick: the analysis read off
that subset must equal the analysis read off every cell (synthetic per-query outcomes, no model)."""
import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "experiments" / "lrp2_all_languages"))
import lrp2_all_report as report  # noqa: E402  (a bench script: fails loudly if it breaks)


def settings(rule: str = "split") -> argparse.Namespace:
    return argparse.Namespace(layers="2,4,6", lsrp_layers="4,6", both_layers="4,6", resamples=6, resample_seeds="0,1",
                              rule=rule)


def outcomes(languages, queries: int, seed: int, lift: dict) -> dict:
    """0/1 outcomes per cell: the plain model right 60 % of the time, each cell `lift[cell]` more (or less)."""
    generator = torch.Generator().manual_seed(seed)
    names = ["base", "lirp:2", "lirp:4", "lirp:6", "pair:2:4", "pair:2:6", "pair:4:6", "both:4", "both:6"]
    return {language: {name: (torch.rand(queries, generator=generator) < 0.6 + lift.get((language, name), 0.0))
                       .to(torch.uint8) for name in names} for language in languages}


@pytest.mark.parametrize("rule", ["split", "bonferroni"])
def test_subset_of_cells_gives_the_same_analysis(rule):
    languages = ["fr", "ko", "de"]
    lift = {("fr", "lirp:6"): 0.3, ("ko", "lirp:4"): 0.25, ("ko", "both:4"): 0.2, ("de", "lirp:2"): 0.02}
    valid, test = outcomes(languages, 120, 0, lift), outcomes(languages, 200, 1, lift)
    args = settings(rule)
    needed = report.test_cells(valid, languages, args)
    assert all("base" in cells for cells in needed.values())
    assert any(len(needed[language]) < len(test[language]) for language in languages)  # a real subset here
    subset = {language: {name: test[language][name] for name in needed[language]} for language in languages}
    full = report.analyse({"valid": valid, "test": test}, languages, args)
    cut = report.analyse({"valid": valid, "test": subset}, languages, args)
    assert cut == full
    assert full["table"]["fr"]["lirp"]["robust"]["cell"] == [6, None]
    assert full["searches"]["lirp"]["rule"]["name"] == rule


def test_a_cell_left_out_breaks_the_analysis():
    """The subset is the minimum: dropping a chosen cell makes the analysis fail, so it cannot read an unscored cell."""
    languages = ["fr", "ko"]
    lift = {("fr", "lirp:6"): 0.3, ("ko", "lirp:4"): 0.25}
    valid, test = outcomes(languages, 120, 0, lift), outcomes(languages, 200, 1, lift)
    args = settings()
    needed = report.test_cells(valid, languages, args)
    needed["fr"].discard("lirp:6")
    subset = {language: {name: test[language][name] for name in needed[language]} for language in languages}
    with pytest.raises(KeyError):
        report.analyse({"valid": valid, "test": subset}, languages, args)

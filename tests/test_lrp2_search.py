"""The robust LRP2 layer search: a cell inside the validation noise gives no LRP2, a clear one is kept.

Every choice rule ("maxt", the default, "bonferroni", "split") is checked; simulated draws check their error rates."""
from __future__ import annotations

import json
from statistics import NormalDist

import pytest
import torch

from polypeft.interventions.lrp2 import LRP2, language_vectors
from polypeft.interventions.search import (
    DEFAULT_RULE, MIN_VALIDATION_EXAMPLES, LayerSearchResult, bonferroni_z, heatmap_title, max_t_threshold,
    search_layers, split_examples, studentised,
)
from test_lrp2 import TEXTS, WORDS, encode, tiny_bert  # noqa: F401 (tiny_tokenizer reads WORDS)


def outcomes(correct: int, total: int = 400, offset: int = 0) -> torch.Tensor:
    """A 0/1 accuracy vector with `correct` ones, rotated by `offset` so two cells differ on different examples."""
    values = torch.zeros(total)
    values[:correct] = 1.0
    return values.roll(offset)


def search(cells: dict, baseline: torch.Tensor, **options):
    def score(language, i, j):
        return baseline if i is None else cells[(i, j)]

    layers = sorted({i for i, _ in cells})
    return search_layers(score, ["fr"], candidate_layers=layers, pairs=False, progress=False, **options)


@pytest.mark.parametrize("rule", ["split", "bonferroni", "maxt"])
def test_a_top_cell_inside_the_noise_gives_no_lrp2(tmp_path, rule):
    # 200/400 right without LRP2; the best layer gets 212/400 but on examples shuffled against the
    # baseline's, so the paired differences are large (SE ~ 3.5 points) next to a 3-point gain.
    base = outcomes(200)
    cells = {(1, None): outcomes(190, offset=37), (2, None): outcomes(212, offset=101), (3, None): outcomes(195, offset=7)}
    result = search(cells, base, rule=rule)
    chosen = result.best("fr")
    assert chosen["decision"] == "no LRP2" and chosen["lirp_layer"] is None and chosen["gain"] == 0.0
    assert chosen["rule"] == rule and chosen["best_cell"]["lirp_layer"] == 2
    assert chosen["best_cell"]["gain"] == pytest.approx(0.03)
    z = {"split": bonferroni_z(1), "bonferroni": bonferroni_z(3),
         "maxt": max_t_threshold(torch.stack([cells[(k, None)] - base for k in (1, 2, 3)], 1))}[rule]
    assert chosen["threshold"] > chosen["test_gain"] and chosen["z"] == pytest.approx(z)
    assert chosen["test_examples"] == (200 if rule == "split" else 400)
    assert result.best_cell("fr")["lirp_layer"] == 2  # the old, unchecked argmax is still there
    saved = json.loads(result.save_json(tmp_path / "search.json").read_text())
    assert saved["best"]["fr"]["lirp_layer"] is None and saved["best"]["fr"]["decision"] == "no LRP2"
    assert saved["rule"]["name"] == rule and saved["best"]["fr"]["reason"] == chosen["reason"]
    assert saved["rule"]["max_t"] == ({"flips": 2000, "seed": 0} if rule == "maxt" else None)  # the null's seeding
    held_back = "held-back " if rule == "split" else ""
    assert f"no LRP2 (rule {rule}; tested i=2, j=None: {held_back}gain +0.030, noise" in heatmap_title(chosen, "fr", "acc")
    png = result.plot_heatmaps(tmp_path)[0]
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("rule", ["split", "bonferroni", "maxt"])
def test_a_top_cell_clearly_above_the_noise_is_kept(rule):
    # the same 3-point gain, but paired: the cell is right wherever the baseline is, plus 12 more
    base = outcomes(200)
    cells = {(1, None): outcomes(190, offset=37), (2, None): outcomes(212), (3, None): outcomes(195, offset=7)}
    chosen = search(cells, base, rule=rule).best("fr")
    assert chosen["decision"] == "lrp2" and chosen["lirp_layer"] == 2 and chosen["rule"] == rule
    assert chosen["gain"] == pytest.approx(0.03) and chosen["test_gain"] > chosen["threshold"]
    assert heatmap_title(chosen, "fr", "acc").startswith(f"LRP2 fr: chosen i=2, j=None (rule {rule}; ")


def test_the_default_rule_is_maxt():
    # the most powerful of the three at every validation size studied, and as safe (bench/lrp2_rule_power.py)
    assert DEFAULT_RULE == "maxt"
    chosen = search({(2, None): outcomes(212)}, outcomes(200)).best("fr")
    assert chosen["rule"] == "maxt"  # every example both chooses and tests (no half held back)
    assert chosen["selection_examples"] == chosen["test_examples"] == len(outcomes(200))


@pytest.mark.parametrize("rule", ["split", "bonferroni", "maxt"])
def test_the_noise_rule_uses_the_stricter_z_for_more_cells(rule):
    # paired gain of 12/400 with SE ~ 0.0086 (0.012 on the held-back half): clears z=1.64 but not a fixed z of 4
    base, better = outcomes(200), outcomes(212)
    assert search({(2, None): better}, base, rule=rule).best("fr")["decision"] == "lrp2"
    assert search({(2, None): better}, base, rule=rule, z=4.0).best("fr")["decision"] == "no LRP2"
    assert bonferroni_z(12) > bonferroni_z(1) == pytest.approx(1.645, abs=1e-3)


@pytest.mark.parametrize("rule, fewest", [("bonferroni", MIN_VALIDATION_EXAMPLES), ("maxt", MIN_VALIDATION_EXAMPLES),
                                          ("split", 2 * MIN_VALIDATION_EXAMPLES)])
def test_a_small_validation_set_gives_no_lrp2(rule, fewest):
    # every example better: a huge gain, but below MIN_VALIDATION_EXAMPLES examples in the test nothing is
    # trusted; "split" tests on half of them, so it needs twice as many in all
    chosen = search({(1, None): torch.ones(fewest - 1)}, torch.zeros(fewest - 1), rule=rule).best("fr")
    assert chosen["decision"] == "no LRP2" and "too small" in chosen["reason"]
    assert search({(1, None): torch.ones(fewest)}, torch.zeros(fewest), rule=rule).best("fr")["decision"] == "lrp2"


def test_split_examples_interleaves_the_validation_set():
    selection, held_back = split_examples(10)
    assert selection.tolist() == [0, 2, 4, 6, 8] and held_back.tolist() == [1, 3, 5, 7, 9]
    selection, held_back = split_examples(9, 1 / 3)
    assert selection.tolist() == [0, 3, 6] and held_back.tolist() == [1, 2, 4, 5, 7, 8]
    selection, held_back = split_examples(1000, 0.3)  # exact: 0.3 is 3/10, no float drift over 1,000 positions
    assert len(selection) == 300 and selection[:4].tolist() == [0, 3, 6, 10]
    assert sorted(selection.tolist() + held_back.tolist()) == list(range(1000))
    assert torch.equal(split_examples(1000, 0.3)[0], selection)  # deterministic: no seed


def test_split_and_maxt_keep_a_real_gain_that_bonferroni_refuses():
    # 200 examples, 12 layers. Layer 7 is right on 6 more examples than the plain model (3 in each interleaved
    # half) and never worse: +3 points. The other layers trade one example for another (no gain).
    # Bonferroni needs 2.64 SE of all 200 (> 3 points); split needs 1.64 SE of the held-back 100 (2.8 points).
    base = torch.zeros(200)
    base[100:] = 1.0
    cells = {}
    for layer in range(1, 13):
        values = base.clone()
        if layer == 7:
            values[[0, 1, 20, 21, 40, 41]] = 1.0
        else:
            values[[2 * layer, 2 * layer + 1]] = 1.0
            values[[100 + 2 * layer, 101 + 2 * layer]] = 0.0
        cells[(layer, None)] = values
    bonferroni = search(cells, base, rule="bonferroni").best("fr")
    assert bonferroni["decision"] == "no LRP2" and bonferroni["best_cell"]["lirp_layer"] == 7
    assert bonferroni["test_gain"] == pytest.approx(0.03) and bonferroni["test_gain"] < bonferroni["threshold"]
    split = search(cells, base, rule="split").best("fr")
    assert split["decision"] == "lrp2" and split["lirp_layer"] == 7 and split["gain"] == pytest.approx(0.03)
    assert split["test_gain"] == pytest.approx(0.03) and split["test_gain"] > split["threshold"]
    # max-t: the sign flips of these sparse differences rarely reach layer 7's 2.48 SE, so its bar is lower than 2.64
    maxt = search(cells, base, rule="maxt").best("fr")
    assert maxt["decision"] == "lrp2" and maxt["lirp_layer"] == 7 and maxt["z"] < bonferroni["z"]


def simulated_keep_rate(rule: str, gains: list[float], examples: int, draws: int, seed: int, shared: float = 0.0,
                        **options) -> tuple:
    """Share of `draws` simulated validation sets on which `rule` keeps a cell, and on which the kept cell is one
    with a positive planted gain. The plain model is right 70 % of the time; each of the cells flips 8 % of the
    examples it gets right and enough of the others to add `gains[cell]` on average (correlated with the base).
    `shared`: the share of each cell's random draws common to every cell (neighbouring layers move the same examples)."""
    generator = torch.Generator().manual_seed(seed)
    kept = kept_real = 0
    for _ in range(draws):
        base = (torch.rand(examples, generator=generator) < 0.7).double()
        common = torch.rand(examples, generator=generator)
        cells = {}
        for layer, gain in enumerate(gains, start=1):
            own = torch.rand(examples, generator=generator)
            draw = torch.where(torch.rand(examples, generator=generator) < shared, common, own)
            fix = (0.08 * 0.7 + gain) / 0.3
            cells[(layer, None)] = torch.where(base > 0, (draw >= 0.08).double(), (draw < fix).double())
        rows = [{"language": "fr", "lirp_layer": layer, "lsrp_layer": None, "score": float(values.mean())}
                for (layer, _), values in cells.items()]
        outcomes_by_cell = {("fr", layer, None): values for (layer, _), values in cells.items()}
        outcomes_by_cell[("fr", None, None)] = base
        result = LayerSearchResult(rows, {"fr": float(base.mean())}, outcomes=outcomes_by_cell, rule=rule, **options)
        chosen = result.best("fr")
        kept += chosen["decision"] == "lrp2"
        kept_real += chosen["decision"] == "lrp2" and gains[chosen["lirp_layer"] - 1] > 0
    return kept / draws, kept_real / draws


def test_split_refuses_null_and_losing_cells_at_the_nominal_rate():
    # 12 cells with no real gain: the cell chosen on the selection half is tested on the other half, so a
    # keep happens about alpha = 5 % of the time (the draws' own SE is 0.7 points at 1,000 draws) ...
    null, _ = simulated_keep_rate("split", [0.0] * 12, examples=400, draws=1000, seed=1)
    assert 0.025 <= null <= 0.075
    # ... whereas testing the best of 12 on the very examples that chose it, at the same z, keeps far more often:
    # the split is what makes one test enough
    unsplit, _ = simulated_keep_rate("bonferroni", [0.0] * 12, examples=400, draws=300, seed=1, z=bonferroni_z(1))
    assert unsplit > 0.2
    losing, _ = simulated_keep_rate("split", [-0.02] * 12, examples=400, draws=300, seed=2)
    assert losing <= 0.01


def test_maxt_refuses_null_cells_at_the_nominal_rate_and_keeps_correlated_gains_bonferroni_misses():
    # 12 cells sharing 90 % of their draws: the family of tests is much smaller than 12 independent ones, which
    # max-t reads off the sign flips (a bar near 2.0) and Bonferroni cannot (2.64)
    null, _ = simulated_keep_rate("maxt", [0.0] * 12, examples=400, draws=400, seed=4, shared=0.9)
    assert 0.02 <= null <= 0.08
    losing, _ = simulated_keep_rate("maxt", [-0.02] * 12, examples=400, draws=200, seed=5, shared=0.9)
    assert losing <= 0.01
    _, maxt = simulated_keep_rate("maxt", [0.04] * 12, examples=400, draws=200, seed=6, shared=0.9)
    _, bonferroni = simulated_keep_rate("bonferroni", [0.04] * 12, examples=400, draws=200, seed=6, shared=0.9)
    assert maxt >= bonferroni + 0.1  # 0.72 against 0.58 here (split: 0.42)


def test_split_keeps_a_clear_real_gain_in_most_draws():
    # one layer adds 10 points, the others nothing, 400 validation examples: kept, and kept at that layer
    kept, kept_real = simulated_keep_rate("split", [0.0] * 5 + [0.10] + [0.0] * 6, examples=400, draws=200, seed=3)
    assert kept_real >= 0.9 and kept - kept_real <= 0.02


def test_the_max_t_bar_reads_the_cells_correlation_off_the_sign_flips():
    # Gaussian differences, 400 examples, 12 cells: independent cells need Sidak's z (2.63, about Bonferroni's 2.64),
    # identical cells are one test (1.64), cells correlated at 0.9 lie between; the same differences give the same bar
    generator = torch.Generator().manual_seed(11)
    common, own = torch.randn(400, 1, generator=generator), torch.randn(400, 12, generator=generator)
    sidak = NormalDist().inv_cdf(0.95 ** (1 / 12))
    assert max_t_threshold(own) == pytest.approx(sidak, abs=0.15)
    assert max_t_threshold(common.expand(400, 12)) == pytest.approx(bonferroni_z(1), abs=0.15)
    assert bonferroni_z(1) + 0.2 < max_t_threshold(3 * common + own) < sidak - 0.2
    assert max_t_threshold(own) == max_t_threshold(own.clone())  # seeded: no run-to-run change
    assert max_t_threshold(own, seed=1) != max_t_threshold(own) and abs(max_t_threshold(own, seed=1) - sidak) < 0.15
    # cells each moved by one example: almost every sign flip reaches their statistic (1), so none can clear the bar
    assert max_t_threshold(torch.eye(400)[:, :12]) == pytest.approx(1.0)


def test_a_cell_identical_to_the_baseline_does_not_blind_max_t():
    # a layer whose shift changes no outcome has differences all 0: its statistic is 0 (not 0/0), so the bar stays
    # finite and the clear 12-point gain of the other layer is kept
    base = outcomes(120, total=200)
    better = base.clone()
    better[(base == 0).nonzero().flatten()[:24]] = 1.0
    chosen = search({(1, None): base.clone(), (2, None): better}, base, rule="maxt").best("fr")
    assert chosen["decision"] == "lrp2" and chosen["lirp_layer"] == 2 and 1.5 < chosen["z"] < 2.5
    assert studentised(torch.zeros(2), torch.zeros(2), 10).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("options, message", [
    ({"alpha": 1.0}, r"alpha=1.0 must be a level in \(0, 1\)"),
    ({"flips": 10}, r"flips=10 must be an integer >= 1/alpha = 20"),
    ({"differences": torch.zeros(400)}, r"differences of shape \(400,\) must be examples x cells"),
    ({"differences": torch.zeros(1, 3)}, r"at least 2 examples"),
])
def test_bad_max_t_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        max_t_threshold(**{"differences": torch.zeros(400, 3), **options})


@pytest.mark.parametrize("options, message", [
    ({"rule": "holm"}, r"rule='holm' is not a choice rule; allowed: 'split'.*'bonferroni' or 'maxt'"),
    ({"selection_share": 1.0}, r"selection_share=1.0 must be in \(0, 1\)"),
    ({"alpha": 0.0}, r"alpha=0.0 must be a level in \(0, 1\)"),
    ({"min_examples": 1}, r"min_examples=1 must be an integer >= 2"),
])
def test_bad_rule_settings_are_refused_before_any_cell_is_scored(options, message):
    calls = []

    def score(language, i, j):
        calls.append((i, j))
        return torch.ones(10)

    with pytest.raises(ValueError, match=message):
        search_layers(score, ["fr"], candidate_layers=[1, 2], pairs=False, progress=False, **options)
    assert calls == []
    with pytest.raises(ValueError, match=message):
        LayerSearchResult([], {}, **options)


def test_float_scores_keep_a_top_cell_only_above_the_baseline():
    def score(language, i, j):
        return {None: 0.5, 1: 0.4, 2: 0.45}[i] if language == "fr" else {None: 0.5, 1: 0.6, 2: 0.55}[i]

    result = search_layers(score, ["fr", "de"], candidate_layers=[1, 2], pairs=False, progress=False)
    assert result.best("fr")["lirp_layer"] is None and result.best("fr")["se"] is None
    assert result.best("de")["lirp_layer"] == 1 and result.best("de")["decision"] == "lrp2"
    # A 0-d tensor (acc.mean() without float()) is a number too, not one example.
    as_tensor = search_layers(lambda *cell: torch.tensor(score(*cell)), ["de"], candidate_layers=[1, 2], pairs=False,
                              progress=False)
    assert as_tensor.best("de")["lirp_layer"] == 1 and as_tensor.best("de")["examples"] is None


def test_unpaired_outcomes_are_refused():
    with pytest.raises(ValueError, match="paired outcomes need the same validation examples"):
        search({(1, None): torch.ones(80)}, torch.zeros(100)).best("fr")


def test_mean_language_pivot_shifts_both_sides(tiny_tokenizer):
    model, tokenizer = tiny_bert(), tiny_tokenizer
    vectors = language_vectors(model, TEXTS, tokenizer, progress=False)
    both = vectors.with_mean_language("all")
    expected = torch.stack([vectors.vector(code, 1) for code in ("de", "en", "fr")]).mean(0)
    assert torch.allclose(both.vector("all", 1), expected)
    batch = encode(tokenizer, TEXTS["en"])
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states[1]
        with LRP2(model, vectors, lirp_layer=1) as lrp2, lrp2.languages("en"):
            to_english = model(**batch, output_hidden_states=True).hidden_states[1]
        with LRP2(model, both, lirp_layer=1, pivot="all") as lrp2, lrp2.languages("en"):
            to_mean = model(**batch, output_hidden_states=True).hidden_states[1]
    assert torch.equal(to_english, plain)  # English is the pivot: untouched
    shift = expected - vectors.vector("en", 1)
    assert torch.allclose(to_mean, plain + shift, atol=1e-6) and shift.abs().max() > 1e-3
    with pytest.raises(ValueError, match="already a language"):
        vectors.with_mean_language("fr")

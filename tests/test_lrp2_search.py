"""The robust LRP2 layer search: a top cell inside the validation noise gives no LRP2, a clear one is kept."""
from __future__ import annotations

import json

import pytest
import torch

from polypeft.interventions.lrp2 import LRP2, language_vectors
from polypeft.interventions.search import MIN_VALIDATION_EXAMPLES, bonferroni_z, search_layers
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


def test_a_top_cell_inside_the_noise_gives_no_lrp2(tmp_path):
    # 200/400 right without LRP2; the best layer gets 212/400 but on examples shuffled against the
    # baseline's, so the paired differences are large (SE ~ 3.5 points) next to a 3-point gain.
    base = outcomes(200)
    cells = {(1, None): outcomes(190, offset=37), (2, None): outcomes(212, offset=101), (3, None): outcomes(195, offset=7)}
    result = search(cells, base)
    chosen = result.best("fr")
    assert chosen["decision"] == "no LRP2" and chosen["lirp_layer"] is None and chosen["gain"] == 0.0
    assert chosen["best_cell"]["lirp_layer"] == 2 and chosen["best_cell"]["gain"] == pytest.approx(0.03)
    assert chosen["threshold"] > 0.03 and chosen["z"] == pytest.approx(bonferroni_z(3))
    assert result.best_cell("fr")["lirp_layer"] == 2  # the old, unchecked argmax is still there
    saved = json.loads(result.save_json(tmp_path / "search.json").read_text())
    assert saved["best"]["fr"]["lirp_layer"] is None and saved["best"]["fr"]["decision"] == "no LRP2"
    png = result.plot_heatmaps(tmp_path)[0]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_top_cell_clearly_above_the_noise_is_kept():
    # the same 3-point gain, but paired: the cell is right wherever the baseline is, plus 12 more
    base = outcomes(200)
    cells = {(1, None): outcomes(190, offset=37), (2, None): outcomes(212), (3, None): outcomes(195, offset=7)}
    chosen = search(cells, base).best("fr")
    assert chosen["decision"] == "lrp2" and chosen["lirp_layer"] == 2
    assert chosen["gain"] == pytest.approx(0.03) and chosen["gain"] > chosen["threshold"]


def test_the_noise_rule_uses_the_stricter_z_for_more_cells():
    # paired gain of 12/400 with SE ~ 0.0086: clears z=1.64 (one cell) but not a fixed z of 4
    base, better = outcomes(200), outcomes(212)
    assert search({(2, None): better}, base).best("fr")["decision"] == "lrp2"
    assert search({(2, None): better}, base, z=4.0).best("fr")["decision"] == "no LRP2"
    assert bonferroni_z(12) > bonferroni_z(1) == pytest.approx(1.645, abs=1e-3)


def test_a_small_validation_set_gives_no_lrp2():
    # every example better: a huge gain, but below MIN_VALIDATION_EXAMPLES examples nothing is trusted
    few = MIN_VALIDATION_EXAMPLES - 1
    chosen = search({(1, None): torch.ones(few)}, torch.zeros(few)).best("fr")
    assert chosen["decision"] == "no LRP2" and "too small" in chosen["reason"]
    enough = MIN_VALIDATION_EXAMPLES
    assert search({(1, None): torch.ones(enough)}, torch.zeros(enough)).best("fr")["decision"] == "lrp2"


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

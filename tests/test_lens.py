"""LENS on tiny random BERT and Llama models: probe geometry, save/load, top-k-only training."""
from __future__ import annotations

import pytest
import torch

from polypeft.interventions.lens import (
    LensProbe,
    LensTrainSettings,
    lens_schedule,
    load_trained_layers,
    probe,
    save_trained_layers,
    train,
)
from polypeft.interventions.capture import InterventionError
from polypeft.interventions.lrp2 import language_vectors
from test_lrp2 import TEXTS, WORDS, tiny_bert, tiny_llama  # noqa: F401 (tiny_tokenizer reads WORDS)

PARALLEL = [
    {"en": "the cat", "fr": "le chat", "de": "die katze", "ref": "1"},
    {"en": "the house", "fr": "la maison", "de": "das haus", "ref": "2"},
    {"en": "a dog", "fr": "le chien", "de": "der hund", "ref": "3"},
    {"en": "the dog the cat", "fr": "le chien le chat", "ref": "4"},
]


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def test_probe_geometry(tokenizer):
    model = tiny_bert()
    result = probe(model, tokenizer, TEXTS, progress=False)
    assert result.pooling == "mean" and result.layers == [0, 1, 2, 3]
    vectors = language_vectors(model, TEXTS, tokenizer, progress=False)
    for layer in result.layers:
        row = result.row(layer)
        means = torch.stack([result.means[code][row] for code in result.languages])
        torch.testing.assert_close(means[1], vectors.vector(result.languages[1], layer), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.agnostic_mean[row], means.mean(0), atol=1e-5, rtol=1e-5)
        basis = result.specific_basis[row]
        assert basis.shape == (16, 2)  # L - 1 = 2 directions for 3 languages
        torch.testing.assert_close(basis.T @ basis, torch.eye(2), atol=1e-5, rtol=1e-5)
        # the centered means lie inside the specific subspace, the agnostic direction outside it
        centered = means - means.mean(0)
        torch.testing.assert_close(result.project_specific(centered, layer), centered, atol=1e-4, rtol=1e-4)
        assert result.agnostic_direction[row].norm() == pytest.approx(1.0, abs=1e-5)
        assert (basis.T @ result.agnostic_direction[row]).abs().max() < 1e-4
    direction = result.direction("de", 3)
    torch.testing.assert_close(direction, result.means["de"][3] - result.means["en"][3], atol=1e-4, rtol=1e-4)
    assert result.direction("en", 3).abs().max() < 1e-6


def test_probe_defaults_to_last_token_for_causal_lms(tokenizer):
    result = probe(tiny_llama(), tokenizer, TEXTS, layers=[2, 3], progress=False)
    assert result.pooling == "last" and result.stack == "decoder"


def test_probe_save_load_plot_and_refusal(tokenizer, tmp_path):
    model = tiny_bert()
    result = probe(model, tokenizer, TEXTS, progress=False)
    result.save(tmp_path / "probe")
    loaded = LensProbe.load(tmp_path / "probe", model=model)
    torch.testing.assert_close(loaded.specific_basis, result.specific_basis)
    assert loaded.languages == ["de", "en", "fr"] and loaded.points["fr"].shape == (3, 16)
    png = loaded.plot(tmp_path / "lens_probe.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(InterventionError, match="different model"):
        LensProbe.load(tmp_path / "probe", model=tiny_bert(seed=3))
    with pytest.raises(InterventionError, match="at least 2 languages"):
        probe(model, tokenizer, {"en": TEXTS["en"]}, progress=False)


def test_a_lens_step_changes_only_the_top_k_layers(tokenizer):
    model = tiny_bert()
    result = probe(model, tokenizer, TEXTS, progress=False)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    outcome = train(model, tokenizer, PARALLEL, result, LensTrainSettings(top_k_layers=1, batch_size=4,
        training=lens_schedule(steps=1, lr=1e-2)), progress=False)
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert changed and all(name.startswith("encoder.layer.2.") for name in changed)
    assert set(outcome.trained_parameters) == {name for name in before if name.startswith("encoder.layer.2.")}
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == flags
    # the first step starts from the frozen model, so the cached references match exactly
    assert outcome.history[0]["retain"] == pytest.approx(0.0, abs=1e-10)
    assert outcome.history[0]["separate"] > 0


def test_training_lowers_the_lens_objective_and_ships_only_top_layers(tokenizer, tmp_path):
    model = tiny_bert()
    result = probe(model, tokenizer, TEXTS, progress=False)
    outcome = train(model, tokenizer, PARALLEL, result, LensTrainSettings(top_k_layers=2, batch_size=4,
        training=lens_schedule(steps=40, lr=3e-3)), progress=False)
    first, last = outcome.history[0], outcome.history[-1]
    assert last["align"] + last["separate"] < 0.5 * (first["align"] + first["separate"])
    path = save_trained_layers(model, outcome, tmp_path / "lens_layers.safetensors")
    fresh = tiny_bert()
    loaded = load_trained_layers(fresh, path)
    assert sorted(loaded) == outcome.trained_parameters
    for name, parameter in fresh.named_parameters():
        torch.testing.assert_close(parameter, dict(model.named_parameters())[name])
    with pytest.raises(InterventionError, match="different model"):
        load_trained_layers(tiny_bert(seed=5), path)


@pytest.mark.parametrize("push", [1.0, -1.0])
def test_push_strength_sign_moves_targets_away_from_or_toward_the_pivot(tokenizer, push):
    """The paper pushes a language away from the pivot in its specific subspace; a negative strength pulls it
    toward the pivot instead (the retrieval-friendly use)."""
    model = tiny_bert()
    result = probe(model, tokenizer, TEXTS, progress=False)
    layer = result.layers[-1]

    def gap() -> float:
        means = probe(model, tokenizer, TEXTS, progress=False).means
        offset = means["fr"][result.row(layer)] - means["en"][result.row(layer)]
        return float(result.project_specific(offset.unsqueeze(0), layer).norm())

    before = gap()
    # Retention holds the pivot, so the gap moves by the target's shift s * d_l: doubles for +1, closes for -1.
    outcome = train(model, tokenizer, PARALLEL, result,
        LensTrainSettings(top_k_layers=2, weights=(0.0, 1.0, 1.0), batch_size=4, languages=["fr"], push_strength=push,
            training=lens_schedule(steps=30, lr=3e-3)), progress=False)
    assert outcome.settings["push_strength"] == {"fr": push}
    after = gap()
    assert (after > 1.5 * before) if push > 0 else (after < 0.3 * before)


def test_train_refuses_bad_settings(tokenizer):
    model = tiny_bert()
    result = probe(model, tokenizer, TEXTS, layers=[1, 2], progress=False)
    with pytest.raises(InterventionError, match="loss layer 2 lies below the trained blocks"):
        train(model, tokenizer, PARALLEL, result, LensTrainSettings(top_k_layers=1,
            training=lens_schedule(steps=1)), progress=False)
    with pytest.raises(InterventionError, match="no text for the pivot 'en'"):
        train(model, tokenizer, [{"fr": "le chat"}], result, LensTrainSettings(top_k_layers=2,
            training=lens_schedule(steps=1)), progress=False)
    with pytest.raises(InterventionError, match="top_k_layers=9 is out of range"):
        train(model, tokenizer, PARALLEL, result, LensTrainSettings(top_k_layers=9,
            training=lens_schedule(steps=1)), progress=False)
    with pytest.raises(InterventionError, match="different model"):
        train(tiny_bert(seed=2), tokenizer, PARALLEL, result, LensTrainSettings(top_k_layers=2,
            training=lens_schedule(steps=1)), progress=False)
    with pytest.raises(InterventionError, match=r"push_strength has no value for \['de'\]"):
        train(model, tokenizer, PARALLEL, result, LensTrainSettings(top_k_layers=2, push_strength={"fr": -1.0},
            training=lens_schedule(steps=1)), progress=False)


def test_lens_trains_a_causal_lm(tokenizer):
    model = tiny_llama()
    result = probe(model, tokenizer, TEXTS, progress=False)
    outcome = train(model, tokenizer, PARALLEL, result, LensTrainSettings(top_k_layers=1, batch_size=3,
        training=lens_schedule(steps=2, lr=1e-3)), progress=False)
    assert all(name.startswith("model.layers.2.") for name in outcome.trained_parameters)
    assert len(outcome.history) == 2

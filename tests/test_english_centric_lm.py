"""The English-centric causal LM (built once, cached, resumed), the character n-gram language identifier, and
LENS/LRP2 on a decoder-only Llama: the paper's push sign moves a language along its own direction."""
from __future__ import annotations

import json

import pytest
import torch

import polypeft.tasks.language_model as language_model
from polypeft.backbones.causal_lm import (CausalLmSettings, CausalLmTokenizer, causal_lm_dir, lm_schedule,
                                         mixture_weights)
from polypeft.data.bible import BibleCorpus
from polypeft.experiments.english_centric_lm import prompt_of
from polypeft.interventions.capture import iterate_pooled
from polypeft.interventions.lens import LensTrainSettings, lens_schedule, probe, train
from polypeft.interventions.lrp2 import LRP2, language_vectors
from polypeft.tasks.language_id import (LanguageIdentifier, bible_language_identifier, identification_accuracy,
                                        train_language_identifier)
from test_lens import PARALLEL
from test_lrp2 import TEXTS, WORDS, tiny_llama  # noqa: F401 (tiny_tokenizer reads WORDS)

TINY_LM = CausalLmSettings(languages=("en", "fr"), vocab_size=300, spm_sentences=200, hidden_size=32, num_layers=2,
                           num_heads=2, intermediate_size=64, seq_len=32, batch_size=4,
                           training=lm_schedule(steps=4, checkpoint_every=2), max_verses=100)


REAL_LOSS = language_model.language_model_loss


class Stop(Exception):
    """Stands for a build killed mid-way."""


def counting_loss(calls: list, stop_at: int = 0):
    """The LM loss, counting the training calls (gradients on) and raising Stop at call `stop_at`."""
    def loss(model, batch):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == stop_at:
                raise Stop
        return REAL_LOSS(model, batch)
    return loss


@pytest.fixture
def corpus():
    return BibleCorpus()


@pytest.mark.slow
def test_build_is_cached_and_resumes_after_a_stop(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("POLYPEFT_CACHE", str(tmp_path / "cache"))
    calls: list = []
    monkeypatch.setattr(language_model, "language_model_loss", counting_loss(calls, stop_at=3))
    with pytest.raises(Stop):  # killed during step 3: the checkpoint of step 2 is on disk
        language_model.build_english_centric_lm(TINY_LM, tmp_path / "stopped", corpus, progress=False)
    assert (causal_lm_dir(TINY_LM, tmp_path / "stopped") / "checkpoint.safetensors").is_file()
    calls.clear()
    monkeypatch.setattr(language_model, "language_model_loss", counting_loss(calls))
    resumed, tokenizer, record = language_model.build_english_centric_lm(TINY_LM, tmp_path / "stopped", corpus,
                                                                         progress=False)
    assert record["resumed_from_step"] == 2 and len(calls) == 2  # only steps 3 and 4 ran again
    calls.clear()
    whole, _, whole_record = language_model.build_english_centric_lm(TINY_LM, tmp_path / "whole", corpus, progress=False)
    assert len(calls) == 4 and whole_record["resumed_from_step"] == 0
    for (name, left), right in zip(resumed.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(left, right, msg=f"{name} differs between the resumed and the whole build")

    def no_training(*args, **kwargs):
        raise AssertionError("a cached build must not train")

    monkeypatch.setattr(language_model, "train", no_training)
    cached, _, cached_record = language_model.build_english_centric_lm(TINY_LM, tmp_path / "whole", corpus, progress=False)
    assert cached_record == whole_record
    torch.testing.assert_close(cached.model.embed_tokens.weight, whole.model.embed_tokens.weight)
    assert 0 < language_model.mean_token_nll(cached, tokenizer, ["In the beginning God created"]) < 10
    assert len(language_model.continue_prompts(cached, tokenizer, ["In the beginning"], new_tokens=3)) == 1


def test_mixture_weights_give_the_asked_token_shares():
    verses = {"en": [[1, 2, 3, 4]] * 5, "fr": [[1] * 8] * 5}  # a French verse is twice as long
    weights = mixture_weights(TINY_LM, verses)
    assert weights["en"] / weights["fr"] == pytest.approx(0.9 / 0.1 * 2)
    assert language_model.token_shares(verses, weights) == {"en": 0.9, "fr": 0.1}
    with pytest.raises(ValueError, match=r"no training verses for languages \['fr'\]"):
        mixture_weights(TINY_LM, {"en": verses["en"], "fr": []})


def test_causal_lm_tokenizer_pads_on_the_side_asked_and_starts_with_bos(tmp_path):
    from polypeft.data.spm import train_spm

    spm = train_spm(["the cat sat on the mat", "le chat", "a dog and a cat"] * 20, ["en", "fr"], tmp_path / "t.model",
                    vocab_size=30, model_type="char")
    tokenizer = CausalLmTokenizer(spm)
    right = tokenizer(["the cat", "a"])
    assert right["input_ids"][0, 0] == spm.bos_id and right["attention_mask"][1].tolist()[-1] == 0
    tokenizer.padding_side = "left"
    left = tokenizer(["the cat", "a"])
    assert left["attention_mask"][1].tolist()[0] == 0 and left["input_ids"][1, -1] != spm.pad_id
    assert spm.eos_id not in right["input_ids"][0].tolist()  # prompts end where their continuation starts
    assert tokenizer.encode("a", eos=True)[-1] == spm.eos_id


def test_language_identifier_labels_and_round_trips(tmp_path):
    identifier = train_language_identifier({"en": ["the house and the cat", "this is the word"],
                                            "de": ["das haus und die katze", "dies ist das wort"]})
    assert identifier.predict("the word of the house") == "en"
    assert identifier.predict("die katze und das wort") == "de"
    assert identifier.predict(" 12, !") == "none"
    loaded = LanguageIdentifier.load(identifier.save(tmp_path / "lid.json"))
    assert loaded.scores("das haus") == pytest.approx(identifier.scores("das haus"))
    assert identification_accuracy(identifier, {"en": ["the word"], "de": ["das wort"]})["mean"] == 1.0
    with pytest.raises(ValueError, match=r"no texts for languages \['de'\]"):
        identification_accuracy(identifier, {"en": ["the word"], "de": []})


@pytest.mark.slow
def test_language_identifier_is_accurate_on_a_held_out_book(corpus):
    languages = ("en", "fr", "de", "ru")
    identifier = bible_language_identifier(languages, CausalLmSettings().split, verses_per_language=300, corpus=corpus)
    held_out = {code: list(corpus.verses(code, [49]).values()) for code in languages}  # Ephesians, never trained on
    assert identification_accuracy(identifier, held_out)["mean"] >= 0.98
    assert identification_accuracy(identifier, held_out, max_chars=60)["mean"] >= 0.95


def test_prompt_is_the_start_of_the_verse():
    assert prompt_of("one two three four five six seven eight nine ten") == "one two three four"
    assert prompt_of("one two") == "one two"


@pytest.mark.slow
@pytest.mark.parametrize("push", [1.0, -1.0])
def test_lens_push_moves_a_language_along_its_own_direction_on_a_llama(push, tiny_tokenizer):
    tokenizer, model = tiny_tokenizer, tiny_llama()
    result = probe(model, tokenizer, TEXTS, progress=False)
    layer, french = result.layers[-1], [row["fr"] for row in PARALLEL]

    def specific_state() -> torch.Tensor:
        states = torch.cat([pooled[layer] for pooled in iterate_pooled(model, tokenizer, french, [layer], "decoder",
                                                                         "last", 8, 32)])
        return result.project_specific(states, layer)

    before = specific_state()
    train(model, tokenizer, PARALLEL, result, LensTrainSettings(top_k_layers=2, batch_size=4, push_strength=push,
        training=lens_schedule(steps=40, lr=3e-3)), progress=False)
    direction = result.direction("fr", layer)
    moved = ((specific_state() - before) @ direction).mean() / direction.norm() ** 2
    # the paper's sign (+1) moves French away from English along French's own direction; -1 towards English
    assert moved * push > 0.2


def test_lrp2_on_a_llama_shifts_generation_the_same_with_and_without_the_cache(tiny_tokenizer):
    tokenizer, model = tiny_tokenizer, tiny_llama()
    vectors = language_vectors(model, TEXTS, tokenizer, progress=False)
    prompt = tokenizer(["le chat la maison"], return_tensors="pt")
    plain = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with LRP2(model, vectors, lirp_layer=1, lsrp_layer=3) as lrp2:
        lrp2.set_languages("fr")
        cached = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=True)
        uncached = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
        shifted_logits = model(**prompt).logits
    assert torch.equal(cached, uncached)
    assert not torch.allclose(shifted_logits, model(**prompt).logits)  # the hooks changed the forward pass
    assert torch.equal(model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0), plain)


def test_a_rerun_keeps_the_other_parts_of_the_earlier_results(tmp_path):
    from polypeft.experiments.english_centric_lm import earlier_parts

    settings = {"seeds": (0, 1), "progress": True}
    earlier = {"base": {"perplexity": 1}, "lens_lr_choice": {}, "lens_push+1": {"seeds": {}}, "lrp2": {"seeds": {}},
               "timings_seconds": {"base": 1.0}, "goals": {}, "settings": {"seeds": [0, 1], "progress": False}}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    kept = earlier_parts(tmp_path, ["lrp2"], settings)
    assert sorted(kept) == ["base", "lens_lr_choice", "lens_push+1", "timings_seconds"]
    assert earlier_parts(tmp_path, None, settings) == {}
    with pytest.raises(ValueError, match=r"unknown parts \['lsrp'\]"):
        earlier_parts(tmp_path, ["lsrp"], settings)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        earlier_parts(tmp_path / "elsewhere", ["lrp2"], settings)
    with pytest.raises(ValueError, match=r"other settings \(\['seeds'\]\)"):
        earlier_parts(tmp_path, ["lrp2"], {"seeds": (0,), "progress": True})
    # a part measured again may change its own settings, never those of a kept part
    lens_changed = {**settings, "lens_weights": ((1.0, 0.3, 1.0),)}
    assert sorted(earlier_parts(tmp_path, ["lens"], lens_changed)) == ["base", "lrp2", "timings_seconds"]
    with pytest.raises(ValueError, match=r"other settings \(\['lens_weights'\]\)"):
        earlier_parts(tmp_path, ["lrp2"], lens_changed)


def test_lens_rate_and_weights_are_chosen_together_on_the_valid_books(monkeypatch):
    import polypeft.experiments.english_centric_lm as experiment

    trained = []

    def fake_lens(base, tokenizer, rows, settings, push, seed, lr, weights):
        trained.append((push, lr, weights))
        return (lr, weights), {}

    math_log = {"en": 3.0, "fr": 5.0}  # the base model's valid NLL per language
    nll = {(1e-5, (1.0, 1.0, 1.0)): {"en": 3.0, "fr": 4.9},
           (3e-5, (1.0, 1.0, 1.0)): {"en": 3.2, "fr": 4.0},  # best target, but English > 1 % worse: not allowed
           (1e-5, (1.0, 0.3, 1.0)): {"en": 3.0, "fr": 4.8},
           (3e-5, (1.0, 0.3, 1.0)): {"en": 3.005, "fr": 4.5}}
    monkeypatch.setattr(experiment, "lens_variant", fake_lens)
    monkeypatch.setattr(experiment, "lens_probe", lambda *args: ([], None))  # no model: nothing to probe
    monkeypatch.setattr(experiment, "mean_token_nll",
                        lambda model, tokenizer, texts: (math_log if model == "base" else nll[model])[texts[0]])
    settings = experiment.EnglishCentricExperiment(lens_lrs=(1e-5, 3e-5), lens_weights=((1.0, 1.0, 1.0), (1.0, 0.3, 1.0)))
    chosen, summary = experiment.choose_lens_setting("base", None, [], {"en": ["en"], "fr": ["fr"]}, settings)
    assert chosen == (3e-5, (1.0, 0.3, 1.0))
    assert summary["chosen_weights"] == [1.0, 0.3, 1.0] and len(summary["valid_perplexity_by_lr"]) == 4
    assert sorted(trained) == sorted((1.0, lr, w) for lr, w in nll)  # the paper's sign, every candidate once


@pytest.mark.parametrize("weights, message", [(((1.0, 1.0),), "three non-negative"),
                                              (((1.0, -0.5, 1.0),), "three non-negative"),
                                              ((("1", "1", "1"),), "must be a number")])
def test_lens_weights_are_checked_by_name(weights, message):
    from polypeft.core.config import ConfigError
    from polypeft.experiments.english_centric_lm import EnglishCentricExperiment

    with pytest.raises(ConfigError, match=rf"lens_weights.*{message}|{message}.*") as error:
        EnglishCentricExperiment(lens_weights=weights)
    assert "lens_weights" in str(error.value)

"""LMS/FD against LoRA: the intervals, the choice on the valid books, and both testbeds end to end at tiny size."""
from __future__ import annotations

import json

import numpy as np
import pytest

from polypeft.core.config import ConfigError
from polypeft.tasks.confidence import difference_intervals, verdict
from polypeft.experiments.lms_vs_lora.protocol import RunFolderError, choose, open_run
from polypeft.experiments.lms_vs_lora.settings import LanguageModelTestbed, RetrievalTestbed


def outcomes(rate: float, seeds: int = 3, size: int = 600, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return (rng.random((seeds, size)) < rate).astype(int).tolist()


def test_a_method_equal_to_its_reference_differs_by_exactly_zero():
    same = {"fr": outcomes(0.7), "de": outcomes(0.5, seed=1)}
    result = difference_intervals(same, same, replicates=300)
    for key in ("fr", "de", "mean"):
        assert result[key]["difference"] == 0.0, key
    # seeds are resampled apart for each side, so an equal method still has an interval around 0
    assert result["fr"]["low"] <= 0 <= result["fr"]["high"]


def test_a_clear_gain_has_an_interval_above_zero_and_noise_does_not():
    better = difference_intervals({"fr": outcomes(0.9)}, {"fr": outcomes(0.6, seed=2)}, replicates=500)
    assert better["fr"]["low"] > 20 and verdict(better["fr"]) == "better"
    assert better["fr"]["method"] == pytest.approx(90, abs=3) and better["fr"]["reference"] == pytest.approx(60, abs=3)
    noise = difference_intervals({"fr": outcomes(0.7, seed=3)}, {"fr": outcomes(0.7, seed=4)}, replicates=500)
    assert verdict(noise["fr"]) == "within noise"


def test_the_seed_spread_widens_the_interval():
    steady = [[1] * 300 + [0] * 300] * 3
    spread_seeds = [[1] * 240 + [0] * 360, [1] * 300 + [0] * 300, [1] * 360 + [0] * 240]
    reference = {"fr": [[1] * 300 + [0] * 300] * 3}
    narrow = difference_intervals({"fr": steady}, reference, replicates=800)["fr"]
    wide = difference_intervals({"fr": spread_seeds}, reference, replicates=800)["fr"]
    assert wide["high"] - wide["low"] > narrow["high"] - narrow["low"] + 5
    assert wide["method_seed_std"] > 5 and narrow["method_seed_std"] == 0


def test_perplexity_differences_are_relative_and_lower_is_better():
    # every verse: 10 tokens; the method's NLL per token is log(20), the reference's log(40): perplexity halves
    method = {"ru": [[[10 * np.log(20), 10]] * 50] * 2}
    reference = {"ru": [[[10 * np.log(40), 10]] * 50] * 2}
    result = difference_intervals(method, reference, replicates=200, statistic="perplexity")["ru"]
    assert result["difference"] == pytest.approx(-50.0)
    assert result["method"] == pytest.approx(20.0) and result["reference"] == pytest.approx(40.0)
    assert verdict(result, higher_is_better=False) == "better"
    with pytest.raises(ValueError, match="statistic"):
        difference_intervals(method, reference, statistic="chrf")


def test_the_choice_follows_the_metric_direction_and_prefers_fewer_steps_on_a_tie():
    trials = [{"lr": 1e-3, "trained_layers": 2, "valid": {"100": {"lms": 50.0}, "200": {"lms": 55.0}}},
              {"lr": 3e-3, "trained_layers": 4, "valid": {"100": {"lms": 55.0}, "200": {"lms": 40.0}}}]
    assert choose(trials, "lms") == {"lr": 3e-3, "trained_layers": 4, "steps": 100, "valid_score": 55.0}
    assert choose(trials, "lms", higher_is_better=False)["valid_score"] == 40.0
    fd = [{"lr": 1e-3, "trained_layers": 2, "valid": {"100": {"fd_share": 30.0, "fd_ls": 90.0}}},
          {"lr": 3e-3, "trained_layers": 2, "valid": {"100": {"fd_share": 35.0, "fd_ls": 10.0}}}]
    assert choose(fd, "lms_fd")["lr"] == 3e-3, "LMS+FD is chosen by FD-Share, its headline"


def test_settings_refuse_a_test_book_that_chooses_and_bad_values_by_name(tmp_path):
    with pytest.raises(ConfigError, match="test_book=45"):
        RetrievalTestbed(test_book=45)
    with pytest.raises(ConfigError, match="trial_seed"):
        RetrievalTestbed(seeds=[0, 100])
    with pytest.raises(ConfigError, match="English"):
        LanguageModelTestbed(languages=["en", "fr"])
    with pytest.raises(ConfigError, match="max_steps"):
        RetrievalTestbed(max_steps="300")
    with pytest.raises(ConfigError, match="trained_layers"):
        RetrievalTestbed(trained_layers=[5])
    open_run(tmp_path, RetrievalTestbed())
    with pytest.raises(RunFolderError, match="rank"):
        open_run(tmp_path, RetrievalTestbed(rank=4))
    assert json.loads((tmp_path / "settings.json").read_text())["rank"] == 8


# Philemon is the test book and 2 John the valid one: small books keep the run short (any held-out book is a setting).
TINY = dict(test_book=57, valid_books=[63], trained_layers=[1, 2], low_rank_rates=[1e-3],
            full_rates=[3e-5], batch_size=4, max_steps=2, check_every=1, warmup=1, seeds=[0, 1], bootstrap=100)


def check_run(results: dict, report: dict, bed, folder) -> None:
    """What both testbeds must show: every method chosen from its own trials, every seed scored on every test
    example, parameters matched as designed, FD-Share merged equal to its route, the goals reported."""
    settings = bed.settings
    assert set(results["choices"]) == set(settings.methods)
    for method, choice in results["choices"].items():
        assert choice["trained_layers"] in settings.trained_layers and choice["steps"] in (1, 2)
        assert len(list((folder / "trials").glob(f"{method}-*.json"))) == len(settings.trials(method))
    assert len(results["tests"]) == len(settings.methods) * len(settings.seeds)
    counts = report["parameters"]
    assert counts["lora_train"]["trainable"] == counts["lms"]["trainable"] > counts["lora_infer"]["trainable"]
    assert counts["lora_infer"]["trainable"] == counts["lms_fd"]["inference_extra_shared"]
    for variant in ("lora_train", "lora_infer", "lms", "fd_share", "fd_ls", "full"):
        assert set(report["scores"][variant]) == {*settings.languages, bed.english}, variant
    assert set(report["comparisons"]["lms - lora_train"]) == {*settings.languages, bed.english, "mean"}
    assert set(report["goals"]) == {"lms_beats_lora_equal_trainable", "fd_share_keeps_70_percent",
                                    "english_not_worse_than_lora"}
    assert report["fd_share_merged"]["is_plain_model"]
    assert report["fd_share_merged"]["max_abs_output_diff_to_shared_route"] < 1e-4
    assert report["step_time"]["ratio"]["lora_train"] == 1.0


@pytest.mark.slow
def test_the_retrieval_testbed_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    import polypeft as pp
    from polypeft.data.bible import BibleCorpus
    from polypeft.experiments.lms_vs_lora import protocol
    from polypeft.experiments.lms_vs_lora.report import write_report
    from polypeft.experiments.lms_vs_lora.retrieval_data import KJV, testbed_data
    from polypeft.experiments.lms_vs_lora.retrieval_run import RetrievalBed

    settings = RetrievalTestbed(**TINY, languages=["fr", "ko"], valid_queries=6, test_queries=8, train_verses=24, extra_negatives=4)
    encoder, tokenizer = pp.load_encoder("e5-small")
    data = testbed_data(encoder, tokenizer, BibleCorpus(), settings, root=tmp_path / "cache")
    philemon = len(BibleCorpus().verses("en", [57]))
    assert len(data.test.queries) == 8 * 3 and len(data.test.passages) == philemon, "every English verse competes"
    bed = RetrievalBed(encoder, data, settings)
    results = protocol.run_comparison(bed, tmp_path / "run", progress=lambda text: None)
    report = write_report(results, bed, tmp_path / "out")
    check_run(results, report, bed, tmp_path / "run")
    for test in results["tests"]:
        for per_language in test["outcomes"].values():
            assert {lang: len(v) for lang, v in per_language.items()} == {"fr": 8, "ko": 8, KJV: 8}
    assert (tmp_path / "out" / "plot.png").stat().st_size > 10_000
    assert "Goals:" in (tmp_path / "out" / "table.md").read_text()
    # A second run trains nothing: every trial and seed is read back from the folder.
    monkeypatch.setattr(protocol, "train_tower", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = protocol.run_comparison(bed, tmp_path / "run", progress=lambda text: None)
    assert again["choices"] == results["choices"]


@pytest.mark.slow
def test_the_language_model_testbed_runs_end_to_end(tmp_path):
    from polypeft.backbones.causal_lm import CausalLmSettings, lm_schedule
    from polypeft.experiments.lms_vs_lora.lm_bed import LanguageModelBed
    from polypeft.experiments.lms_vs_lora.protocol import run_comparison
    from polypeft.experiments.lms_vs_lora.report import write_report
    from polypeft.tasks.language_model import build_english_centric_lm

    lm = CausalLmSettings(languages=("en", "fr", "ru"), vocab_size=300, spm_sentences=300, hidden_size=32,
                          num_layers=2, num_heads=2, intermediate_size=64, seq_len=32, batch_size=4,
                          training=lm_schedule(steps=4, checkpoint_every=2), max_verses=200, test_books=(57,),
                          valid_books=(63,))
    model, tokenizer, _ = build_english_centric_lm(lm, cache_dir=tmp_path / "lm", progress=False)
    settings = LanguageModelTestbed(**TINY, languages=["fr", "ru"], seq_len=32, valid_verses=5, test_verses=6)
    bed = LanguageModelBed(model, tokenizer, settings)
    results = run_comparison(bed, tmp_path / "run", progress=lambda text: None)
    report = write_report(results, bed, tmp_path / "out")
    check_run(results, report, bed, tmp_path / "run")
    base = report["base"]
    # LMS leaves the English route untrained: English perplexity is the base model's, to the rounding of the scores.
    assert report["scores"]["lms"]["en"] == pytest.approx(base["en"], rel=1e-4)
    assert report["scores"]["lora_train"]["en"] != pytest.approx(base["en"], rel=1e-4)

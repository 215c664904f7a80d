"""The accelerator suite in tiny mode on the CPU: every section runs and reports its figures.

A GPU is lent only now and then; this is what says the suite will work when one is.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from toy_mmt import tiny_bert_folder

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_suite():
    spec = importlib.util.spec_from_file_location("accelerator_suite", BENCH / "accelerator_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One tiny run of every section; it reads the real Bible corpus, so the tests using it are marked slow."""
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("suite")
    base = tiny_bert_folder(tmp_path_factory.mktemp("suite_bert"))  # e5-small's stand-in for the warm start
    suite = load_suite()
    # steps=null: the schedule comes from a probe run's speed, as on a GPU (clamped to 1-2 steps here).
    knobs = ["steps=null", "probe_steps=1", "min_steps=1", "max_steps=2", "eval_verses=1", "max_length=12",
             "max_train_verses=60", f"base={{encoder: {base}, decoder_layers: 1, frozen_layers: 0}}",
             "lms_rank=4"]  # LoRA of rank 7 x 4 = 28 fits the tiny BERT's width of 32
    suite.main(["--out", str(out), "--tiny", "--budget-s", "3000"] + [f"--set={knob}" for knob in knobs])
    return json.loads((out / "suite.json").read_text()), (out / "suite.md").read_text()


@pytest.mark.slow
def test_every_section_reports_its_figures_in_json(tiny_report):
    data, _ = tiny_report
    sections = data["sections"]
    assert list(sections) == ["fd_lrp2", "core_speed", "translation"]
    for name, figures in sections.items():
        assert "error" not in figures and "skipped" not in figures, (name, figures)
    fd = sections["fd_lrp2"]
    assert set(fd["fd_step"]["seconds"]) == {"naive", "lms", "doubled_ce", "fd_before", "fd_after"}
    assert fd["fd_over_lms"] > 0 and fd["lrp2_hook"]["ratio"] > 0
    core = sections["core_speed"]
    assert core["training"]["mixed_ratio"] > 0 and core["merged_inference"]["merged_ratio"] > 0
    assert core["mixed_inference_vs_peft"]["generate_speedup"] > 0
    assert core["route_groups"]["beam_search"]["polypeft_over_plain"] > 0
    translation = sections["translation"]
    assert set(translation["runs"]) == {"naive", "lms_pair", "lms_lang", "lms_fd", "switch", "ls_ffn", "lora"}
    assert translation["seeds"] == [0, 1]
    for run in translation["runs"].values():
        assert set(run["seeds"]) == {"0", "1"}
        for seed in run["seeds"].values():
            for variant, scores in seed["variants"].items():
                assert len(scores["directions"]) == 12  # six languages, into and out of English
                assert scores["test_ce"] > 0 and "bleu" in scores["directions"]["fr-en"]
                assert len(scores["sentences"]["fr-en"]["bleu_statistics"][0]) == 10
    assert set(translation["runs"]["lms_fd"]["seeds"]["1"]["variants"]) == {"fd_share", "fd_ls"}
    against = translation["against_naive"]
    assert set(against) == {"lms_pair", "lms_lang", "lms_fd (fd_share)", "lms_fd (fd_ls)", "switch", "ls_ffn", "lora"}
    for compared in against.values():
        assert compared["seeds"] == [0, 1] and compared["win_ratio"].endswith("/12")
        assert len(compared["directions"]) == 12
        assert compared["mean"]["low"] <= compared["mean"]["difference"] <= compared["mean"]["high"]
    counts = {name: run["parameters"]["training_extra"] for name, run in translation["runs"].items()}
    assert counts["lora"] == counts["lms_pair"] > 0, "LoRA trains as many extra parameters as pair-wise LMS"
    assert translation["model"].startswith("warm start from ")  # the suite trains the warm-start recipe
    assert translation["model"].endswith(", 1-layer decoder (upper), 0 encoder layers frozen")
    assert "suite_bert" in translation["model"]  # the tiny BERT the fixture wrote
    # what was trained is the tiny BERT's warm start (width 32), not the tiny from-scratch preset (about 1 M)
    assert all(run["parameters"]["base"] < 100_000 for run in translation["runs"].values())
    assert translation["schedule"]["probe_seconds_per_step"] > 0 and translation["steps"] in (1, 2)


@pytest.mark.slow
def test_the_markdown_report_shows_every_section(tiny_report):
    data, text = tiny_report
    sections = data["sections"]
    assert f"{sections['fd_lrp2']['fd_step']['over_lms']['fd_after']:.2f}" in text
    assert f"ratio **{sections['fd_lrp2']['lrp2_hook']['ratio']:.3f}**" in text
    assert f"mixed_ratio {sections['core_speed']['training']['mixed_ratio']:.3f}" in text
    runs = sections["translation"]["runs"]
    chrf = [one["variants"]["fd_share"]["averages"]["chrf_all"] for one in runs["lms_fd"]["seeds"].values()]
    assert f"| lms_fd | fd_share |" in text and f"{sum(chrf) / 2:.2f}" in text
    difference = sections["translation"]["against_naive"]["lora"]["mean"]["difference"]
    assert f"| lora | default |" in text and f"{difference:+.2f} [" in text
    assert "| fr-en |" in text and "| en-ko |" in text


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    suite = load_suite()

    def broken(*args, **kwargs):
        raise RuntimeError("no such device")

    monkeypatch.setattr(suite, "core_speed_section", broken)
    monkeypatch.setattr(suite, "fd_lrp2_section", lambda sizes, device: {"fd_step": None})
    monkeypatch.setattr(suite, "fd_lrp2_markdown", lambda figures: ["fd section rendered"])
    suite.main(["--out", str(tmp_path), "--tiny", "--sections", "core_speed,fd_lrp2"])
    data = json.loads((tmp_path / "suite.json").read_text())
    assert data["sections"]["core_speed"]["error"] == "RuntimeError: no such device"
    assert "fd_step" in data["sections"]["fd_lrp2"]
    text = (tmp_path / "suite.md").read_text()
    assert "Not measured: RuntimeError: no such device" in text and "fd section rendered" in text

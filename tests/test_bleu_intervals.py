"""BLEU intervals from each verse's sacreBLEU statistics: summed, they give sacreBLEU's corpus BLEU exactly."""
from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

from polypeft.data.parallel import ParallelExample
from polypeft.tasks.confidence import bleu_intervals, corpus_bleu, difference_intervals, score_intervals
from polypeft.tasks.translation.evaluate import sentences_by_direction

REFERENCES = ["In the beginning was the Word, and the Word was with God.", "Jesus wept.",
              "The light shines in the darkness, and the darkness has not overcome it.",
              "He came to his own, and his own people did not receive him.", "And the Word became flesh.",
              "No one has ever seen God.", "Behold, the Lamb of God, who takes away the sin of the world!",
              "Come and see.", "We have found the Messiah.", "Can anything good come out of Nazareth?"]
HYPOTHESES = ["In the beginning was the Word, and the Word was God.", "Jesus cried.",
              "The light shines in darkness, and darkness did not understand it.",
              "He came to his own people, and they did not receive him.", "The Word was made flesh.",
              "Nobody has seen God.", "Look, the Lamb of God, who takes away sin!", "Come, see.",
              "We found the Messiah.", "Can any good thing come from Nazareth?"]


def examples(source: str) -> list[ParallelExample]:
    return [ParallelExample(source, "en", f"{source} {i}", ref, f"43:{i}") for i, ref in enumerate(REFERENCES)]


def test_summed_sentence_statistics_are_sacrebleus_corpus_bleu():
    rows = sentences_by_direction(examples("fr"), HYPOTHESES)["fr-en"]
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], tokenize="13a").score
    assert corpus_bleu(np.sum(rows["bleu_statistics"], axis=0)) == pytest.approx(expected, abs=1e-9)
    half = np.sum(rows["bleu_statistics"][:5], axis=0)  # any subset: its own corpus BLEU
    assert corpus_bleu(half) == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES[:5], [REFERENCES[:5]]).score, abs=1e-9)


def test_a_resample_without_four_gram_matches_is_smoothed_as_sacrebleu_does():
    hypotheses, references = ["Jesus cried out loudly.", "We found him."], ["Jesus wept.", "We have found the Messiah."]
    rows = sentences_by_direction([ParallelExample("fr", "en", "x", r, f"43:{i}") for i, r in enumerate(references)],
                                  hypotheses)["fr-en"]
    expected = sacrebleu.corpus_bleu(hypotheses, [references], tokenize="13a").score
    assert expected > 0 and corpus_bleu(np.sum(rows["bleu_statistics"], axis=0)) == pytest.approx(expected, abs=1e-9)


def test_intervals_hold_the_point_and_are_empty_only_without_spread():
    sentences = sentences_by_direction(examples("fr") + examples("de"), HYPOTHESES + REFERENCES)
    intervals = bleu_intervals(sentences, "en", replicates=300)
    fr = intervals["directions"]["fr-en"]
    assert fr["low"] < fr["score"] < fr["high"]
    assert intervals["directions"]["de-en"] == {"score": 100.0, "low": 100.0, "high": 100.0}  # perfect every time
    assert intervals["xx_en"]["score"] == pytest.approx((fr["score"] + 100.0) / 2, abs=1e-3)
    assert "en_xx" not in intervals and intervals["all"] == intervals["xx_en"]


def test_paired_bleu_differences_see_a_better_system():
    good = sentences_by_direction(examples("fr"), REFERENCES)["fr-en"]["bleu_statistics"]
    worse = sentences_by_direction(examples("fr"), HYPOTHESES)["fr-en"]["bleu_statistics"]
    found = difference_intervals({"fr": [good]}, {"fr": [worse]}, replicates=300, statistic="bleu")["fr"]
    point = 100.0 - sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
    assert found["difference"] == pytest.approx(point, abs=1e-3) and found["low"] > 0
    with pytest.raises(ValueError, match="statistic='chrf'"):
        score_intervals({"fr": [worse]}, statistic="chrf")


def test_scores_written_before_the_statistics_still_print(capsys):
    from polypeft.cli.main import print_scores

    averages = {"bleu_xx_en": 3.1, "bleu_en_xx": None}
    print_scores({"name": "old", "seed": 0, "variants": {"default": {"averages": averages, "directions": {}}}})
    assert capsys.readouterr().out == "old seed 0 [default] bleu_xx_en 3.1\n"

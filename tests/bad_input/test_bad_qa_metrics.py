"""Issue 16 item 8: QA answers are matched with MLQA-style rules per language, not English-only SQuAD rules."""
from __future__ import annotations

import pytest

from polypeft.tasks.qa import QAExample, exact_match, normalize_answer, squad_scores, token_f1


@pytest.mark.parametrize("lang, prediction, gold", [
    ("zh", "「北京大学」", "北京大学"),
    ("ja", "「東京」", "東京"),
    ("ja", "東京 タワー", "東京タワー"),
    ("fr", "«Paris»", "Paris"),
    ("fr", "la Seine", "Seine"),
    ("fr", "l'Europe", "Europe"),
    ("fr", "l’Europe", "Europe"),
    ("de", "der Rhein", "Rhein"),
    ("de", "„Berlin“", "Berlin"),
    ("es", "el Prado", "Prado"),
    ("ar", "القاهرة،", "القاهرة"),
    ("ar", "القاهرة", "قاهرة"),
    ("en", "The Eiffel Tower!", "eiffel tower"),
])
def test_exact_match_ignores_punctuation_and_articles_of_the_language(lang, prediction, gold):
    assert exact_match(prediction, gold, lang) == 1.0


def test_unspaced_scripts_are_compared_character_by_character():
    assert token_f1("北京大学", "北京大学医学部", "zh") == pytest.approx(2 * 1 * (4 / 7) / (1 + 4 / 7))
    assert token_f1("東京都", "東京", "ja") == pytest.approx(0.8)
    assert normalize_answer("北京abc大学", "zh") == "北 京 abc 大 学"
    assert token_f1("กรุงเทพ", "กรุงเทพมหานคร", "th") > 0


def test_articles_belong_to_their_language():
    assert exact_match("die Mauer", "Mauer", "de") == 1.0
    assert exact_match("die Mauer", "Mauer", "en") == 0.0, "'die' is no English article"
    assert exact_match("the wall", "wall", "de") == 0.0, "'the' is no German article"


def test_squad_scores_use_each_examples_language():
    examples = [QAExample("1", "?", "北京大学医学部", ("北京大学医学部",), (0,), "zh"),
                QAExample("2", "?", "à «Paris»", ("Paris",), (3,), "fr")]
    scores = squad_scores({"1": "北京大学", "2": "«Paris»"}, examples)
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (8 / 11 + 1) / 2)

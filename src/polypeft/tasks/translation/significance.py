"""sacreBLEU's paired bootstrap between two evaluated translation runs, direction by direction.

An eval JSON keeps every hypothesis and its verse id, so two runs scored on the same verses are compared without
decoding again; the references are read back from the Bible corpus by verse id.
"""
from __future__ import annotations

from typing import Mapping, Optional

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from ...data.bible import BibleCorpus, parse_ref

# Half-width of sacreBLEU's two-decimal rounding: a recomputed score further than this from the stored one means
# the references read back are not the ones the run was scored on.
SCORE_TOLERANCE = 0.01


def references_for(sentences: Mapping[str, Mapping], corpus: BibleCorpus) -> dict[str, list[str]]:
    """Per direction ("xx-yy"), the target-language verse of each verse id, in the run's order."""
    references = {}
    for direction, rows in sentences.items():
        target = direction.split("-", 1)[1]
        keys = [parse_ref(ref) for ref in rows["verse_ids"]]
        verses = corpus.verses(target, {key[0] for key in keys})
        missing = [ref for ref, key in zip(rows["verse_ids"], keys) if key not in verses]
        if missing:
            raise ValueError(f"{direction}: verses {missing[:3]} are not in the corpus's {target!r} version")
        references[direction] = [verses[key] for key in keys]
    return references


def paired_bootstrap(candidate: Mapping, baseline: Mapping, variant: str = "default", samples: int = 1000,
                     corpus: Optional[BibleCorpus] = None) -> dict[str, dict]:
    """Per direction: each side's BLEU and chrF, the candidate's difference, and sacreBLEU's paired-bootstrap p-value
    (Koehn 2004; `samples` resamples of the verses, the same on both sides; seed SACREBLEU_SEED, 12345 by default).

    Both runs must have scored the same verses of every direction, in the same order."""
    mine = _sentences(candidate, variant, "candidate")
    theirs = _sentences(baseline, variant, "baseline")
    if sorted(mine) != sorted(theirs):
        raise ValueError(f"the runs score different directions: candidate {sorted(mine)}, baseline {sorted(theirs)}")
    for direction in mine:
        if mine[direction]["verse_ids"] != theirs[direction]["verse_ids"]:
            raise ValueError(f"{direction}: the runs scored different verses; a paired test needs the same ones "
                             "(score both with the same --books and max_eval_verses)")
    references = references_for(mine, corpus or BibleCorpus())
    tests = {}
    for direction, refs in references.items():
        metrics = {"bleu": BLEU(tokenize="13a"), "chrf": CHRF()}
        systems = [("baseline", theirs[direction]["hypotheses"]), ("candidate", mine[direction]["hypotheses"])]
        _, scores = PairedTest(systems, metrics, [refs], test_type="bs", n_samples=samples)()
        tests[direction] = {}
        # sacreBLEU keys its results by each score's own name ("BLEU", "chrF2"), in the order of `metrics`.
        for metric, score_name in zip(metrics, [name for name in scores if name != "System"]):
            base, cand = scores[score_name]
            for side, result, stored in (("baseline", base, baseline), ("candidate", cand, candidate)):
                _check_stored(stored, variant, direction, metric, result.score, side)
            tests[direction][metric] = {"baseline": round(base.score, 2), "candidate": round(cand.score, 2),
                                        "difference": round(cand.score - base.score, 2),
                                        "p_value": round(float(cand.p_value), 4)}
    return tests


def _sentences(result: Mapping, variant: str, side: str) -> dict:
    scores = result.get("variants", {}).get(variant)
    if scores is None:
        raise ValueError(f"the {side} run {result.get('name')!r} has no variant {variant!r}; it has "
                         f"{sorted(result.get('variants', {}))}")
    if "sentences" not in scores:
        raise ValueError(f"the {side} run {result.get('name')!r} keeps no hypotheses (evaluated before they were "
                         "saved): evaluate it again")
    return scores["sentences"]


def _check_stored(result: Mapping, variant: str, direction: str, metric: str, score: float, side: str) -> None:
    stored = result["variants"][variant]["directions"][direction][metric]
    if abs(stored - score) > SCORE_TOLERANCE:
        raise ValueError(f"{direction}: the {side}'s {metric} recomputed from the corpus is {score:.2f}, its eval "
                         f"file says {stored}; the references read back differ from those it was scored on")

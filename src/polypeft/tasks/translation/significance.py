"""Evaluated translation runs against a baseline on the same verses: BLEU differences with intervals (verses and
seeds resampled) and sacreBLEU's paired bootstrap, direction by direction.

An eval JSON keeps every hypothesis, its verse id and its BLEU statistics, so runs scored on the same verses are
compared without decoding again; sacreBLEU's tests read the references back from the Bible corpus by verse id.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from ...data.bible import BibleCorpus, parse_ref
from ..confidence import difference_intervals

# One unit of the two decimals an eval file stores: a recomputed score further than this from the stored one means
# the references read back are not the ones the run was scored on.
SCORE_TOLERANCE = 0.01
# What sacreBLEU names each metric's results ("chrF2": chrF with its default beta 2).
SCORE_NAMES = {"bleu": "BLEU", "chrf": "chrF2"}


def references_for(sentences: Mapping[str, Mapping], corpus: BibleCorpus) -> dict[str, list[str]]:
    """Per direction ("xx-yy"), the target-language verse of each verse id, in the run's order."""
    keys = {direction: [parse_ref(ref) for ref in rows["verse_ids"]] for direction, rows in sentences.items()}
    books: dict[str, set[int]] = {}
    for direction, refs in keys.items():
        books.setdefault(direction.split("-", 1)[1], set()).update(key[0] for key in refs)
    by_target = {target: corpus.verses(target, wanted) for target, wanted in books.items()}  # each language once
    references = {}
    for direction, rows in sentences.items():
        target = direction.split("-", 1)[1]
        verses = by_target[target]
        missing = [ref for ref, key in zip(rows["verse_ids"], keys[direction]) if key not in verses]
        if missing:
            raise ValueError(f"{direction}: verses {missing[:3]} are not in the corpus's {target!r} version")
        references[direction] = [verses[key] for key in keys[direction]]
    return references


def paired_bootstrap(candidate: Mapping, baseline: Mapping, candidate_variant: str = "default",
                     baseline_variant: str = "default", samples: int = 1000,
                     corpus: Optional[BibleCorpus] = None) -> dict[str, dict]:
    """Per direction: each side's BLEU and chrF, the candidate's difference, and sacreBLEU's paired-bootstrap p-value
    (Koehn 2004; `samples` resamples of the verses, the same on both sides; seed SACREBLEU_SEED, 12345 by default).

    Both runs must have scored the same verses of every direction, in the same order."""
    sides = {"candidate": (candidate, candidate_variant), "baseline": (baseline, baseline_variant)}
    mine, theirs = (sentences_of(result, variant, side) for side, (result, variant) in sides.items())
    if sorted(mine) != sorted(theirs):
        raise ValueError(f"{run_name(candidate)} scores directions {sorted(mine)}, the baseline "
                         f"{run_name(baseline)} {sorted(theirs)}: a paired test needs the same ones")
    for direction in mine:
        if mine[direction]["verse_ids"] != theirs[direction]["verse_ids"]:
            raise ValueError(f"{direction}: {run_name(candidate)} and {run_name(baseline)} scored different verses; "
                             "a paired test needs the same ones (score both with the same --books and "
                             "max_eval_verses)")
    references = references_for(mine, corpus or BibleCorpus())
    tests = {}
    for direction, refs in references.items():
        metrics = {"bleu": BLEU(tokenize="13a"), "chrf": CHRF()}
        systems = [("baseline", theirs[direction]["hypotheses"]), ("candidate", mine[direction]["hypotheses"])]
        _, scores = PairedTest(systems, metrics, [refs], test_type="bs", n_samples=samples)()
        tests[direction] = {}
        for metric in metrics:
            base, cand = scores[SCORE_NAMES[metric]]
            for side, result in (("baseline", base), ("candidate", cand)):
                check_stored(*sides[side], direction, metric, result.score)
            tests[direction][metric] = {"baseline": round(base.score, 2), "candidate": round(cand.score, 2),
                                        "difference": round(cand.score - base.score, 2),
                                        "p_value": round(float(cand.p_value), 4)}
    return tests


def run_name(result: Mapping) -> str:
    """How messages name a run: its name and seed."""
    return f"{result.get('name')!r} seed {result.get('seed')}"


def sentences_of(result: Mapping, variant: str, side: str) -> dict:
    """A variant's per-direction verses and hypotheses; refused where the run kept none."""
    scores = result.get("variants", {}).get(variant)
    if scores is None:
        raise ValueError(f"the {side} run {run_name(result)} has no variant {variant!r}; it has "
                         f"{sorted(result.get('variants', {}))}")
    if "sentences" not in scores:
        raise ValueError(f"the {side} run {run_name(result)} keeps no hypotheses (evaluated before they were "
                         "saved): evaluate it again")
    return scores["sentences"]


def check_stored(result: Mapping, variant: str, direction: str, metric: str, score: float) -> None:
    """The score recomputed from the corpus's references must be the one the run stored, else they differ."""
    stored = result["variants"][variant]["directions"][direction][metric]
    if abs(stored - score) > SCORE_TOLERANCE:
        raise ValueError(f"{direction}: {run_name(result)}'s {metric} recomputed from the corpus is {score:.2f}, its "
                         f"eval file says {stored}; the references read back differ from those it was scored on")


def paired_test_corpus() -> Union[BibleCorpus, str]:
    """The corpus sacreBLEU's tests read references from, or why it cannot be read (the intervals need no corpus)."""
    try:
        return BibleCorpus()
    except FileNotFoundError as error:
        return f"no paired tests: {error}"


def paired_against(members: Sequence[tuple[dict, str]], baseline: Sequence[tuple[dict, str]],
                   tests: Union[BibleCorpus, str, None]) -> dict:
    """One run's BLEU difference to the baseline with 95 % intervals (verses and seeds resampled), per direction and
    over all, and with a corpus in `tests` sacreBLEU's paired bootstrap for each seed both ran; else why not."""
    reason = unpaired_reason(members, baseline)
    if reason:
        return {"skipped": reason}
    directions = sorted(baseline[0][0]["variants"][baseline[0][1]]["sentences"])
    statistics = [{d: [r["variants"][v]["sentences"][d]["bleu_statistics"] for r, v in side] for d in directions}
                  for side in (members, baseline)]
    found = difference_intervals(statistics[0], statistics[1], statistic="bleu")
    paired = {"seeds": sorted(r["seed"] for r, _ in members),
              "baseline_seeds": sorted(r["seed"] for r, _ in baseline),
              "bleu_difference": {name: {key: found[name][key] for key in ("difference", "low", "high")}
                                  for name in [*directions, "mean"]},
              "directions_better": sum(found[d]["low"] > 0 for d in directions),
              "directions_worse": sum(found[d]["high"] < 0 for d in directions)}
    if isinstance(tests, str):
        paired["sacrebleu_skipped"] = tests
    elif tests is not None:
        base_by_seed = {r["seed"]: (r, v) for r, v in baseline}
        try:  # a run whose references cannot be read back keeps its intervals; the table says why it has no p
            paired["sacrebleu_paired_bootstrap"] = {
                str(r["seed"]): paired_bootstrap(r, base_by_seed[r["seed"]][0], v, base_by_seed[r["seed"]][1],
                                                 corpus=tests)
                for r, v in sorted(members, key=lambda member: member[0]["seed"]) if r["seed"] in base_by_seed}
        except ValueError as error:
            paired["sacrebleu_skipped"] = f"no paired tests for {run_name(members[0][0])}: {error}"
    return paired


def unpaired_reason(members: Sequence[tuple[dict, str]], baseline: Sequence[tuple[dict, str]]) -> Optional[str]:
    """Why the run cannot be paired with the baseline verse by verse (None: it can)."""
    for result, variant in [*members, *baseline]:
        if not result["variants"][variant].get("sentences"):
            return f"{run_name(result)} keeps no per-verse hypotheses (evaluated before they were saved)"
    for side in (members, baseline):
        seeds = [result["seed"] for result, _ in side]
        if len(set(seeds)) < len(seeds):
            return f"{run_name(side[0][0])}: a seed is given twice ({sorted(seeds)})"
    reference, variant = baseline[0]
    verses = {d: rows["verse_ids"] for d, rows in reference["variants"][variant]["sentences"].items()}
    for result, variant in [*members, *baseline]:
        sentences = result["variants"][variant]["sentences"]
        if sorted(sentences) != sorted(verses):
            return f"{run_name(result)} scores directions {sorted(sentences)}, {run_name(reference)} {sorted(verses)}"
        for direction, ids in verses.items():
            if sentences[direction]["verse_ids"] != ids:
                return f"{run_name(result)} scored other verses than {run_name(reference)} in {direction}"
    return None


def paired_markdown(comparison: Mapping) -> list[str]:
    """The paired table: per direction the BLEU difference to the baseline with its 95 % interval, and sacreBLEU's
    p-value for each seed (s0, s1, ...); a row that could not be paired says why."""
    paired = {label: row["paired"] for label, row in comparison["rows"].items() if row.get("paired")}
    if not paired:
        return []
    directions = next((sorted(set(found["bleu_difference"]) - {"mean"}) for found in paired.values()
                       if "bleu_difference" in found), [])
    tested = any("sacrebleu_paired_bootstrap" in found for found in paired.values())
    lines = ["", f"BLEU difference to {comparison['baseline']}, paired on the same verses: 95 % interval (verses and "
             "seeds resampled)" + ("; p: sacreBLEU's paired bootstrap for each seed (s0: seed 0)" if tested else "")
             + ":", "", "| run | " + " | ".join([*directions, "mean", "better / worse"]) + " |",
             "|---|" + "---|" * (len(directions) + 2)]
    for label, found in paired.items():
        if "skipped" in found:
            lines.append(f"| {label} | not paired: {found['skipped']} |")
            continue
        tests = found.get("sacrebleu_paired_bootstrap", {})
        cells = []
        for name in [*directions, "mean"]:
            value = found["bleu_difference"][name]
            cell = f"{value['difference']:+.2f} [{value['low']:+.2f}, {value['high']:+.2f}]"
            if name != "mean" and tests:
                cell += " p " + ", ".join(f"s{seed} {test[name]['bleu']['p_value']:.3f}" for seed, test in tests.items())
            cells.append(cell)
        cells.append(f"{found['directions_better']} / {found['directions_worse']}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = sorted({found["sacrebleu_skipped"] for found in paired.values() if "sacrebleu_skipped" in found})
    return lines + [f"\n{note}" for note in notes]

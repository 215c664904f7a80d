"""FLARE against its baselines on Bible verse classification with a real multilingual encoder (e5-small).

Cross-lingual transfer: English task LoRA (stage 1), then each recipe's stage 2 on target-language verses.
Usage: python bench/flare_bible.py [--targets fr --seeds 0 1 --layers 4 --stage1-steps 60 --stage2-steps 60]
translate_test, and `--english-at-test translated`, need `--translation-run` (a `polypeft mmt` run folder); with one,
the test verses come from the run's test books alone (it trained on every other book but its valid books); so do they
with `--test-books`, for recipes that read no translation (scored on the same verses before the run exists).
`--translations-from` reuses the test verses' translations an earlier result file of the same translation run
recorded (they do not change with the seed), so a further seed needs no translation model on the machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from polypeft.core.fileio import write_json
from polypeft.experiments.flare_recipe import (READS_ENGLISH_AT_TEST, STAGE1_ONLY, TrainedRecipe, check_english_at_test,
                                               flare_stage, result_name, run_recipe, train_english_lora)
from polypeft.experiments.x_mixup import XMixupSettings
from polypeft.methods.flare.layer import FLAREConfig
from polypeft.backbones.e5 import QUERY_PREFIX, load_encoder
from polypeft.experiments.bible_eval import SECTION_NAMES, canon_section, verse_classification
from polypeft.tasks.classification import classification_model
from polypeft.tasks.translation.mt_encoder import translation_encoder
from polypeft.tasks.translation.translator import Translator

STAGE2_RECIPES = ("translate_train", "input_fusion", "flare_add_relu", "flare_add", "flare_mul",
                  "flare_cross_attention", "flare_mt", "x_mixup", "translate_test")
NEEDS_TRANSLATION_RUN = ("translate_test",)  # left out of the default list: it needs --translation-run


def method_of(recipe: str) -> str:
    """The run_recipe recipe of a bench recipe name (flare_<fusion> is "flare")."""
    return "flare" if recipe.startswith("flare_") and recipe != "flare_mt" else recipe


def load_rows(target: str, per_class_train: int, per_class_test: int, seed: int = 0,
              test_books: Optional[Sequence[int]] = None, corpus=None) -> tuple[list, list]:
    """The encoder issue's canon-section task (`verse_classification`), verse-disjoint and stratified:
    rows {en, target, label}, about `per_class_train` / `per_class_test` verses per section. With `test_books` (a
    translation run's, which it never trained on) the test verses come from those books alone, training from the rest."""
    total = per_class_train + per_class_test
    data = verse_classification(["en", target], valid_fraction=0.0, test_fraction=per_class_test / total,
                                seed=seed, max_verses_per_section=total, corpus=corpus, exclude_books=test_books or ())
    parts = []
    for part in ("train", "test"):
        english, other = data[part]["en"].examples, data[part][target].examples
        parts.append([{"en": e.text, "target": t.text, "label": e.label} for e, t in zip(english, other)])
    if test_books:
        parts[1] = book_rows(target, test_books, per_class_test, seed, corpus)
    random.Random(seed).shuffle(parts[0])
    return parts[0], parts[1]


def book_rows(target: str, books: Sequence[int], per_class: int, seed: int, corpus=None) -> list:
    """Rows {en, target, label} of `books` alone, at most `per_class` verses per canon section (chosen with `seed`):
    the test verses a translation run never trained on."""
    from polypeft.data.bible import BibleCorpus

    by_label: dict[int, list] = defaultdict(list)
    for row in (corpus or BibleCorpus()).parallel(["en", target], books=sorted(books)):
        by_label[SECTION_NAMES.index(canon_section(int(row["ref"].split(":")[0])))].append(row)
    generator, rows = random.Random(seed), []
    for label in sorted(by_label):
        section = list(by_label[label])
        generator.shuffle(section)
        rows += [{"en": r["en"], "target": r[target], "label": label} for r in section[:per_class]]
    return rows


def translation_test_books(translation_run: Optional[str], targets: Sequence[str],
                           test_books: Optional[Sequence[int]] = None) -> Optional[list[int]]:
    """The books the test verses come from: the translation run's test books (the only ones it never trained on),
    else `test_books` (--test-books: a run's gold-English recipes scored on the verses a later run with a translation
    model will score); None without either. Both given must agree. Books of one canon section are refused by value,
    since an accuracy over one label compares nothing."""
    if not translation_run and not test_books:
        return None
    books = sorted(test_books or ())
    if translation_run:
        from polypeft.tasks.translation.translator import translation_run_recipe

        held_out = sorted(translation_run_recipe(translation_run, "--translation-run", targets,
                                                 built=False).test_books)
        if test_books and books != held_out:
            raise ValueError(f"--test-books={books} differs from the test_books={held_out} of --translation-run="
                             f"{translation_run!r}: leave --test-books out, or give the run's")
        books = held_out
    setting = (f"--translation-run={translation_run!r} holds out test_books={books}" if translation_run
               else f"--test-books={books}")
    sections = sorted({canon_section(book) for book in books})
    if len(sections) < 2:
        raise ValueError(f"{setting}, one canon section ({sections}); the test verses come from these books, and one "
                         "section gives every test verse the same label: choose books that span two or more canon "
                         "sections (e.g. test_books: [1, 19, 23, 43, 66])")
    return books


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return dict(tokenizer([QUERY_PREFIX + t for t in texts], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt"))


def make_batches(tokenizer, rows: list, size: int, max_length: int) -> tuple[list, list]:
    english, parallel = [], []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        labels = torch.tensor([r["label"] for r in chunk])
        source = encode(tokenizer, [r["en"] for r in chunk], max_length)
        target = encode(tokenizer, [r["target"] for r in chunk], max_length)
        english.append({**source, "labels": labels})
        parallel.append(({**target, "labels": labels}, source))
    return english, parallel


def mt_source_batches(parallel: list, rows: list, size: int, mt_tokenizer, max_length: int) -> list:
    """The same (target, source) pairs with the English side tokenised for the translation model's encoder."""
    pairs = []
    for (target, _), start in zip(parallel, range(0, len(rows), size)):
        english = [r["en"] for r in rows[start:start + size]]
        pairs.append((target, mt_tokenizer(english, max_length=max_length)))
    return pairs


def truncated_e5(layers: int):
    encoder, tokenizer = load_encoder("e5-small")
    encoder.encoder.layer = encoder.encoder.layer[:layers]
    encoder.config.num_hidden_layers = layers
    return encoder, tokenizer


def evaluate(trained: TrainedRecipe, batches: list) -> tuple[float, float, list[int]]:
    """Accuracy, seconds spent in the forward passes, and each test verse's 0/1 outcome in order (what the
    report's verse-resampled intervals and paired differences read)."""
    outcomes: list[int] = []
    elapsed = 0.0
    trained.model.eval()
    with torch.no_grad():
        for target, source in batches:
            labels = target["labels"]
            inputs = {k: v for k, v in target.items() if k != "labels"}
            start = time.perf_counter()
            logits = trained(inputs, source).logits
            elapsed += time.perf_counter() - start
            outcomes += (logits.argmax(-1) == labels).int().tolist()
    return sum(outcomes) / len(outcomes), elapsed, outcomes


def save(args: argparse.Namespace, results: dict, translations: Optional[dict] = None) -> None:
    """Write the settings, every finished result and the test verses' machine translations (with their BLEU
    against the gold English), so a run stopped between languages keeps what it measured."""
    if args.json:
        write_json(args.json, {"settings": vars(args), "results": results, "translations": translations or {}})


def translation_record(test_rows: list, translated_rows: list) -> dict:
    """The machine-translated English of the test verses beside the gold, and their sacreBLEU (13a) and chrF."""
    import sacrebleu

    hypotheses, references = [r["en"] for r in translated_rows], [r["en"] for r in test_rows]
    return {"bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
            "verses": [{"source": r["target"], "translation": h, "gold": g}
                       for r, h, g in zip(test_rows, hypotheses, references)]}


def translation_build(translation_run: Optional[str]) -> Optional[str]:
    """The hash of the settings that shape a translation recipe file's model, and its seed, so recorded translations
    are reused only from the same model; None for a run folder."""
    if not translation_run or Path(translation_run).suffix not in (".yaml", ".yml"):
        return None
    from polypeft.tasks.translation.cached import recipe_key
    from polypeft.tasks.translation.run import MMTRecipe

    recipe = MMTRecipe.from_yaml(translation_run)
    return f"{recipe_key(recipe)}-seed{recipe.seed}"


class RecordedTranslations:
    """The test verses' English as an earlier result file recorded it, checked verse by verse, for seeds run where
    the translation model is not built (its translations of these verses do not depend on the classifier's seed)."""

    def __init__(self, path: str, translation_run: Optional[str]):
        with open(path, encoding="utf-8") as handle:
            earlier = json.load(handle)
        if not isinstance(earlier, dict) or not isinstance(earlier.get("settings"), dict):
            raise ValueError(f"--translations-from {path!r} is not a result file of this bench (--json)")
        recorded = {key: earlier["settings"].get(key) for key in ("translation_run", "translation_build")}
        wanted = {"translation_run": translation_run, "translation_build": translation_build(translation_run)}
        both_builds_known = None not in (recorded["translation_build"], wanted["translation_build"])
        if recorded["translation_run"] != translation_run or (both_builds_known and recorded != wanted):
            raise ValueError(f"--translations-from {path!r} was translated by {recorded}, not by {wanted}")
        if recorded["translation_build"] is None and wanted["translation_build"] is not None:
            print(f"note: {path} records no translation_build (written before it was kept); its translations are "
                  f"reused on the recipe path {translation_run!r} alone", flush=True)
        self.path, self.records = path, earlier.get("translations", {})

    def __call__(self, sources: Sequence[str], target: str) -> list[str]:
        verses = self.records.get(target, {}).get("verses")
        if verses is None:
            raise ValueError(f"--translations-from {self.path!r} holds no translations from {target!r}; it holds "
                             f"{sorted(self.records)}")
        if [verse["source"] for verse in verses] != list(sources):
            raise ValueError(f"--translations-from {self.path!r}: its {target!r} verses are not this run's test "
                             "verses (other --test-books or --per-class-test)")
        return [verse["translation"] for verse in verses]


def progress_line(target: str, seed: int, name: str, accuracy: float, timing: dict, seconds: float) -> str:
    """One scored recipe in the log: its step time where it trains a second stage (zero-shot and translate-test
    reuse the English model and train nothing)."""
    step = f"step {timing['train_step_s']:.3f}s" if "train_step_s" in timing else "no training"
    return f"{target} seed {seed} {name} acc {accuracy:.3f} {step} inference {seconds:.2f}s"


def english_at_test_of(recipe: str, args: argparse.Namespace) -> list[str]:
    """Each English side the recipe is scored with: none for a recipe that reads no English at test."""
    if method_of(recipe) not in READS_ENGLISH_AT_TEST:
        return ["gold"]
    return ["translated"] if recipe == "translate_test" else args.english_at_test


def test_sets(test_rows: list, tokenizer, mt, target: str, translator, args: argparse.Namespace) -> dict:
    """Test batches (and FLARE-MT's) per English side at test: the gold verse, or its machine translation."""
    sides, seconds = {"gold": test_rows}, {"gold": None}
    if translator is not None:
        start = time.perf_counter()
        translations = translator([r["target"] for r in test_rows], target)
        # recorded translations took no time here: their cost is the earlier file's
        seconds["translated"] = None if isinstance(translator, RecordedTranslations) else time.perf_counter() - start
        sides["translated"] = [{**r, "en": text} for r, text in zip(test_rows, translations)]
    sets = {}
    for side, rows in sides.items():
        _, batches = make_batches(tokenizer, rows, 32, args.max_length)
        mt_batches = mt_source_batches(batches, rows, 32, mt[1], args.max_length) if mt is not None else None
        sets[side] = (batches, mt_batches, seconds[side])
    if translator is not None:
        sets["record"] = translation_record(test_rows, sides["translated"])
    return sets


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    encoder, tokenizer = truncated_e5(args.layers)
    label_names = list(SECTION_NAMES)
    translates = any("translated" in english_at_test_of(recipe, args) for recipe in args.recipes)
    translator = None
    if translates:
        translator = (RecordedTranslations(args.translations_from, args.translation_run) if args.translations_from
                      else Translator(args.translation_run, setting="--translation-run"))
    args.test_books = translation_test_books(args.translation_run, args.targets, args.test_books)  # saved
    args.translation_build = translation_build(args.translation_run)  # saved: which model translated
    if args.test_books:
        print(f"test verses from books {args.test_books} alone (a translation run's test books, which it never "
              "trained on); training verses from the other books", flush=True)
    results: dict = {}
    translations: dict = {}
    for target in args.targets:
        # polypeft's own translation encoder reads the English verse tagged for translation into `target`
        mt = translation_encoder(args.mt_run, target) if args.mt_run else None
        train_rows, test_rows = load_rows(target, args.per_class_train, args.per_class_test,
                                          test_books=args.test_books)
        english, parallel = make_batches(tokenizer, train_rows, args.batch, args.max_length)
        tests = test_sets(test_rows, tokenizer, mt, target, translator, args)
        test_batches = tests["gold"][0]  # zero-shot reads the target verses only
        if "record" in tests:
            translations[target] = tests.pop("record")
            seconds = tests["translated"][2]
            took = "recorded earlier" if seconds is None else f"{seconds:.0f} s"
            print(f"{target}->en test verses: BLEU {translations[target]['bleu']}, chrF {translations[target]['chrf']} "
                  f"({took})", flush=True)
        if mt is not None:
            mt_parallel = mt_source_batches(parallel, train_rows, args.batch, mt[1], args.max_length)
        for seed in args.seeds:
            torch.manual_seed(seed)
            base = classification_model(copy.deepcopy(encoder), label_names)
            lora = FLAREConfig(rank=args.rank, alpha=2 * args.rank, fusion=None)
            stage1 = flare_stage(steps=args.stage1_steps, lr=args.lr, seed=seed, progress=False)
            merged = train_english_lora(base, english, lora, stage1)
            accuracy, seconds, outcomes = evaluate(TrainedRecipe("zero_shot", merged), test_batches)
            results.setdefault(target, {}).setdefault("zero_shot", []).append(
                {"seed": seed, "accuracy": accuracy, "inference_s": seconds, "correct": outcomes})
            print(f"{target} seed {seed} zero_shot acc {accuracy:.3f}", flush=True)
            for recipe in args.recipes:
                method = method_of(recipe)
                fusion = recipe[len("flare_"):] if method == "flare" else None
                config = FLAREConfig(rank=args.rank, alpha=2 * args.rank, fusion=fusion or "add_relu",
                                     source_layer_offset=1)
                # FLARE-MT reads the encoder of polypeft's own translation model (--mt-run); without one,
                # a frozen copy of the untuned e5 stands in (it exercises the path, it translates nothing).
                mt_encoder, train_pairs = None, parallel
                if recipe == "flare_mt":
                    mt_encoder = mt[0] if mt is not None else copy.deepcopy(encoder).eval()
                    if mt is not None:
                        train_pairs = mt_parallel
                stage2 = flare_stage(steps=args.stage2_steps, lr=args.lr, seed=seed, progress=False)
                mixup = XMixupSettings(layer=args.mixup_layer, ratio=args.mixup_ratio)
                start = time.perf_counter()
                trained = run_recipe(copy.deepcopy(merged), method, [], train_pairs, lora, config, stage2=stage2,
                                     mt_encoder=mt_encoder, pad_token_id=tokenizer.pad_token_id, skip_stage1=True,
                                     x_mixup=mixup)
                timing = {}
                if method not in STAGE1_ONLY:
                    timing["train_step_s"] = (time.perf_counter() - start) / args.stage2_steps
                for side in english_at_test_of(recipe, args):
                    batches, mt_batches, translation_s = tests[side]
                    scored = mt_batches if recipe == "flare_mt" and mt else batches
                    accuracy, seconds, outcomes = evaluate(trained, scored)
                    name = result_name(method, side, shown_as=recipe)
                    # inference_s is the classifier's forward passes; translating the test set once is apart
                    results[target].setdefault(name, []).append(
                        {"seed": seed, "accuracy": accuracy, **timing, "inference_s": seconds,
                         **({"translation_s": translation_s} if translation_s is not None else {}), "correct": outcomes})
                    print(progress_line(target, seed, name, accuracy, timing, seconds), flush=True)
        save(args, results, translations)
    return results


def mean_of(runs: list, key: str) -> float:
    return statistics.mean(run[key] for run in runs)


def summarize(results: dict) -> str:
    lines = ["| target | recipe | accuracy mean (± spread) | train step / LoRA | inference / LoRA |",
             "|---|---|---|---|---|"]
    for target, recipes in results.items():
        lora = recipes.get("translate_train")  # the ratios' reference; a run without it prints none
        for recipe, runs in recipes.items():
            accuracies = [r["accuracy"] for r in runs]
            spread = (max(accuracies) - min(accuracies)) / 2
            step = inference = "-"
            if lora:
                if "train_step_s" in runs[0]:
                    step = f"{mean_of(runs, 'train_step_s') / mean_of(lora, 'train_step_s'):.2f}"
                inference = f"{mean_of(runs, 'inference_s') / mean_of(lora, 'inference_s'):.2f}"
            lines.append(f"| {target} | {recipe} | {statistics.mean(accuracies):.3f} (± {spread:.3f}) | {step} | "
                         f"{inference} |")
    return "\n".join(lines)


def check_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every recipe's English side at test and the mixup settings, refused by value before anything loads."""
    try:
        XMixupSettings(layer=args.mixup_layer, ratio=args.mixup_ratio)
        for recipe in args.recipes:
            for side in english_at_test_of(recipe, args):
                check_english_at_test(method_of(recipe), side, args.translation_run)
        translation_test_books(args.translation_run, args.targets, args.test_books)
        if args.translations_from:
            if not any("translated" in english_at_test_of(recipe, args) for recipe in args.recipes):
                raise ValueError(f"--translations-from {args.translations_from!r}: no recipe reads translated "
                                 "English (add translate_test, or --english-at-test translated)")
            RecordedTranslations(args.translations_from, args.translation_run)
    except (ValueError, OSError) as error:
        parser.error(str(error))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["fr"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--layers", type=int, default=4, help="keep the first N of e5-small's 12 blocks")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--per-class-train", type=int, default=64)
    parser.add_argument("--per-class-test", type=int, default=40)
    parser.add_argument("--stage1-steps", type=int, default=60)
    parser.add_argument("--stage2-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recipes", nargs="+", choices=STAGE2_RECIPES,
                        default=[r for r in STAGE2_RECIPES if r not in NEEDS_TRANSLATION_RUN],
                        help="stage-2 recipes to run (translate_train is the reference of the time ratios)")
    parser.add_argument("--mt-run", default=None,
                        help="a trained translation run (e.g. runs/demo/naive-seed0) whose encoder FLARE-MT reads")
    parser.add_argument("--translation-run", default=None,
                        help="a trained translation run (its folder, or a recipe `polypeft mmt build` trained) that "
                             "translates the test verses into English (translate_test, --english-at-test translated)")
    parser.add_argument("--translations-from", default=None,
                        help="an earlier result file (--json) of the same --translation-run whose recorded test-verse "
                             "translations are reused instead of translating again")
    parser.add_argument("--test-books", nargs="+", type=int, default=None,
                        help="score on verses of these books alone, training on the others (a --translation-run's "
                             "test books by default)")
    parser.add_argument("--english-at-test", nargs="+", choices=("gold", "translated"), default=["gold"],
                        help="the English side at test of the recipes that read one: gold (an upper bound) and/or the "
                             "translation by --translation-run; each is scored and named in the results")
    parser.add_argument("--mixup-layer", type=int, default=None, help="x_mixup: the block after which it mixes")
    parser.add_argument("--mixup-ratio", type=float, default=0.5, help="x_mixup: the share of English mixed in")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    check_settings(parser, args)
    results = run(args)
    print(summarize(results))


if __name__ == "__main__":
    main()

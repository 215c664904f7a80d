"""LENS and LRP2 in their papers' own setting: an English-centric causal LM whose other languages lag, measured
per language by held-out perplexity and by how often greedy continuations of target-language prompts stay in it.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import nn

from ..backbones.causal_lm import CausalLmSettings, CausalLmTokenizer
from ..core.config import ConfigError, PositiveInt, TypedConfig
from ..core.fileio import atomic_write, write_json
from ..data.bible import BibleCorpus
from ..interventions import lens
from ..interventions.lrp2 import LRP2, language_vectors
from ..interventions.search import lrp2_scorer, search_layers
from ..tasks.language_id import LanguageIdentifier, bible_language_identifier, identification_accuracy
from ..tasks.language_model import build_english_centric_lm, continue_prompts, mean_token_nll, text_nll

__all__ = ["EnglishCentricExperiment", "measure", "measured_variants", "plot_results", "prompt_of",
           "run_english_centric_lm"]

# A per-language context around a measurement: LRP2's hooks with that language set, or nothing.
LanguageContext = Callable[[str], ContextManager]


@dataclass(frozen=True)
class EnglishCentricExperiment(TypedConfig):
    """What is measured and how much of it. Test verses come from John (never trained on), layer choices from
    the valid books 45-49, LENS pairs and LRP2 vectors from training books."""

    lm: CausalLmSettings = field(default_factory=CausalLmSettings)
    eval_verses: PositiveInt = 400  # John verses per language for perplexity (evenly spaced)
    prompts: PositiveInt = 120  # John verses per language whose start is continued
    new_tokens: PositiveInt = 24
    identifier_verses: PositiveInt = 2000  # per language, from the training books
    seeds: tuple[int, ...] = (0, 1)
    lens_pairs: PositiveInt = 300  # parallel training verses: the probe and the training pairs
    lens_top_layers: PositiveInt = 2
    lens_steps: PositiveInt = 150
    lens_lrs: tuple[float, ...] = (1e-5, 3e-5, 1e-4)  # chosen on the valid books (paper's sign, first seed)
    # (align, separate, retain) loss weights, chosen with the learning rate; the paper's are 1, 1, 1
    lens_weights: tuple[tuple[float, ...], ...] = ((1.0, 1.0, 1.0),)
    lens_batch_size: PositiveInt = 8
    lens_push_strengths: tuple[float, ...] = (1.0, -1.0)  # +1: the paper's sign; -1: reversed
    lrp2_sentences: PositiveInt = 300  # training verses per language for the language vectors
    lrp2_valid_verses: PositiveInt = 120  # valid-book verses per language that choose LRP2's layers
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for weights in self.lens_weights:
            if len(weights) != 3 or any(weight < 0 for weight in weights):
                raise ConfigError(f"EnglishCentricExperiment.lens_weights has {list(weights)}; each must be three "
                                  "non-negative numbers (align, separate, retain)")


def prompt_of(verse: str) -> str:
    """The start of a verse to continue: its first 40 % of words, at least three."""
    words = verse.split()
    return " ".join(words[:max(3, int(0.4 * len(words)))])


def evenly_spaced(rows: Sequence[dict], count: int) -> list[dict]:
    if count < 1 or not rows:
        raise ValueError(f"evenly_spaced: {count} of {len(rows)} rows; need count >= 1 and at least one row")
    step = max(1, len(rows) // count)
    return list(rows[::step])[:count]


def measure(model: nn.Module, tokenizer: CausalLmTokenizer, identifier: LanguageIdentifier,
            eval_texts: dict[str, list[str]], prompts: dict[str, list[str]], new_tokens: int,
            context: Optional[LanguageContext] = None) -> dict:
    """Per language: perplexity of the eval texts, and the shares of continuations labelled as the prompt's
    language (fidelity) and as English (drift); three continuations kept to read."""
    context = context or (lambda language: nullcontext())
    result: dict = {"perplexity": {}, "fidelity": {}, "drift_to_en": {}, "examples": {}}
    for language in eval_texts:
        with context(language):
            nll = mean_token_nll(model, tokenizer, eval_texts[language])
            continuations = continue_prompts(model, tokenizer, prompts[language], new_tokens)
        labels = [identifier.predict(text) for text in continuations]
        result["perplexity"][language] = round(math.exp(nll), 3)
        result["fidelity"][language] = round(sum(label == language for label in labels) / len(labels), 4)
        result["drift_to_en"][language] = round(sum(label == "en" for label in labels) / len(labels), 4)
        result["examples"][language] = [{"prompt": prompt, "continuation": text, "label": label}
                                        for prompt, text, label in list(zip(prompts[language], continuations, labels))[:3]]
    return result


def mean_over_seeds(per_seed: Sequence[dict]) -> dict:
    """The mean of each per-language number over seeds (examples are not averaged)."""
    keys = ("perplexity", "fidelity", "drift_to_en")
    return {key: {language: round(sum(run[key][language] for run in per_seed) / len(per_seed), 4)
                  for language in per_seed[0][key]} for key in keys}


def lens_probe(base: nn.Module, tokenizer: CausalLmTokenizer, train_rows: list[dict], settings: EnglishCentricExperiment,
               seed: int) -> tuple[list[dict], lens.LensProbe]:
    """The seeded sample of parallel verses LENS trains on, and the base model's subspaces probed on it (the
    same for every push, rate and weight of that seed, so it is probed once)."""
    rows = random.Random(f"lens/{seed}").sample(train_rows, settings.lens_pairs)
    probe = lens.probe(base, tokenizer, {code: [row[code] for row in rows] for code in settings.lm.languages},
                       pivot="en", progress=False)
    return rows, probe


def lens_variant(base: nn.Module, tokenizer: CausalLmTokenizer, probed: tuple[list[dict], lens.LensProbe],
                 settings: EnglishCentricExperiment, push: float, seed: int, lr: float,
                 weights: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[nn.Module, dict]:
    """A copy of the base model with its top layers trained by LENS on the probed sample (`lens_probe`)."""
    rows, probe = probed
    model = copy.deepcopy(base)
    lens_settings = lens.LensTrainSettings(top_k_layers=settings.lens_top_layers, batch_size=settings.lens_batch_size,
                                           push_strength=push, seed=seed, weights=list(weights),
                                           training=lens.lens_schedule(steps=settings.lens_steps, lr=lr))
    result = lens.train(model, tokenizer, rows, probe, lens_settings, progress=settings.progress)
    first, last = result.history[0], result.history[-1]
    return model.eval(), {"first_step": first, "last_step": last, "pooling": probe.pooling, "lr": lr,
                          "weights": list(weights)}


def choose_lens_setting(base: nn.Module, tokenizer: CausalLmTokenizer, train_rows: list[dict],
                        valid_texts: dict[str, list[str]], settings: EnglishCentricExperiment
                        ) -> tuple[tuple[float, tuple[float, ...]], dict]:
    """The (learning rate, loss weights), among `lens_lrs` x `lens_weights`, whose LENS model (paper's sign, first
    seed) has the lowest mean non-English valid-book perplexity while English stays within 1 % of the base;
    the smallest rate with the first weights if none does."""
    def valid_perplexity(model: nn.Module) -> dict[str, float]:
        return {code: round(math.exp(mean_token_nll(model, tokenizer, texts)), 3) for code, texts in valid_texts.items()}

    def name(candidate: tuple[float, tuple[float, ...]]) -> str:  # the lr alone when the weights are not searched
        lr, weights = candidate
        return str(lr) if len(settings.lens_weights) == 1 else f"lr={lr} weights={','.join(map(str, weights))}"

    base_perplexity = valid_perplexity(base)
    candidates = [(lr, tuple(weights)) for weights in settings.lens_weights for lr in settings.lens_lrs]
    probed = lens_probe(base, tokenizer, train_rows, settings, settings.seeds[0])
    tried = {}
    for lr, weights in candidates:
        model, _ = lens_variant(base, tokenizer, probed, settings, 1.0, settings.seeds[0], lr, weights)
        tried[name((lr, weights))] = valid_perplexity(model)
    targets = [code for code in valid_texts if code != "en"]
    within = [c for c in candidates if tried[name(c)]["en"] <= 1.01 * base_perplexity["en"]]
    mean_target = lambda c: sum(tried[name(c)][code] for code in targets) / len(targets)  # noqa: E731
    chosen = min(within, key=mean_target) if within else (min(settings.lens_lrs), tuple(settings.lens_weights[0]))
    return chosen, {"chosen": chosen[0], "chosen_weights": list(chosen[1]), "base_valid_perplexity": base_perplexity,
                    "valid_perplexity_by_lr": tried}


def lrp2_variant(model: nn.Module, tokenizer: CausalLmTokenizer, train_rows: list[dict], valid_texts: dict[str, list[str]],
                 settings: EnglishCentricExperiment, seed: int) -> tuple[LanguageContext, dict]:
    """Language vectors from a seeded sample of training verses; per language the (LIRP, LSRP) pair with the
    lowest valid-book perplexity. Returns the per-language hook context and the search summary."""
    languages = list(settings.lm.languages)
    rows = random.Random(f"lrp2/{seed}").sample(train_rows, settings.lrp2_sentences)
    vectors = language_vectors(model, {code: [row[code] for row in rows] for code in languages}, tokenizer,
                               pooling="mean", progress=False)
    targets = [code for code in languages if code != "en"]
    # Per-verse NLLs: the search keeps a pair only if it beats no LRP2 by more than the validation noise.
    evaluate = lambda language, hooks: text_nll(model, tokenizer, valid_texts[language])  # noqa: E731
    layers = list(range(settings.lm.num_layers + 1))
    search = search_layers(lrp2_scorer(model, vectors, evaluate), targets, layers[:-1], layers[1:], pairs=True,
                           lirp_only=False, higher_is_better=False, progress=settings.progress)
    best = search.best_per_language()

    @contextmanager
    def hooks(language: str):
        if language not in best or best[language]["lirp_layer"] is None:  # English (the pivot), or refused
            yield None
            return
        with LRP2(model, vectors, best[language]["lirp_layer"], best[language]["lsrp_layer"]) as lrp2:
            lrp2.set_languages(language)
            yield lrp2

    summary = {code: {"lirp_layer": row["lirp_layer"], "lsrp_layer": row["lsrp_layer"], "decision": row["decision"],
                      "valid_nll": round(row["score"], 4), "valid_nll_without": round(row["baseline"], 4),
                      "best_cell": row.get("best_cell")}
               for code, row in best.items()}
    return hooks, summary


PARTS = ("base", "lens", "lrp2")


def earlier_parts(out_dir: Optional[str | Path], rerun: Optional[Sequence[str]], settings: dict) -> dict:
    """The parts of an earlier results.json to keep when only `rerun` is measured again (None: measure all);
    refused when they were measured with other settings (`progress` aside, and the `lens_*`/`lrp2_*` settings
    of a part that is measured again, which the kept parts do not depend on)."""
    if rerun is None:
        return {}
    unknown = sorted(set(rerun) - set(PARTS))
    if unknown:
        raise ValueError(f"rerun={list(rerun)}: unknown parts {unknown}; choose from {list(PARTS)}")
    path = Path(out_dir or ".") / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"rerun={list(rerun)} keeps the other parts of {path}, which does not exist")
    earlier = json.loads(path.read_text(encoding="utf-8"))
    own = tuple(f"{part}_" for part in rerun if part != "base")  # settings only a re-measured part reads
    now = {k: v for k, v in comparable(settings).items() if k != "progress" and not k.startswith(own)}
    before = {k: v for k, v in comparable(earlier.get("settings", {})).items()
              if k != "progress" and not k.startswith(own)}
    if now != before:
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        raise ValueError(f"rerun={list(rerun)}: {path} was measured with other settings ({changed}); "
                         "measure every part again (no --rerun)")
    keep = [part for part in PARTS if part not in rerun]
    return {key: value for key, value in earlier.items()
            if key == "timings_seconds" or any(key == part or key.startswith(part + "_") for part in keep)}


def comparable(settings: dict) -> dict:
    """Settings as JSON reads them back, the LM's through its typed settings: results written before the LM had
    a training block (steps, lr, warmup at its top) compare equal to the same settings now."""
    settings = json.loads(json.dumps(settings))
    if isinstance(settings.get("lm"), dict):
        settings["lm"] = json.loads(json.dumps(asdict(CausalLmSettings.from_values(**settings["lm"]))))
    return settings


def run_english_centric_lm(settings: EnglishCentricExperiment = EnglishCentricExperiment(),
                           out_dir: Optional[str | Path] = None, cache_dir: Optional[str | Path] = None,
                           rerun: Optional[Sequence[str]] = None) -> dict:
    """Build (or load) the LM, then measure it plain, with LENS (each push sign, each seed) and with LRP2;
    `rerun` measures only those parts again and keeps the rest of out_dir's results.json."""
    kept = earlier_parts(out_dir, rerun, asdict(settings))
    started = time.perf_counter()
    corpus = BibleCorpus()
    languages = list(settings.lm.languages)
    split = settings.lm.split
    base, tokenizer, build = build_english_centric_lm(settings.lm, cache_dir, corpus, progress=settings.progress)
    timings = {}

    tick = time.perf_counter()
    identifier = bible_language_identifier(languages, split, settings.identifier_verses, corpus=corpus)
    valid_rows = corpus.parallel(languages, books=split.books("valid"))
    valid_verses = {code: [row[code] for row in valid_rows] for code in languages}
    identifier_accuracy = {"whole_verse": identification_accuracy(identifier, valid_verses),
                           "first_60_chars": identification_accuracy(identifier, valid_verses, max_chars=60)}
    timings["identifier"] = round(time.perf_counter() - tick, 1)

    test_rows = corpus.parallel(languages, books=split.test_books)
    eval_texts = {code: [row[code] for row in evenly_spaced(test_rows, settings.eval_verses)] for code in languages}
    long_rows = [row for row in test_rows if all(len(row[code].split()) >= 6 for code in languages)]
    prompts = {code: [prompt_of(row[code]) for row in evenly_spaced(long_rows, settings.prompts)] for code in languages}
    valid_texts = {code: [row[code] for row in evenly_spaced(valid_rows, settings.lrp2_valid_verses)] for code in languages}
    train_rows = corpus.parallel(languages, books=split.books("train"))

    def timed(name: str, run: Callable[[], Any]) -> Any:
        tick = time.perf_counter()
        value = run()
        timings[name] = round(time.perf_counter() - tick, 1)
        return value

    results: dict = {"settings": asdict(settings), "build": build, "identifier_accuracy": identifier_accuracy, **kept}
    if "base" not in kept:
        results["base"] = timed("base", lambda: measure(base, tokenizer, identifier, eval_texts, prompts,
                                                        settings.new_tokens))
    if "lens_lr_choice" not in kept:
        (lens_lr, lens_weights), results["lens_lr_choice"] = timed("lens_lr_choice", lambda: choose_lens_setting(
            base, tokenizer, train_rows, valid_texts, settings))
    probes = {}  # seed -> (sample, probe), shared by both push signs
    for push in settings.lens_push_strengths if "lens_lr_choice" not in kept else ():
        per_seed = {}
        for seed in settings.seeds:
            def run_lens(seed: int = seed) -> dict:
                if seed not in probes:
                    probes[seed] = lens_probe(base, tokenizer, train_rows, settings, seed)
                model, summary = lens_variant(base, tokenizer, probes[seed], settings, push, seed, lens_lr, lens_weights)
                return {**measure(model, tokenizer, identifier, eval_texts, prompts, settings.new_tokens), "lens": summary}
            per_seed[str(seed)] = timed(f"lens_push{push:+g}_seed{seed}", run_lens)
        results[f"lens_push{push:+g}"] = {"seeds": per_seed, "mean": mean_over_seeds(list(per_seed.values()))}
    per_seed = {}
    for seed in settings.seeds if "lrp2" not in kept else ():
        def run_lrp2(seed: int = seed) -> dict:
            hooks, summary = lrp2_variant(base, tokenizer, train_rows, valid_texts, settings, seed)
            return {**measure(base, tokenizer, identifier, eval_texts, prompts, settings.new_tokens, hooks),
                    "layers": summary}
        per_seed[str(seed)] = timed(f"lrp2_seed{seed}", run_lrp2)
    if "lrp2" not in kept:
        results["lrp2"] = {"seeds": per_seed, "mean": mean_over_seeds(list(per_seed.values()))}
    results["timings_seconds"] = {**kept.get("timings_seconds", {}), **timings,
                                  "total": round(time.perf_counter() - started, 1)}
    results["goals"] = goals(results, languages)
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / "results.json", results)
        plot_results(results, out_dir / "english_centric_lm.png")
    return results


def measured_variants(results: dict) -> list[str]:
    """The names of the measured variants in a results dict: each LENS push sign, and LRP2."""
    return [name for name in results if name.startswith("lens_push") or name == "lrp2"]


def goals(results: dict, languages: Sequence[str]) -> dict:
    """Per variant: English perplexity change (goal: within 1 %), and the non-English languages whose mean
    perplexity went down and whose fidelity went up (goal: all of them)."""
    base = results["base"]
    targets = [code for code in languages if code != "en"]
    verdicts = {}
    for name in measured_variants(results):
        mean = results[name]["mean"]
        english_change = mean["perplexity"]["en"] / base["perplexity"]["en"] - 1
        perplexity_down = [code for code in targets if mean["perplexity"][code] < base["perplexity"][code]]
        fidelity_up = [code for code in targets if mean["fidelity"][code] > base["fidelity"][code]]
        verdicts[name] = {"english_perplexity_change": round(english_change, 4),
                          "english_within_1_percent": abs(english_change) <= 0.01,
                          "perplexity_down": perplexity_down, "fidelity_up": fidelity_up,
                          "met": abs(english_change) <= 0.01 and len(perplexity_down) == len(targets)
                          and len(fidelity_up) == len(targets)}
    return verdicts


def plot_results(results: dict, path: str | Path) -> Path:
    """Two panels per language: perplexity relative to the base model, and continuation fidelity."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = measured_variants(results)
    languages = list(results["base"]["perplexity"])
    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    ratio_axes, fidelity_axes = figure.subplots(1, 2)
    width = 0.8 / (len(variants) + 1)
    positions = range(len(languages))
    labels = {"lrp2": "LRP2"} | {name: f"LENS push {name[len('lens_push'):]}" for name in variants if name != "lrp2"}
    for index, name in enumerate(variants):
        seeds = list(results[name]["seeds"].values())
        ratios = [[run["perplexity"][code] / results["base"]["perplexity"][code] - 1 for run in seeds] for code in languages]
        means = [100 * sum(r) / len(r) for r in ratios]
        spreads = [100 * (max(r) - min(r)) / 2 for r in ratios]
        ratio_axes.bar([p + (index + 1) * width for p in positions], means, width, yerr=spreads, label=labels[name],
                       color=f"C{index + 1}", capsize=2)
    ratio_axes.axhline(0, color="k", linewidth=0.8)
    ratio_axes.set_xticks([p + width * (len(variants) + 1) / 2 for p in positions], languages)
    ratio_axes.set_ylabel("perplexity change vs base on John (%)")
    ratio_axes.set_title("held-out perplexity (lower is better; bars: mean, whiskers: seed range)", fontsize=8)
    ratio_axes.legend(fontsize=7)
    fidelity_axes.bar(list(positions), [100 * results["base"]["fidelity"][c] for c in languages], width, label="base",
                      color="C0")
    for index, name in enumerate(variants):
        fidelity_axes.bar([p + (index + 1) * width for p in positions],
                          [100 * results[name]["mean"]["fidelity"][c] for c in languages], width, label=labels[name],
                          color=f"C{index + 1}")
    fidelity_axes.set_xticks([p + width * len(variants) / 2 for p in positions], languages)
    fidelity_axes.set_ylabel("continuations in the prompt's language (%)")
    fidelity_axes.set_ylim(0, 105)
    fidelity_axes.set_title("language fidelity of greedy continuations (mean of seeds)", fontsize=8)
    fidelity_axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(0.29, 0.55))  # over the low es/de bars
    figure.tight_layout()
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))

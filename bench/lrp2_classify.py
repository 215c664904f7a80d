"""Zero-shot verse classification with LRP2 at test time, its LIRP layer chosen per language on held-out verses.

An English-trained e5-small classifier (layers 0-9 frozen and cached, 10-11 + head trained) is applied to
every language; LIRP runs as polypeft's LRP2 hook inside the frozen part, at the layer that scores best on
each language's valid verses, or at the one layer that scores best on every language's valid verses pooled
(`shared`: fewer choices, so less fitting of valid noise). Test verses are never used to choose; their accuracy
at every layer is recorded as a diagnostic only.
Usage: python bench/lrp2_classify.py [--seeds 0 1] [--layers 1,2,...,10] [--json bench/experiments/encoder/lrp2_classify.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import polypeft as pp
from polypeft.core.fileio import write_json
from polypeft.tasks import encoder_finetune as ef
from polypeft.experiments.bible_eval import SECTION_NAMES, verse_classification

PREFIX = "query: "


def encoded(model, tokenizer, data, language: str, settings, vectors=None, layer=None):
    """A language's verses through the frozen layers, with LIRP at `layer` when it is given."""
    part = {language: data[language]}
    if layer is None:
        return ef.encode_examples(model, tokenizer, part, settings.max_length, settings.frozen_layers,
                                  prefix=settings.prefix, progress=False)
    with pp.LRP2(model, vectors, lirp_layer=layer) as lrp2, lrp2.languages(language):
        return ef.encode_examples(model, tokenizer, part, settings.max_length, settings.frozen_layers,
                                  prefix=settings.prefix, progress=False)


def accuracy(classifier, examples) -> float:
    predictions = ef.predict(classifier, examples, route="none")
    return sum(int(p) == int(g) for p, g in zip(predictions, examples.labels.tolist())) / len(predictions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--languages", default="fr,es,de,ru,ar,ko")
    parser.add_argument("--layers", default="1,2,3,4,5,6,7,8,9,10", help="LIRP candidates (<= frozen layers)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--verses-per-section", type=int, default=100)
    parser.add_argument("--valid-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="bench/experiments/encoder/lrp2_classify.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    languages = args.languages.split(",")
    layers = [int(layer) for layer in args.layers.split(",")]
    model, tokenizer = pp.load_encoder("e5-small")
    settings = ef.FinetuneSettings.from_values(steps=args.steps, batch_size=32, lr=2e-4,
                                               warmup=max(1, args.steps // 10), max_length=48, frozen_layers=10,
                                               prefix=PREFIX, method="naive")
    if max(layers) > settings.frozen_layers:
        raise SystemExit(f"--layers must lie in the frozen part (<= {settings.frozen_layers}), got {layers}")
    data = verse_classification(["en", *languages], valid_fraction=args.valid_fraction,
                                test_fraction=args.test_fraction, max_verses_per_section=args.verses_per_section)
    # Language vectors from the unlabeled training texts of every language (no labels, no valid or test verse).
    texts = {lang: [PREFIX + e.text for e in data["train"][lang].examples] for lang in ["en", *languages]}
    vectors = pp.language_vectors(model, texts, tokenizer, layers=layers, pooling="mean",
                                  max_length=settings.max_length)
    train = ef.encode_examples(model, tokenizer, {"en": data["train"]["en"]}, settings.max_length,
                               settings.frozen_layers, prefix=PREFIX)
    sets = {(split, lang, layer): encoded(model, tokenizer, data[split], lang, settings, vectors, layer)
            for split in ("valid", "test") for lang in languages for layer in [None, *layers]}
    runs = []
    for seed in args.seeds:
        classifier = ef.build_classifier(model, list(SECTION_NAMES), ["en"], settings.replaced(seed=seed))
        ef.finetune(classifier, train, settings.replaced(seed=seed))
        valid = {lang: {str(layer): accuracy(classifier, sets["valid", lang, layer]) for layer in [None, *layers]}
                 for lang in languages}
        chosen = {lang: max(layers, key=lambda layer: (valid[lang][str(layer)], -layer)) for lang in languages}
        shared = max(layers, key=lambda layer: (statistics.mean(valid[lang][str(layer)] for lang in languages), -layer))
        test = {lang: {str(layer): accuracy(classifier, sets["test", lang, layer]) for layer in [None, *layers]}
                for lang in languages}
        test_plain = {lang: test[lang]["None"] for lang in languages}
        test_lrp2 = {lang: test[lang][str(chosen[lang])] for lang in languages}
        test_shared = {lang: test[lang][str(shared)] for lang in languages}
        runs.append({"seed": seed, "valid": valid, "chosen_layer": chosen, "shared_layer": shared,
                     "test_plain": test_plain, "test_lrp2": test_lrp2, "test_lrp2_shared": test_shared,
                     "test_every_layer": test})
        print(json.dumps({"seed": seed, "chosen": chosen, "shared": shared, "plain": test_plain, "lrp2": test_lrp2,
                          "lrp2_shared": test_shared}), flush=True)

    def mean_over_seeds(key: str) -> dict:
        return {lang: statistics.mean(run[key][lang] for run in runs) for lang in languages}

    summary = {"plain": mean_over_seeds("test_plain"), "lrp2": mean_over_seeds("test_lrp2"),
               "lrp2_shared": mean_over_seeds("test_lrp2_shared")}
    for key in ("plain", "lrp2", "lrp2_shared"):
        summary[f"{key}_average"] = statistics.mean(summary[key].values())
    report = {"args": vars(args), "runs": runs, "summary": summary, "seconds": round(time.time() - started, 1),
              "sizes": {split: len(data[split]["en"].examples) for split in ("train", "valid", "test")}}
    write_json(args.json, report)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

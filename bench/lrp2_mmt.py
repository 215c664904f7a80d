"""LRP2 on polypeft's own translation model: BLEU/chrF per direction with and without the hooks.

Language vectors come from training-book sentences per language through the encoder and the decoder
(text fed to both sides). Variants: encoder LIRP (source language -> English) and decoder LIRP+LSRP
(target language -> English -> target language), each at the given layers. A plain (naive) run only.
Run: python bench/lrp2_mmt.py runs/demo/naive-seed0 [--sentences 200] [--out bench/experiments/lrp2_mmt/lrp2_mmt.json]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from polypeft.tasks.translation.evaluate import score_directions, translate
from polypeft.core.fileio import write_json
from polypeft.interventions.lrp2 import LRP2, language_vectors
from polypeft.model.poly_model import PolyModel
from polypeft.tasks.translation.run import load_run


def translate_by_direction(model, recipe, data, lrp2=None):
    """Hypotheses for every test example, one direction at a time so the hooks know the languages."""
    groups = defaultdict(list)
    for index, example in enumerate(data.test):
        groups[(example.src_lang, example.tgt_lang)].append(index)
    hypotheses = [""] * len(data.test)
    for (src, tgt), indices in groups.items():
        if lrp2 is not None:
            lrp2.set_languages(src if lrp2.stacks == ["encoder"] else tgt)
        outputs = translate(model, data.tokenizer, [data.test[i] for i in indices], beam=recipe.beam,
                            length_penalty=recipe.length_penalty, batch_size=recipe.eval_batch_size,
                            max_source_length=recipe.max_length, max_new_tokens=recipe.max_length, progress=False)
        for index, hypothesis in zip(indices, outputs):
            hypotheses[index] = hypothesis
    return score_directions(data.test, hypotheses, pivot=recipe.pivot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", help="a trained naive run directory (polypeft mmt train / polypeft demo)")
    parser.add_argument("--sentences", type=int, default=200, help="training sentences per language for the vectors")
    parser.add_argument("--encoder-lirp", type=int, nargs="+", default=[1], help="encoder LIRP layers to try")
    parser.add_argument("--decoder-pairs", nargs="+", default=["1,2"], help="decoder LIRP,LSRP layer pairs")
    parser.add_argument("--out", default="bench/experiments/lrp2_mmt/lrp2_mmt.json")
    args = parser.parse_args()

    recipe, data, model = load_run(args.run)
    if isinstance(model, PolyModel):
        raise SystemExit(f"{args.run} is a {recipe.method['name']} run; LRP2 here takes a plain (naive) run")
    texts = defaultdict(list)
    for example in data.train:
        if len(texts[example.src_lang]) < args.sentences:
            texts[example.src_lang].append(example.src)
    vectors = language_vectors(model, dict(texts), data.tokenizer, stack="both", max_length=recipe.max_length)
    results = {"run": args.run, "sentences_per_language": args.sentences, "variants": {}}
    results["variants"]["plain"] = translate_by_direction(model, recipe, data)
    for layer in args.encoder_lirp:
        with LRP2(model, vectors, lirp_layer=layer, pivot=recipe.pivot, stack="encoder") as hooks:
            results["variants"][f"encoder LIRP@{layer}"] = translate_by_direction(model, recipe, data, hooks)
    for pair in args.decoder_pairs:
        lirp, lsrp = (int(x) for x in pair.split(","))
        with LRP2(model, vectors, lirp_layer=lirp, lsrp_layer=lsrp, pivot=recipe.pivot, stack="decoder") as hooks:
            results["variants"][f"decoder LIRP@{lirp}+LSRP@{lsrp}"] = translate_by_direction(model, recipe, data,
                                                                                            hooks)
    write_json(args.out, results)
    for name, scores in results["variants"].items():
        print(f"{name:28s} " + json.dumps(scores["averages"]))


if __name__ == "__main__":
    main()

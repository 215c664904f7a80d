"""Training throughput of LMS (and LMS+FD) relative to naive on the Bible verse classifier, repeated.

One interleaved measurement (`measure_throughput`) is noisy on a shared CPU; this repeats it and reports
every ratio with their median, so the goal (LMS >= 0.9x naive) is read from more than one draw.
Usage: OMP_NUM_THREADS=1 python bench/encoder_throughput.py [--repeats 5] [--steps 40] [--json ...]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from polypeft.cli.encoder import ClassifyRecipe, classification_data, finetune_settings
from polypeft.core.fileio import write_json
from polypeft.backbones.e5 import load_encoder
from polypeft.tasks import encoder_finetune as ef


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="naive,lms,lms_fd")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per repeat (after 2 warm-up steps)")
    parser.add_argument("--verses-per-section", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="bench/experiments/encoder/throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    recipe = ClassifyRecipe(verses_per_section=args.verses_per_section)  # the classify recipe's defaults
    model, tokenizer = load_encoder(recipe.model)
    train_data, _, label_names = classification_data(recipe)
    settings = finetune_settings(recipe)
    train = ef.encode_examples(model, tokenizer, train_data, settings.max_length, settings.frozen_layers,
                               prefix=settings.prefix)
    draws = []
    for repeat in range(args.repeats):
        classifiers = {m: ef.build_classifier(model, label_names, recipe.languages, settings.replaced(method=m))
                       for m in methods}
        draw = ef.measure_throughput(classifiers, train, settings.replaced(seed=repeat), steps=args.steps)
        print(draw, flush=True)
        draws.append(draw)
    median = {m: statistics.median(d["relative"][m] for d in draws) for m in methods}
    report = {"args": vars(args), "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
              "draws": draws, "median_relative": median}
    write_json(args.json, report)
    print({"median_relative": median})


if __name__ == "__main__":
    main()

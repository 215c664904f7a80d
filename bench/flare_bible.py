"""FLARE against its baselines on Bible verse classification with a real multilingual encoder (e5-small).

Cross-lingual transfer: English task LoRA (stage 1), then each recipe's stage 2 on target-language verses.
Usage: python bench/flare_bible.py [--targets fr --seeds 0 1 --layers 4 --stage1-steps 60 --stage2-steps 60]
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch

from polypeft.core.fileio import write_json
from polypeft.experiments.flare_recipe import TrainedRecipe, flare_stage, run_recipe, train_english_lora
from polypeft.methods.flare.layer import FLAREConfig
from polypeft.backbones.e5 import QUERY_PREFIX, load_encoder
from polypeft.experiments.bible_eval import SECTION_NAMES, verse_classification
from polypeft.tasks.classification import classification_model
from polypeft.tasks.translation.run import translation_encoder

STAGE2_RECIPES = ("translate_train", "input_fusion", "flare_add_relu", "flare_add", "flare_mul",
                  "flare_cross_attention", "flare_mt")


def load_rows(target: str, per_class_train: int, per_class_test: int, seed: int = 0) -> tuple[list, list]:
    """The encoder issue's canon-section task (`verse_classification`), verse-disjoint and stratified:
    rows {en, target, label}, about `per_class_train` / `per_class_test` verses per section."""
    total = per_class_train + per_class_test
    data = verse_classification(["en", target], valid_fraction=0.0, test_fraction=per_class_test / total,
                                seed=seed, max_verses_per_section=total)
    parts = []
    for part in ("train", "test"):
        english, other = data[part]["en"].examples, data[part][target].examples
        parts.append([{"en": e.text, "target": t.text, "label": e.label} for e, t in zip(english, other)])
    random.Random(seed).shuffle(parts[0])
    return parts[0], parts[1]


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


def evaluate(trained: TrainedRecipe, batches: list) -> tuple[float, float]:
    """Accuracy and seconds spent in the forward passes."""
    correct = total = 0
    elapsed = 0.0
    trained.model.eval()
    with torch.no_grad():
        for target, source in batches:
            labels = target["labels"]
            inputs = {k: v for k, v in target.items() if k != "labels"}
            start = time.perf_counter()
            logits = trained(inputs, source).logits
            elapsed += time.perf_counter() - start
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    return correct / total, elapsed


def save(args: argparse.Namespace, results: dict) -> None:
    """Write the settings and every finished result, so a run stopped between languages keeps what it measured."""
    if args.json:
        write_json(args.json, {"settings": vars(args), "results": results})


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    encoder, tokenizer = truncated_e5(args.layers)
    label_names = list(SECTION_NAMES)
    results: dict = {}
    for target in args.targets:
        # polypeft's own translation encoder reads the English verse tagged for translation into `target`
        mt = translation_encoder(args.mt_run, target) if args.mt_run else None
        train_rows, test_rows = load_rows(target, args.per_class_train, args.per_class_test)
        english, parallel = make_batches(tokenizer, train_rows, args.batch, args.max_length)
        _, test_batches = make_batches(tokenizer, test_rows, 32, args.max_length)
        if mt is not None:
            mt_parallel = mt_source_batches(parallel, train_rows, args.batch, mt[1], args.max_length)
            mt_test = mt_source_batches(test_batches, test_rows, 32, mt[1], args.max_length)
        for seed in args.seeds:
            torch.manual_seed(seed)
            base = classification_model(copy.deepcopy(encoder), label_names)
            lora = FLAREConfig(rank=args.rank, alpha=2 * args.rank, fusion=None)
            stage1 = flare_stage(steps=args.stage1_steps, lr=args.lr, seed=seed, progress=False)
            merged = train_english_lora(base, english, lora, stage1)
            accuracy, seconds = evaluate(TrainedRecipe("zero_shot", merged), test_batches)
            results.setdefault(target, {}).setdefault("zero_shot", []).append(
                {"seed": seed, "accuracy": accuracy, "inference_s": seconds})
            print(f"{target} seed {seed} zero_shot acc {accuracy:.3f}", flush=True)
            for recipe in args.recipes:
                method, fusion = recipe, None
                if recipe.startswith("flare_") and recipe != "flare_mt":
                    method, fusion = "flare", recipe[len("flare_"):]
                config = FLAREConfig(rank=args.rank, alpha=2 * args.rank, fusion=fusion or "add_relu",
                                     source_layer_offset=1)
                # FLARE-MT reads the encoder of polypeft's own translation model (--mt-run); without one,
                # a frozen copy of the untuned e5 stands in (it exercises the path, it translates nothing).
                mt_encoder, train_pairs, test_pairs = None, parallel, test_batches
                if recipe == "flare_mt":
                    mt_encoder = mt[0] if mt is not None else copy.deepcopy(encoder).eval()
                    if mt is not None:
                        train_pairs, test_pairs = mt_parallel, mt_test
                stage2 = flare_stage(steps=args.stage2_steps, lr=args.lr, seed=seed, progress=False)
                start = time.perf_counter()
                trained = run_recipe(copy.deepcopy(merged), method, [], train_pairs, lora, config, stage2=stage2,
                                     mt_encoder=mt_encoder, pad_token_id=tokenizer.pad_token_id, skip_stage1=True)
                step_s = (time.perf_counter() - start) / args.stage2_steps
                accuracy, seconds = evaluate(trained, test_pairs)
                results[target].setdefault(recipe, []).append(
                    {"seed": seed, "accuracy": accuracy, "train_step_s": step_s, "inference_s": seconds})
                print(f"{target} seed {seed} {recipe} acc {accuracy:.3f} step {step_s:.3f}s "
                      f"inference {seconds:.2f}s", flush=True)
        save(args, results)
    return results


def summarize(results: dict) -> str:
    lines = ["| target | recipe | accuracy mean (± spread) | train step / LoRA | inference / LoRA |",
             "|---|---|---|---|---|"]
    for target, recipes in results.items():
        lora_step = statistics.mean(r["train_step_s"] for r in recipes["translate_train"])
        lora_inference = statistics.mean(r["inference_s"] for r in recipes["translate_train"])
        for recipe, runs in recipes.items():
            accuracies = [r["accuracy"] for r in runs]
            spread = (max(accuracies) - min(accuracies)) / 2
            step = (f"{statistics.mean(r['train_step_s'] for r in runs) / lora_step:.2f}"
                    if "train_step_s" in runs[0] else "-")
            inference = statistics.mean(r["inference_s"] for r in runs) / lora_inference
            lines.append(f"| {target} | {recipe} | {statistics.mean(accuracies):.3f} (± {spread:.3f}) | {step} | "
                         f"{inference:.2f} |")
    return "\n".join(lines)


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
    parser.add_argument("--recipes", nargs="+", default=list(STAGE2_RECIPES), choices=STAGE2_RECIPES,
                        help="stage-2 recipes to run (translate_train is the reference of the time ratios)")
    parser.add_argument("--mt-run", default=None,
                        help="a trained translation run (e.g. runs/demo/naive-seed0) whose encoder FLARE-MT reads")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = run(args)
    print(summarize(results))


if __name__ == "__main__":
    main()

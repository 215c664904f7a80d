"""Training-step and inference time of FLARE's fusions, LoRA and input-level fusion, as ratios to LoRA.

All methods run round-robin in one process on one tiny-but-not-trivial BERT, so machine noise hits each alike.
Usage: python bench/flare_speed.py [--layers 4 --hidden 256 --batch 16 --length 64 --repeats 20 --threads 1]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, MarianConfig, MarianMTModel

import polypeft as pp
from polypeft.experiments.flare_recipe import concatenate_inputs
from polypeft.methods.flare.layer import FLAREConfig

METHODS = ("lora", "flare_add_relu", "flare_add", "flare_mul", "flare_cross_attention", "flare_mt_add_relu",
           "input_fusion")


def build(method: str, args: argparse.Namespace) -> pp.PolyModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=8000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                        max_position_embeddings=4 * args.length, num_labels=3)
    base = BertForSequenceClassification(config)
    head = {"rank": args.rank, "modules_to_save": ["classifier"]}  # the task head trains in full, as in the recipe
    if method in ("lora", "input_fusion"):
        return pp.wrap(base, FLAREConfig(**head, fusion=None))
    if method.startswith("flare_mt_"):
        mt = MarianMTModel(MarianConfig(vocab_size=8000, d_model=args.hidden, encoder_layers=args.layers,
                                        decoder_layers=1, encoder_attention_heads=max(1, args.hidden // 64),
                                        decoder_attention_heads=4, encoder_ffn_dim=4 * args.hidden,
                                        decoder_ffn_dim=4 * args.hidden, max_position_embeddings=4 * args.length,
                                        pad_token_id=0, decoder_start_token_id=0)).get_encoder().eval()
        return pp.wrap(base, FLAREConfig(**head, fusion=method[len("flare_mt_"):], source="mt_encoder"),
                       source_encoder=mt)
    return pp.wrap(base, FLAREConfig(**head, fusion=method[len("flare_"):]))


def make_batches(args: argparse.Namespace) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(0)
    target = {"input_ids": torch.randint(5, 8000, (args.batch, args.length), generator=generator),
              "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
              "labels": torch.randint(0, 3, (args.batch,), generator=generator)}
    source = {"input_ids": torch.randint(5, 8000, (args.batch, args.length), generator=generator),
              "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long)}
    return target, source


def step_function(method: str, model: pp.PolyModel, target: dict, source: dict, train: bool):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    joined = concatenate_inputs(source, target).batch

    def run() -> None:
        if method == "lora":
            output = model(**target)
        elif method == "input_fusion":
            output = model(**joined)
        else:
            output = model(**target, source_batch=source)
        if train:
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()

    return run


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    target, source = make_batches(args)
    models = {m: build(m, args) for m in args.methods}
    results = {}
    for phase, train in (("train_step", True), ("inference", False)):
        steps = {}
        for method, model in models.items():
            model.train(train)
            steps[method] = step_function(method, model, target, source, train)
        times = {m: [] for m in models}
        order = list(models)
        with torch.set_grad_enabled(train):
            for method in order:  # warm-up
                steps[method]()
            for _ in range(args.repeats):
                random.shuffle(order)
                for method in order:
                    start = time.perf_counter()
                    steps[method]()
                    times[method].append(time.perf_counter() - start)
        lora = statistics.median(times["lora"])
        results[phase] = {m: {"median_s": statistics.median(t), "ratio_to_lora": statistics.median(t) / lora}
                          for m, t in times.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if "lora" not in args.methods:
        args.methods = ["lora", *args.methods]
    random.seed(0)
    results = measure(args)
    print(f"| method | train step / LoRA | inference / LoRA |\n|---|---|---|")
    for method in args.methods:
        print(f"| {method} | {results['train_step'][method]['ratio_to_lora']:.2f} | "
              f"{results['inference'][method]['ratio_to_lora']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()

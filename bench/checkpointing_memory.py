"""Peak memory of one LMS training step with and without gradient checkpointing, each in its own process.

Usage: python bench/checkpointing_memory.py [--layers 12] [--hidden 256] [--length 512] [--batch 8] [--json out.json]
Two memory figures: what the forward saves for backward (exact, from autograd's saved-tensor hooks) and
the step's peak RSS growth (what the allocator really held). A child process runs one variant (`--variant plain|checkpointed`) and prints its peak RSS; the parent
alternates the variants over `--rounds` and reports medians, so both see the same machine state.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def one_step(args: argparse.Namespace) -> dict:
    import torch
    import transformers as tf

    import polypeft as pp

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                            vocab_size=2000, max_position_embeddings=args.length)
    poly = pp.wrap(tf.LlamaForCausalLM(config), pp.LMSConfig(languages=["en", "de", "fr"], rank=8, freeze_base=True))
    if args.variant == "checkpointed":
        poly.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    poly.train()
    ids = torch.randint(3, 2000, (args.batch, args.length))
    langs = ["en", "de", "fr", "de"] * (args.batch // 4 + 1)
    saved: dict[int, int] = {}

    def pack(tensor):  # what the forward keeps for backward, each storage counted once
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = poly(input_ids=ids, labels=ids, lang=langs[: args.batch]).loss
    saved_mb = sum(saved.values()) / 2**20
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.variant, "saved_for_backward_mb": saved_mb, "peak_rss_mb": peak / 1024, "step_rss_growth_mb": (peak - before) / 1024,
            "step_seconds": seconds, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", choices=["plain", "checkpointed"])
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_step(args)))
        return
    runs: dict[str, list[dict]] = {"plain": [], "checkpointed": []}
    for _ in range(args.rounds):
        for variant in runs:
            command = [sys.executable, __file__, "--variant", variant, "--layers", str(args.layers), "--hidden",
                       str(args.hidden), "--length", str(args.length), "--batch", str(args.batch)]
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode:
                sys.exit(f"the {variant} step failed:\n{child.stderr[-3000:]}")
            runs[variant].append(json.loads(child.stdout.strip().splitlines()[-1]))
    summary = {variant: {key: statistics.median(r[key] for r in results)
                         for key in ("saved_for_backward_mb", "peak_rss_mb", "step_rss_growth_mb", "step_seconds",
                                     "loss")}
               for variant, results in runs.items()}
    for key in ("saved_for_backward_mb", "step_rss_growth_mb", "step_seconds"):
        summary[f"{key}_ratio"] = summary["checkpointed"][key] / summary["plain"][key]
    summary["settings"] = {k: getattr(args, k) for k in ("layers", "hidden", "length", "batch", "rounds")}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"summary": summary, "runs": runs}, handle, indent=2)


if __name__ == "__main__":
    main()

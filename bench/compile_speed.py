"""Training-step time of a small LMS model compiled (torch.compile, inductor) against eager, on the CPU.

Usage: python bench/compile_speed.py [--layers 4] [--hidden 256] [--length 128] [--batch 8] [--steps 20] [--json out.json]
Both variants share one model and run interleaved, step by step, each step with a new mix of routes, so they
see the same machine state; the compiled one is warmed up first (its compile time is reported apart).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers as tf
from torch._dynamo.utils import counters

import polypeft as pp

LANGUAGES = ["en", "de", "fr", "es", "ru", "ar", "ko", "zh", "hi"]


def build(args: argparse.Namespace) -> pp.PolyModel:
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                            vocab_size=2000, max_position_embeddings=args.length)
    return pp.wrap(tf.LlamaForCausalLM(config), pp.LMSConfig(languages=LANGUAGES, rank=8, freeze_base=True))


def step(model: torch.nn.Module, ids: torch.Tensor, routes: torch.Tensor) -> float:
    """One forward and backward; seconds taken."""
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, lang=routes).loss
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    poly = build(args)
    poly.train()
    compiled = torch.compile(poly)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 2000, (args.batch, args.length), generator=generator)

    def new_routes() -> torch.Tensor:
        return torch.randint(0, len(LANGUAGES), (args.batch,), generator=generator)

    compile_seconds = step(compiled, ids, new_routes()) + step(compiled, ids, new_routes())
    step(poly, ids, new_routes())
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.steps):
        routes = new_routes()  # a different mix every step, the same one for both variants
        times["eager"].append(step(poly, ids, routes))
        times["compiled"].append(step(compiled, ids, routes))
        poly.zero_grad(set_to_none=True)
    eager, fast = statistics.median(times["eager"]), statistics.median(times["compiled"])
    result = {
        "settings": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "route_mixes": args.steps, "compile_and_first_two_steps_seconds": round(compile_seconds, 2),
        "eager_step_median_seconds": round(eager, 4), "compiled_step_median_seconds": round(fast, 4),
        "speedup": round(eager / fast, 3),
        # New graphs compiled during the timed steps, each with a new route mix: 0 when routes stay tensors.
        "graphs_compiled_after_warmup": counters["stats"]["unique_graphs"] - graphs_after_warmup,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        from polypeft.core.fileio import write_json

        write_json(args.json, result)


if __name__ == "__main__":
    main()

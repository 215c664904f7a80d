"""Core speed benchmark: LMS training-step overhead, merged inference, mixed-batch inference vs peft.

Every ratio is measured side by side in one process, the variants interleaved round by round.
Usage: python bench/core_speed.py [--device cpu|cuda] [--rounds N] [--json out.json] [--only-peft|--only-groups]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers as tf

import polypeft as pp

LANGS = ["en", "de", "fr", "es", "ru", "ar", "ko", "it"]


def build_base(device: str) -> torch.nn.Module:
    """A 6+6-layer encoder-decoder, d_model 512, FFN 2048 (the issue's benchmark model)."""
    torch.manual_seed(0)
    config = tf.BartConfig(
        vocab_size=8000, d_model=512, encoder_ffn_dim=2048, decoder_ffn_dim=2048, encoder_layers=6,
        decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8, max_position_embeddings=256,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    return tf.BartForConditionalGeneration(config).to(device)


def make_batch(batch_size: int, length: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 8000, (batch_size, length), generator=g)
    labels = torch.randint(4, 8000, (batch_size, length), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def mixed_pairs(batch_size: int) -> tuple[list[str], list[str]]:
    """Every example a different (src, tgt) pair."""
    pairs = [(s, t) for s in LANGS for t in LANGS if s != t]
    chosen = [pairs[(i * 3) % len(pairs)] for i in range(batch_size)]
    assert len(set(chosen)) == batch_size
    return [s for s, _ in chosen], [t for _, t in chosen]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(variants: dict, rounds: int, device: str, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each variant, the variants alternating within every round."""
    times = {name: [] for name in variants}
    for round_index in range(warmup + rounds):
        for name, run in variants.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def training_step(model, batch, **routes):
    def run():
        model.zero_grad(set_to_none=True)
        model(**batch, **routes).loss.backward()

    return run


def bench_training(args) -> dict:
    plain = build_base(args.device)
    poly = pp.wrap(build_base(args.device), pp.LMSConfig(languages=LANGS, rank=16, shared_route=True,
                                                             freeze_base=False))  # as measured: base trains too
    batch = make_batch(args.batch, args.length, args.device)
    src, tgt = mixed_pairs(args.batch)
    seconds = interleaved(
        {
            "plain": training_step(plain, batch),
            "lms_homogeneous": training_step(poly, batch, src_lang="de", tgt_lang="en"),
            "lms_mixed": training_step(poly, batch, src_lang=src, tgt_lang=tgt),
        },
        args.rounds,
        args.device,
    )
    r, c, d = 2048, 512, 16
    return {
        "seconds": seconds,
        "homogeneous_ratio": seconds["lms_homogeneous"] / seconds["plain"],
        "mixed_ratio": seconds["lms_mixed"] / seconds["plain"],
        "flop_lower_bound_ffn": d * (r + c) / (r * c),
    }


def bench_merged_inference(args) -> dict:
    plain = build_base(args.device).eval()
    poly = pp.wrap(build_base(args.device), pp.LMSConfig(languages=LANGS, rank=16, shared_route=True)).eval()
    merged = poly.merge_and_unload(route="shared")
    batch = make_batch(args.batch, args.length, args.device)

    def forward(model):
        return lambda: model(**batch)

    with torch.inference_mode():
        seconds = interleaved({"plain": forward(plain), "merged_shared": forward(merged)}, args.rounds, args.device)
    return {"seconds": seconds, "merged_ratio": seconds["merged_shared"] / seconds["plain"]}


def bench_against_peft(args) -> dict:
    import peft

    adapters = [f"a{i}" for i in range(16)]
    base = build_base(args.device).eval()
    def lora_config():
        return peft.LoraConfig(r=16, lora_alpha=16, target_modules=["fc1", "fc2"], init_lora_weights=False,
                               task_type="SEQ_2_SEQ_LM")

    lora = peft.get_peft_model(base, lora_config(), adapter_name=adapters[0])
    for name in adapters[1:]:
        lora.add_adapter(name, lora_config())
    lora.eval()
    # LMS language-wise with 16 routes has the same rank, targets and per-route parameters as 16 LoRAs.
    routes = [f"l{i}" for i in range(16)]
    poly = pp.wrap(build_base(args.device), pp.LMSConfig(languages=routes, rank=16, synthesis="language")).eval()
    batch = make_batch(args.batch, args.length, args.device)
    batch.pop("labels")
    names = [adapters[i % 16] for i in range(args.batch)]
    codes = [routes[i % 16] for i in range(args.batch)]
    # Greedy decoding: one token per step, where per-adapter work is large next to the base matmuls.
    decode = dict(max_new_tokens=16, min_new_tokens=16, num_beams=1, do_sample=False)
    with torch.inference_mode():
        seconds = interleaved(
            {
                "peft_forward": lambda: lora(**batch, decoder_input_ids=batch["input_ids"], adapter_names=names),
                "polypeft_forward": lambda: poly(**batch, decoder_input_ids=batch["input_ids"], lang=codes),
                "peft_generate": lambda: lora.generate(**batch, adapter_names=names, **decode),
                "polypeft_generate": lambda: poly.generate(**batch, lang=codes, **decode),
            },
            args.rounds,
            args.device,
        )
    return {
        "seconds": seconds,
        "forward_speedup": seconds["peft_forward"] / seconds["polypeft_forward"],
        "generate_speedup": seconds["peft_generate"] / seconds["polypeft_generate"],
        "peft_version": peft.__version__,
    }


def bench_route_groups(args) -> dict:
    """Mixed routes in decoding: one LMS linear per strategy, then beam search end to end.

    Beam search repeats every route num_beams times; the per-group path fetches each route's factors
    once. `forced_per_example` is the same model with the per-example gather forced everywhere.
    """
    from polypeft.core.languages import RouteGroups

    routes_16 = [f"l{i}" for i in range(16)]
    layer_model = pp.wrap(torch.nn.Sequential(torch.nn.Linear(512, 2048)).to(args.device),
                          pp.LMSConfig(languages=routes_16, rank=16, synthesis="language", target_modules=["0"]))
    layer = layer_model.routed_layers["0"]
    per_layer = {}
    for batch, beams, tokens in [(16, 1, 1), (16, 5, 1), (64, 1, 1), (16, 5, 32), (64, 1, 32)]:
        routes = layer_model.registry.routes([routes_16[i % 16] for i in range(batch)], None).expanded_to(batch * beams)
        rows = torch.randn(batch * beams, tokens, 512, device=args.device)
        groups = routes.groups("src")
        with torch.inference_mode():
            seconds = interleaved({
                "per_example": lambda: layer.batched_delta(rows, routes.src, routes.src),
                "per_group": lambda: layer.grouped_delta(rows, groups),
            }, args.rounds * 8, args.device)
        per_layer[f"batch{batch}_beams{beams}_tokens{tokens}"] = {
            "seconds": seconds, "per_group_speedup": seconds["per_example"] / seconds["per_group"],
            "cost_model_picks": "per_group" if groups.padded_cheaper_than_per_example(tokens, 16) else "per_example"}

    plain = build_base(args.device).eval()
    poly = pp.wrap(build_base(args.device), pp.LMSConfig(languages=LANGS, rank=16)).eval()
    batch = make_batch(args.batch, args.length, args.device)
    batch.pop("labels")
    src, tgt = mixed_pairs(args.batch)
    beam = dict(max_new_tokens=16, min_new_tokens=16, num_beams=5, do_sample=False)
    chooser = RouteGroups.padded_cheaper_than_per_example

    def forced_per_example():
        RouteGroups.padded_cheaper_than_per_example = lambda self, tokens, rank: False
        try:
            poly.generate(**batch, src_lang=src, tgt_lang=tgt, **beam)
        finally:
            RouteGroups.padded_cheaper_than_per_example = chooser

    with torch.inference_mode():
        seconds = interleaved({
            "plain": lambda: plain.generate(**batch, **beam),
            "polypeft": lambda: poly.generate(**batch, src_lang=src, tgt_lang=tgt, **beam),
            "polypeft_forced_per_example": forced_per_example,
        }, args.rounds, args.device)
    return {"per_layer": per_layer, "beam_search": {
        "seconds": seconds,
        "polypeft_over_plain": seconds["polypeft"] / seconds["plain"],
        "forced_per_example_over_plain": seconds["polypeft_forced_per_example"] / seconds["plain"],
    }}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--json")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--only-peft", action="store_true")
    parser.add_argument("--only-groups", action="store_true", help="only the mixed-route decoding measurement")
    args = parser.parse_args()
    results = {"device": args.device, "batch": args.batch, "length": args.length, "rounds": args.rounds,
               "threads": torch.get_num_threads()}
    if args.only_groups:
        results["route_groups"] = bench_route_groups(args)
        print(json.dumps(results["route_groups"], indent=2))
    elif not args.only_peft:
        results["training"] = bench_training(args)
        print(json.dumps(results["training"], indent=2))
        results["merged_inference"] = bench_merged_inference(args)
        print(json.dumps(results["merged_inference"], indent=2))
    if not args.skip_peft and not args.only_groups:
        results["mixed_inference_vs_peft"] = bench_against_peft(args)
        print(json.dumps(results["mixed_inference_vs_peft"], indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

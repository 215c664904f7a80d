"""Per-example routers side by side: polypeft LMS against peft's Poly/MHR, LoRA adapter_names and polylora.

Poly and MHR (task_ids) in training, adapter_names and PyPI's polylora in inference, on one tiny Llama with
mixed-language batches at equal parameters.

Every variant runs in this one process, interleaved round by round; adapters' MultiTask (MTLLoRA) is not measured
(bench/RESULTS.md §1.4 says why). The plot and JSON say how loaded the machine was.
Usage: python bench/per_example_routers.py [--rounds N] [--json bench/experiments/per_example_routers/per_example_routers.json] [--plot PNG]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
import transformers as tf

import polypeft as pp

LANGS = ["en", "de", "fr", "ru"]
RANK = 8
TARGETS = ["gate_proj", "up_proj", "down_proj"]
LENGTH = 64
PER_ROUTE = (1, 2, 4, 8, 16)
TRAIN_PER_ROUTE = 4


def build_base() -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128)
    return tf.LlamaForCausalLM(config).eval()


def mixed_batch(per_route: int, seed: int = 0) -> tuple[dict, list[str]]:
    """`per_route` examples of each language, interleaved (en, de, fr, ru, en, ...): every neighbour differs."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 2000, (per_route * len(LANGS), LENGTH), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, LANGS * per_route


def polypeft_model(base, freeze_base: bool = True) -> pp.PolyModel:
    config = pp.LMSConfig(languages=LANGS, rank=RANK, synthesis="language", target_modules=TARGETS,
                          freeze_base=freeze_base)
    poly = pp.wrap(copy.deepcopy(base), config)
    with torch.no_grad():
        for tensor in poly.added_state_dict().values():
            tensor.normal_(0, 0.02)
    return poly


def peft_poly(base, n_splits: int):
    """peft's Poly (n_splits=1) or MHR (n_splits > 1): n_skills LoRAs of rank RANK mixed per task id."""
    import peft

    config = peft.PolyConfig(task_type="CAUSAL_LM", r=RANK, target_modules=TARGETS, n_tasks=len(LANGS),
                             n_skills=len(LANGS), n_splits=n_splits, poly_type="poly")
    return peft.get_peft_model(copy.deepcopy(base), config)


def peft_adapters(poly: pp.PolyModel, base, folder: Path):
    """polypeft's routes exported, then served by peft with one adapter per language (the same weights)."""
    import peft

    poly.export_lora_routes(folder)
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder / LANGS[0]), adapter_name=LANGS[0])
    for lang in LANGS[1:]:
        served.load_adapter(str(folder / lang), adapter_name=lang)
    return served.eval()


def polylora_adapters(folder: Path, base):
    """The same exported routes served by polylora (its reference path on a CPU: its Triton kernels need CUDA)."""
    from polylora import PolyLoraConfig, PolyLoraModel

    served = PolyLoraModel(copy.deepcopy(base), PolyLoraConfig(max_gpu_adapters=len(LANGS), max_rank=RANK,
                                                               target_modules=TARGETS))
    for lang in LANGS:
        served.load_adapter_from_disk(lang, str(folder / lang))
    return served.eval()


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_tensor_megabytes(run) -> float:
    """The most tensor memory `run()` holds at once above what existed before it, from the profiler's record of
    every CPU allocation and free (exact, unlike sampling the process's resident memory)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        run()
    changes = sorted((event.time_range.start, event.cpu_memory_usage) for event in recorded.events()
                     if event.cpu_memory_usage)
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak / 2**20


def training_steps(base) -> dict[str, callable]:
    """One optimiser step each on the same fully mixed batch (every neighbour another language)."""
    batch, langs = mixed_batch(TRAIN_PER_ROUTE, seed=1)
    labels = batch["input_ids"]
    task_ids = torch.tensor([LANGS.index(lang) for lang in langs])
    models = {
        "plain (full fine-tuning)": (copy.deepcopy(base), {}),
        "polypeft LMS, base trained too": (polypeft_model(base, freeze_base=False), {"lang": langs}),
        "polypeft LMS": (polypeft_model(base), {"lang": langs}),
        "peft Poly (task_ids)": (peft_poly(base, 1), {"task_ids": task_ids}),
        "peft MHR (task_ids, 4 splits)": (peft_poly(base, 4), {"task_ids": task_ids}),
    }
    steps, counts = {}, {}
    for name, (model, routes) in models.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        counts[name] = trainable(model)

        def step(model=model, routes=routes, optimizer=optimizer):
            model(**batch, labels=labels, **routes).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    return steps, counts


def interleaved(variants: dict, rounds: int, warmup: int = 2) -> dict[str, dict]:
    """Median seconds per call of each variant, the variants alternating within every round."""
    times = {name: [] for name in variants}
    for round_index in range(warmup + rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
            for name, values in times.items()}


def inference(base, rounds: int) -> tuple[dict, dict]:
    poly = polypeft_model(base).eval()
    with tempfile.TemporaryDirectory() as folder:
        served = peft_adapters(poly, base, Path(folder) / "routes")
        batched = polylora_adapters(Path(folder) / "routes", base)
    plain = copy.deepcopy(base).eval()
    rows, agreement = {}, {}
    for per_route in PER_ROUTE:
        batch, langs = mixed_batch(per_route, seed=2)
        with torch.no_grad():
            ours = poly(**batch, lang=langs).logits
            agreement[per_route] = {
                "peft": float((ours - served(**batch, adapter_names=langs).logits).abs().max()),
                "polylora": float((ours - batched(**batch, adapter_ids=langs).logits).abs().max())}
            rows[per_route] = interleaved({
                "plain": lambda: plain(**batch),
                "polypeft LMS": lambda: poly(**batch, lang=langs),
                "peft adapter_names": lambda: served(**batch, adapter_names=langs),
                "polylora": lambda: batched(**batch, adapter_ids=langs),
            }, rounds)
    return rows, agreement


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    per_route = [int(k) for k in result["inference"]]
    for name in ("plain", "polypeft LMS", "peft adapter_names", "polylora"):
        left.plot(per_route, [result["inference"][str(k)][name]["median_s"] * 1000 for k in per_route], marker="o",
                  label=name)
    left.set(xscale="log", yscale="log", xlabel="examples per route (4 routes, fully mixed)",
             ylabel="forward, ms (median)", title="Mixed-batch inference")
    left.set_xticks(per_route, [str(k) for k in per_route])
    left.legend()
    names = list(result["training"])
    right.barh(names, [result["training"][n]["median_s"] * 1000 for n in names])
    right.set(xlabel="training step, ms (median)", title=f"Training step, {TRAIN_PER_ROUTE * len(LANGS)} examples")
    right.invert_yaxis()
    figure.suptitle(result["label"], fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--label", default="", help="how loaded the machine was, printed on the plot")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build_base()
    load_before = os.getloadavg()[0]
    steps, counts = training_steps(base)
    training = interleaved(steps, args.rounds)
    for name, step in steps.items():
        training[name]["trainable_parameters"] = counts[name]
        training[name]["peak_tensor_mb"] = round(peak_tensor_megabytes(step), 1)
    rows, agreement = inference(base, args.rounds)
    loaded = "idle" if load_before < 1.5 else "UNDER LOAD (timings inflated, ratios noisy)"
    result = {"label": args.label or f"{loaded}: load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on "
                                     f"{os.cpu_count()} cores, {args.threads} thread(s)",
              "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)], "threads": args.threads,
              "model": "Llama, 4 layers, hidden 256, FFN 768, vocab 2000; 64 tokens; LMS/Poly/LoRA rank 8 on "
                       "gate/up/down, 4 routes", "training": training, "inference": {str(k): v for k, v in rows.items()},
              "max_abs_logit_difference_to_polypeft": {str(k): v for k, v in agreement.items()},
              "torch": torch.__version__, "transformers": tf.__version__, "peft": version("peft"),
              "polylora": version("polylora")}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()

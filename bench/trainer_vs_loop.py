"""transformers' Trainer against polypeft's own loop on one recipe (issue 14): do they train the same model?

LMS on Bible translation (tiny seq2seq preset, en/fr/de, mixed routes in every batch), run both ways in one
process from the same weights on the same batches; loss curves compared step by step, step times side by side.
Usage: python bench/trainer_vs_loop.py [--steps 150] [--rounds 5] [--segment 30] [--only VARIANT ...]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm
from transformers import Trainer

from polypeft.core.fileio import atomic_write, write_json
from polypeft.data.batching import TokenBudgetBatcher, collate, token_lengths
from polypeft.tasks.hf_trainer import PolyTrainer, trainer_arguments
from polypeft.tasks.translation.run import MMTRecipe, add_decoder_inputs, build_model, make_loss_fn, prepare
from polypeft.training.loop import TrainSettings, train

# Dropout 0: both sides see the same forward. The loop's loss is the recipe's label-smoothed token CE.
RECIPE = dict(name="trainer-vs-loop", languages=["en", "fr", "de"], vocab_size=1000, spm_max_sentences=2000,
              max_train_verses=1500, max_eval_verses=10, method={"name": "lms", "rank": 8, "synthesis": "pair"},
              batching="mixed", max_tokens=1024, max_length=64, dropout=0.0, label_smoothing=0.1, lr=1e-3, warmup=10)


class StampedBatches:
    """The recipe's batches (lists of example indices) collated on demand; each collation is time-stamped,
    so both sides' step times are measured the same way: the interval between consecutive batches."""

    def __init__(self, recipe: MMTRecipe, data: Any, model_config: Any, index_batches: list[list[int]]):
        self.recipe, self.data, self.config, self.index_batches = recipe, data, model_config, index_batches
        self.stamps: list[float] = []

    def __call__(self, indices: list[int]) -> dict:
        examples = [self.data.train[i] for i in indices]
        batch = add_decoder_inputs(collate(examples, self.data.tokenizer, self.recipe.max_length,
                                           self.recipe.max_length), self.config)
        self.stamps.append(time.perf_counter())
        return batch

    def stream(self, start: int, count: int):
        for indices in self.index_batches[start:start + count]:
            yield self(indices)


class IndexBatches(torch.utils.data.Dataset):
    """One item per loop batch (its example indices); with batch size 1 and a collator that collates
    the single item, the Trainer's data loader yields exactly the loop's batches in the loop's order."""

    def __init__(self, index_batches: list[list[int]]):
        self.index_batches = index_batches

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, position: int) -> list[int]:
        return self.index_batches[position]


class RecordingTrainer(PolyTrainer):
    """PolyTrainer that keeps every micro-batch's unrounded training loss (the Trainer logs 4 digits)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.micro_losses: list[float] = []
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.micro_losses.append(float(loss))
        return loss


def run_loop(model: torch.nn.Module, batches: StampedBatches, settings: TrainSettings, loss_fn: Callable,
             parameters: Optional[list] = None) -> dict:
    """polypeft's loop over the batches: its loss per step, the step intervals, the wall time of the call."""
    batches.stamps = []
    began = time.perf_counter()
    result = train(model, lambda: batches.stream(0, settings.steps * settings.accumulation), loss_fn, settings,
                   parameters=parameters)
    wall = time.perf_counter() - began
    return {"losses": [r["loss"] for r in result["history"]], "intervals": intervals(batches.stamps, settings),
            "wall_s": wall}


def run_trainer(model: torch.nn.Module, batches: StampedBatches, settings: TrainSettings, out: Path,
                **argument_changes: Any) -> dict:
    """The Trainer over the same batches: its loss per optimiser step (micro-batch losses summed, as it logs them)."""
    batches.stamps = []
    count = settings.steps * settings.accumulation
    arguments = trainer_arguments(settings, str(out), **argument_changes)
    # The loop's schedule unless the variant asks for one of transformers' own.
    loop_schedule = None if "lr_scheduler_type" in argument_changes else settings
    began = time.perf_counter()
    trainer = RecordingTrainer(model=model, args=arguments, data_collator=lambda items: batches(items[0]),
                               train_dataset=IndexBatches(batches.index_batches[:count]), loop_schedule=loop_schedule)
    trainer.train()
    wall = time.perf_counter() - began
    micro, k = trainer.micro_losses, settings.accumulation
    return {"losses": [sum(micro[i:i + k]) for i in range(0, len(micro), k)],
            "intervals": intervals(batches.stamps, settings), "wall_s": wall,
            "num_items_scaling": bool(trainer.model_accepts_loss_kwargs)}


def trainer_style_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as the Trainer makes them: no weight decay on biases and LayerNorm weights."""
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trainable if n in decayed], "weight_decay": weight_decay},
            {"params": [p for n, p in trainable if n not in decayed], "weight_decay": 0.0}]


@dataclasses.dataclass
class Variant:
    """One setting both sides train under; `loop_key` names loop runs that can be shared between variants."""

    name: str
    note: str
    loop_key: str
    settings_changes: dict = dataclasses.field(default_factory=dict)
    argument_changes: dict = dataclasses.field(default_factory=dict)
    label_smoothing: float = 0.1
    plain_marian: bool = False  # the Trainer's model as transformers builds Marian (loss kwargs assumed)
    trainer_style_decay: bool = False  # the loop given the Trainer's decay / no-decay groups


def intervals(stamps: list[float], settings: TrainSettings) -> list[float]:
    """Seconds per optimiser step: time between the first micro-batches of consecutive steps."""
    firsts = stamps[::settings.accumulation]
    return [b - a for a, b in zip(firsts, firsts[1:])]


def compare(variant: Variant, initial: torch.nn.Module, batches: StampedBatches, base: TrainSettings,
            recipe: MMTRecipe, out: Path, loop_runs: dict) -> dict:
    """One variant: both sides from copies of the same initial model; the curves and their largest gap."""
    settings = dataclasses.replace(base, **variant.settings_changes)
    loss_fn = make_loss_fn(dataclasses.replace(recipe, label_smoothing=variant.label_smoothing))
    if variant.loop_key not in loop_runs:
        loop_model = copy.deepcopy(initial)
        groups = trainer_style_groups(loop_model, settings.weight_decay) if variant.trainer_style_decay else None
        loop_runs[variant.loop_key] = {**run_loop(loop_model, batches, settings, loss_fn, groups), "model": loop_model}
    loop_result = loop_runs[variant.loop_key]
    trainer_model = copy.deepcopy(initial)
    if variant.plain_marian:
        del trainer_model.base_model.accepts_loss_kwargs
    smoothing = {"label_smoothing_factor": variant.label_smoothing} if variant.label_smoothing else {}
    trainer_result = run_trainer(trainer_model, batches, settings, out / "hf", **smoothing, **variant.argument_changes)
    loop_losses, trainer_losses = loop_result["losses"], trainer_result["losses"]
    assert len(loop_losses) == len(trainer_losses) == settings.steps, (len(loop_losses), len(trainer_losses))
    gaps = [abs(a - b) for a, b in zip(loop_losses, trainer_losses)]
    loop_state, trainer_state = loop_result["model"].state_dict(), trainer_model.state_dict()
    weight_gap = max(float((loop_state[k] - trainer_state[k]).abs().max()) for k in loop_state)
    first = next((i + 1 for i, g in enumerate(gaps) if g > 1e-3), None)
    row = {"variant": variant.name, "note": variant.note, "accumulation": settings.accumulation,
           "weight_decay": settings.weight_decay, "label_smoothing": variant.label_smoothing,
           "trainer_arguments": {k: str(v) for k, v in variant.argument_changes.items()},
           "trainer_scales_by_num_items": trainer_result["num_items_scaling"],
           "max_abs_loss_difference": max(gaps), "max_abs_loss_difference_first_20_steps": max(gaps[:20]),
           "first_step_differing_by_1e-3": first, "max_abs_weight_difference_after": weight_gap,
           "final_loss_loop": loop_losses[-1], "final_loss_trainer": trainer_losses[-1],
           "loop_losses": loop_losses, "trainer_losses": trainer_losses}
    print(f"{variant.name}: max |loss gap| {max(gaps):.3g} (first 20 steps {max(gaps[:20]):.3g}), "
          f"first step > 1e-3: {first}, max |weight gap| {weight_gap:.3g}")
    return row


VARIANTS = [
    Variant("matched", "trainer_arguments(settings) + loop_schedule=settings", "a1"),
    Variant("fused-adamw", "matched, optim=adamw_torch_fused (transformers' default)", "a1",
            argument_changes={"optim": "adamw_torch_fused"}),
    Variant("hf-linear-schedule", "matched but transformers' own linear schedule (warm-up from lr 0)", "a1",
            argument_changes={"lr_scheduler_type": "linear"}),
    Variant("weight-decay", "weight decay 0.01: the Trainer spares biases and LayerNorm weights", "wd",
            settings_changes={"weight_decay": 0.01}),
    Variant("weight-decay, loop given Trainer groups", "weight decay 0.01, the loop handed the same groups",
            "wd-groups", settings_changes={"weight_decay": 0.01}, trainer_style_decay=True),
    Variant("accumulation 2", "2 micro-batches a step; polypeft's Marian says its loss takes no token count", "a2",
            settings_changes={"accumulation": 2}),
    Variant("accumulation 2, plain Marian", "as transformers builds Marian: the Trainer divides by label tokens",
            "a2", settings_changes={"accumulation": 2}, plain_marian=True),
    Variant("accumulation 2, plain Marian, no smoothing", "the model's own mean loss, summed over micro-batches",
            "a2-ce", settings_changes={"accumulation": 2}, label_smoothing=0.0, plain_marian=True),
]


def timing(initial: torch.nn.Module, batches: StampedBatches, settings: TrainSettings, loss_fn: Callable,
           out: Path, rounds: int, segment: int, skip: int = 3) -> dict:
    """Segments of `segment` steps, loop and Trainer alternating, `rounds` times; median seconds per step each."""
    settings = dataclasses.replace(settings, steps=segment)
    per_side: dict[str, list[float]] = {"loop": [], "trainer": []}
    walls: dict[str, list[float]] = {"loop": [], "trainer": []}
    ratios = []
    for round_index in tqdm(range(rounds), desc="timing rounds"):
        medians = {}
        for side in ("loop", "trainer"):
            model = copy.deepcopy(initial)
            result = (run_loop(model, batches, settings, loss_fn) if side == "loop"
                      else run_trainer(model, batches, settings, out / "hf", label_smoothing_factor=0.1))
            kept = result["intervals"][skip:]
            per_side[side].extend(kept)
            walls[side].append(result["wall_s"])
            medians[side] = statistics.median(kept)
        ratios.append(medians["trainer"] / medians["loop"])
    loop_median, trainer_median = statistics.median(per_side["loop"]), statistics.median(per_side["trainer"])
    return {"rounds": rounds, "segment_steps": segment, "skipped_first_intervals": skip,
            "median_step_s_loop": loop_median, "median_step_s_trainer": trainer_median,
            "ratio_trainer_over_loop": trainer_median / loop_median,
            "ratio_per_round": ratios, "ratio_min": min(ratios), "ratio_max": max(ratios),
            "segment_wall_s_loop": walls["loop"], "segment_wall_s_trainer": walls["trainer"]}


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(15, 4.6))
    matched = rows[0]
    steps = range(1, len(matched["loop_losses"]) + 1)
    axes[0].plot(steps, matched["loop_losses"], label="polypeft loop", linewidth=2.5, alpha=0.6)
    axes[0].plot(steps, matched["trainer_losses"], label="transformers Trainer", linewidth=1, linestyle="--")
    axes[0].set(xlabel="optimiser step", ylabel="training loss (label-smoothed CE)",
                title=f"same recipe, {matched['variant']}: curves coincide")
    axes[0].legend()
    for row in rows:
        gaps = [max(abs(a - b), 1e-9) for a, b in zip(row["loop_losses"], row["trainer_losses"])]
        axes[1].semilogy(range(1, len(gaps) + 1), gaps, label=row["variant"])
    axes[1].set(xlabel="optimiser step", ylabel="|loss(loop) - loss(Trainer)| (0 drawn at 1e-9)",
                title="per-step gap by setting")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.suptitle("LMS pair-wise, tiny seq2seq, Bible en/fr/de mixed batches (polypeft bench/trainer_vs_loop.py)")
    figure.tight_layout()
    path = atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
    plt.close(figure)
    return path


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--segment", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/experiments/trainer_vs_loop/trainer_vs_loop", help="JSON/PNG stem")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    scratch = Path(tempfile.mkdtemp(prefix="trainer-vs-loop-"))  # the Trainer's output_dir; nothing is saved
    began = time.perf_counter()
    recipe = MMTRecipe.from_dict({**RECIPE, "steps": args.steps})
    data = prepare(recipe)
    model = build_model(recipe, data.tokenizer)
    lengths = [min(n, recipe.max_length) for n in token_lengths(data.train, data.tokenizer)]
    batcher = TokenBudgetBatcher(lengths, [e.direction for e in data.train], recipe.max_tokens, mode=recipe.batching,
                                 temperature=recipe.temperature, seed=recipe.seed)
    stream = batcher.sampled_batches()
    index_batches = [next(stream) for _ in range(2 * max(args.steps, args.segment))]
    batches = StampedBatches(recipe, data, model.config, index_batches)
    # The loop's side of the recipe; the Trainer gets the same numbers through trainer_arguments(settings).
    base = TrainSettings(steps=args.steps, lr=recipe.training.lr, warmup=recipe.training.warmup_steps, schedule="linear", betas=(0.9, 0.98),
                         weight_decay=0.0, accumulation=1, clip_norm=1.0, seed=0, progress=False)
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only]
    loop_runs: dict = {}
    rows = [compare(variant, model, batches, base, recipe, scratch, loop_runs) for variant in chosen]
    timed = timing(model, batches, base, make_loss_fn(recipe), scratch, args.rounds, args.segment)
    print(f"step time Trainer/loop: {timed['ratio_trainer_over_loop']:.3f} "
          f"(per round {timed['ratio_min']:.3f}..{timed['ratio_max']:.3f})")
    result = {"date": str(date.today()), "machine": f"{platform.machine()} CPU, torch threads {args.threads}",
              "command": "python " + " ".join(["bench/trainer_vs_loop.py", *(argv if argv is not None else sys.argv[1:])]),
              "recipe": dataclasses.asdict(recipe), "settings": dataclasses.asdict(base), "variants": rows,
              "timing": timed, "wall_s": round(time.perf_counter() - began, 1),
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    write_json(out.with_suffix(".json"), result)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} in {result['wall_s']} s")


if __name__ == "__main__":
    main()

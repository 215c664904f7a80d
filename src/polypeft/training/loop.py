"""The one training loop: every polypeft trainer (translation, FLARE's stages, task heads, the encoder
fine-tune, LENS) hands it a loss function and a batch stream; with a run folder it logs, checkpoints, resumes.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from tqdm.auto import tqdm

from ..core.fileio import append_line, write_text
from ..core.finite import NonFiniteError, check_finite
from ..core.languages import LanguageError
from ..core.quantized import standard_4bit_layouts
from .processes import check_joined, needs_cpu_group
from .checkpoint import (CHECKPOINT_NAME, PICKLED_CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .schedules import inverse_sqrt, schedule
from .settings import TrainSettings

__all__ = ["CHECKPOINT_NAME", "BatchStreamEnded", "LossFn", "NonFiniteError", "TrainSettings", "TrainingStep",
           "inverse_sqrt", "seed_everything", "train"]

LOG_NAME = "train_log.jsonl"
# A loss function gets the (prepared) model and one batch; it returns the loss and how many items (target
# tokens, rows) the batch scored, for the throughput log.
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]]
# Trainable parameters, or AdamW parameter groups (dicts with "params" and their own "lr").
Parameters = Sequence[Any]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(settings: TrainSettings, device_placement: bool = True) -> Accelerator:
    """An accelerator with the settings' accumulation and precision, joined with every launched process (on a
    machine without a GPU as gloo CPU ranks: see processes.py)."""
    options = dict(gradient_accumulation_steps=settings.accumulation, mixed_precision=settings.mixed_precision,
                   device_placement=device_placement, cpu=needs_cpu_group())
    try:
        accelerator = Accelerator(**options)
    except ValueError:  # accelerate holds one precision per process; one process may train runs of several in turn
        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        accelerator = Accelerator(**options)
    check_joined(accelerator.num_processes)
    return accelerator


class TrainingStep:
    """One optimiser step per call: `accumulation` micro-batches through the loss function (autocast under mixed
    precision), the backward pass, clipping, AdamW and the schedule. The only place polypeft runs a backward pass."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, settings: TrainSettings,
                 parameters: Optional[Parameters] = None, device_placement: bool = True):
        self.settings, self.loss_fn = settings, loss_fn
        self.accelerator = make_accelerator(settings, device_placement)
        parameters = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
        self.trainable = [p for g in parameters for p in (g["params"] if isinstance(g, dict) else [g])]
        if not self.trainable:
            raise ValueError(f"{type(model).__name__} has no trainable parameters: nothing to train")
        refuse_merged_routes(model)
        optimizer = torch.optim.AdamW(parameters, lr=settings.lr, betas=settings.betas,
                                      weight_decay=settings.weight_decay)
        # The schedule counts optimiser steps, so it stays outside prepare(): accelerate's wrapper would step
        # it once per process, running warm-up and decay num_processes times too fast.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, schedule(settings.schedule, settings.warmup_steps, settings.steps))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.optimizer.zero_grad(set_to_none=True)  # gradients left on the model by an earlier run do not count

    def __call__(self, micro_batches: Iterable[Any], number: int = 0) -> tuple[float, int]:
        """Train on the micro-batches of optimiser step `number`; their mean loss and the items they scored.
        A NaN or inf loss or gradient stops before the optimiser step, so the weights stay finite."""
        accelerator, step_loss, items = self.accelerator, 0.0, 0
        device = self.trainable[0].device
        for batch in micro_batches:
            with accelerator.accumulate(self.model):
                with accelerator.autocast():
                    loss, count = self.loss_fn(self.model, to_device(batch, device))
                if accelerator.num_processes == 1:  # elsewhere the gradient check stops every rank together
                    refuse_non_finite("loss", loss, number)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = self.gradient_norm()
                    if self.settings.mixed_precision != "fp16":  # fp16's scaler skips steps with inf gradients itself
                        refuse_non_finite("gradient norm", norm, number)
                self.optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    self.scheduler.step()  # fp16: a step the gradient scaler skipped does not advance the schedule
                self.optimizer.zero_grad(set_to_none=True)
            step_loss += float(loss.detach()) / self.settings.accumulation
            items += count
        return step_loss, items

    def gradient_norm(self) -> torch.Tensor:
        """The total gradient norm of the trainable parameters, clipped to `clip_norm` where that is set."""
        if self.settings.clip_norm:
            return torch.as_tensor(self.accelerator.clip_grad_norm_(self.trainable, self.settings.clip_norm))
        return torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def state(self, step: int, history: list[dict]) -> dict[str, Any]:
        return {"step": step, "history": history, "model": standard_4bit_layouts(self.unwrapped).state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng_state()}

    def resume(self, run_dir: Path) -> tuple[int, list[dict]]:
        """Load the run's checkpoint; the step it was written at and the history up to there."""
        path = run_dir / CHECKPOINT_NAME
        if not path.exists():
            old = run_dir / PICKLED_CHECKPOINT_NAME
            hint = (f"; {old} is a pickled checkpoint of an older polypeft, never loaded since a pickle can run "
                    "code: train the run again") if old.exists() else ""
            raise FileNotFoundError(f"--resume: no checkpoint at {path}{hint}")
        state = load_checkpoint(path)
        check_finite(state["model"], f"--resume: {path} holds a non-finite weight, refused")
        if state["step"] > self.settings.steps:
            raise ValueError(
                f"--resume: the checkpoint {path} is at step {state['step']}, past the {self.settings.steps} "
                f"steps asked for; ask for at least {state['step']} steps, or train a new run elsewhere"
            )
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return state["step"], state["history"]

    def release(self) -> torch.nn.Module:
        """The model as it was handed in: without the autocast wrapper mixed precision put on its forward."""
        return self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)


def train(
    model: torch.nn.Module,
    batches: Callable[[], Iterator[Any]],
    loss_fn: LossFn,
    settings: TrainSettings,
    run_dir: Optional[str | Path] = None,
    resume: bool = False,
    valid_fn: Optional[Callable[[torch.nn.Module], float]] = None,
    parameters: Optional[Parameters] = None,
    device_placement: bool = True,
    train_mode: bool = True,
    description: str = "training",
) -> dict:
    """Train for `settings.steps` optimiser steps; returns {"steps", "history"} (one record per step).

    `batches()` must give the same stream each call (seeded); on resume the consumed part is skipped. With
    `run_dir` None nothing is written (in-memory training). `parameters` default to those requiring grad;
    `device_placement` False leaves the model where it is (batches follow it); `train_mode` False keeps dropout off.
    """
    if settings.seed is not None:
        seed_everything(settings.seed)
    run_dir = None if run_dir is None else Path(run_dir)
    if run_dir is None and resume:
        raise ValueError("resume=True needs the run_dir holding the checkpoint")
    step = TrainingStep(model, loss_fn, settings, parameters, device_placement)
    accelerator, start_step, history = step.accelerator, 0, []
    if resume:
        start_step, history = step.resume(run_dir)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    # Every process walks the same seeded stream and keeps its own share of it.
    stream = itertools.islice(batches(), start_step * settings.accumulation * world, None)
    stream = (b for i, b in enumerate(stream) if i % world == rank)
    log_path = None if run_dir is None else run_dir / LOG_NAME
    if log_path is not None and main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            truncate_log(log_path, start_step)
    progress = tqdm(range(start_step, settings.steps), initial=start_step, total=settings.steps, desc=description,
                    disable=not (settings.progress and accelerator.is_local_main_process))
    window_items, window_start = 0, time.perf_counter()
    # elapsed_s: the loop's wall time over every part of a resumed run (steps redone after a cut count once); None
    # after a checkpoint of a polypeft that did not count it, since its earlier parts' time is unknown
    elapsed_before, part_start = (history[-1].get("elapsed_s") if history else 0.0), time.perf_counter()
    was_training = model.training
    step.model.train(train_mode)
    saved_step = start_step if resume else None
    try:
        for index in progress:
            try:
                loss, items = step(micro_batches(stream, settings, index), index + 1)
            except NonFiniteError as error:
                raise NonFiniteError(f"{error}; {what_is_kept(run_dir, saved_step)}") from None
            window_items += items
            # `processes`: how many trained this step together (a launch that silently ran one shows here).
            record = {"step": index + 1, "loss": loss, "lr": step.scheduler.get_last_lr()[0], "processes": world,
                      "elapsed_s": None if elapsed_before is None else
                      round(elapsed_before + time.perf_counter() - part_start, 2)}
            last = index + 1 == settings.steps
            if (index + 1) % settings.log_every == 0 or last:
                record["tokens_per_s"] = round(window_items / max(time.perf_counter() - window_start, 1e-9), 1)
                window_items, window_start = 0, time.perf_counter()
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if valid_fn and settings.valid_every and ((index + 1) % settings.valid_every == 0 or last):
                step.model.eval()
                with torch.no_grad():
                    valid_loss = float(valid_fn(step.model))
                record["valid_loss"] = round(valid_loss, 4) if math.isfinite(valid_loss) else None  # JSON has no NaN
                step.model.train(train_mode)
                progress.write(f"step {index + 1}: valid loss {record['valid_loss']}")
            history.append(record)
            if log_path is not None and main:
                append_line(log_path, json.dumps(record, allow_nan=False))
            if run_dir is not None and ((index + 1) % settings.checkpoint_every == 0 or last):
                accelerator.wait_for_everyone()
                if main:
                    try:
                        save_checkpoint(run_dir / CHECKPOINT_NAME, step.state(index + 1, history))
                    except NonFiniteError as error:
                        raise NonFiniteError(f"step {index + 1}: {error}; {what_is_kept(run_dir, saved_step)}") from None
                saved_step = index + 1
    finally:
        step.release().train(was_training)
    return {"steps": settings.steps, "history": history}


def refuse_merged_routes(model: torch.nn.Module) -> None:
    """A route merged into the base weights is out of the optimiser's reach: training it would end in torch's
    'element 0 of tensors does not require grad' (routed layers say which route they hold merged)."""
    merged = [name for name, module in model.named_modules()
              if hasattr(module, "layer_name") and getattr(module, "merged_route", None) is not None]
    if merged:
        raise LanguageError(f"{len(merged)} routed layers (first {merged[0]!r}) hold route ids "
                            f"{getattr(model.get_submodule(merged[0]), 'merged_route')} merged into the base weights, "
                            "so training would not reach their factors; call unmerge() before training")


def refuse_non_finite(what: str, value: torch.Tensor, number: int) -> None:
    """Stop at the first NaN or inf, naming the optimiser step, before it reaches the weights."""
    if not bool(torch.isfinite(value.detach()).all()):
        raise NonFiniteError(f"optimiser step {number}: the {what} is {float(value.detach().float().max()):g}; "
                             "training stopped before it changed the weights (try a lower lr, clip_norm, or check "
                             "that the batches score at least one label)")


def what_is_kept(run_dir: Optional[Path], saved_step: Optional[int]) -> str:
    """Which checkpoint a stopped run keeps: the last finite one, never one written after the failure."""
    if run_dir is None:
        return "the model holds the weights of the last finite step (nothing is written without a run folder)"
    if saved_step is None:
        return f"no checkpoint was written before it, so {run_dir} holds none to resume from"
    return f"{run_dir / CHECKPOINT_NAME} (step {saved_step}, finite) is kept: --resume continues from it"


def micro_batches(stream: Iterator[Any], settings: TrainSettings, index: int) -> list[Any]:
    """The next optimiser step's micro-batches; a stream that runs dry is named, not a bare StopIteration."""
    taken = list(itertools.islice(stream, settings.accumulation))
    if len(taken) < settings.accumulation:
        raise BatchStreamEnded(f"the batch stream ended at optimiser step {index + 1} of {settings.steps} "
                               f"(it needs {settings.accumulation} batches a step); give a stream that does not end")
    return taken


class BatchStreamEnded(ValueError):
    """The batches ran out before the steps asked for."""


def truncate_log(log_path: Path, last_step: int) -> None:
    """Drop log lines past the checkpoint a run resumes from: those steps run again and log again.

    A torn last line (the machine lost power mid-append) is dropped too; a damaged line before it is named."""
    if not log_path.exists():
        return
    lines = [line for line in log_path.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"--resume: {log_path} line {number} is not JSON ({error}); only the last line may "
                             "be torn by a crash: remove or repair that line") from None
        if record["step"] <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_text(log_path, "".join(kept))


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in (nested dicts, tuples and lists of) a batch moved to `device`; everything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):  # also transformers' BatchEncoding
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(item, device) for item in batch)
    return batch

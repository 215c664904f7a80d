"""One training loop for every method: accelerate, Adam, inverse-sqrt warm-up, accumulation, resume.

A checkpoint holds model, optimiser, schedule, step and RNG states, so a resumed run ends where an
uninterrupted run of the same seed ends.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..core.fileio import write_text, write_torch

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainSettings:
    """The optimisation recipe (defaults: the LMS paper's transformer recipe)."""

    steps: int = 1000
    lr: float = 5e-4
    warmup: int = 200
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    accumulation: int = 1
    clip_norm: float = 1.0
    checkpoint_every: int = 200
    valid_every: int = 0
    log_every: int = 10
    seed: int = 0


def inverse_sqrt(warmup: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then decay with 1/sqrt(step) (the fairseq schedule)."""
    warmup = max(1, warmup)
    return lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on a GPU draws from the CUDA generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Drop log lines past the checkpoint a run resumes from: those steps run again and log again."""
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= last_step]
    write_text(log_path, "".join(kept))


LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]


def train(
    model: torch.nn.Module,
    batches: Callable[[], Iterator[dict]],
    loss_fn: LossFn,
    settings: TrainSettings,
    run_dir: str | Path,
    resume: bool = False,
    valid_fn: Optional[Callable[[torch.nn.Module], float]] = None,
    accelerator: Optional[Accelerator] = None,
) -> dict:
    """Train for `settings.steps` optimiser steps; `loss_fn` returns (loss, target tokens) for a batch.

    `batches()` must give the same stream each call (seeded); on resume the consumed part is skipped.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or Accelerator(gradient_accumulation_steps=settings.accumulation)
    seed_everything(settings.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt(settings.warmup))
    start_step, history = 0, []
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if resume:
        if not checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if state["step"] > settings.steps:
            raise ValueError(
                f"--resume: the checkpoint {checkpoint_path} is at step {state['step']}, past the {settings.steps} "
                f"steps asked for; ask for at least {state['step']} steps, or train a new run elsewhere"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, history = state["step"], state["history"]
        _set_rng_state(state["rng"])
    # The schedule counts optimiser steps, so it stays outside prepare(): accelerate's wrapper would step
    # it once per process, running warm-up and decay num_processes times too fast.
    prepared, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    # Every process walks the same seeded stream and keeps its own share of it.
    stream = itertools.islice(batches(), start_step * settings.accumulation * world, None)
    stream = (b for i, b in enumerate(stream) if i % world == rank)
    progress = tqdm(range(start_step, settings.steps), initial=start_step, total=settings.steps,
                    desc="training", disable=not accelerator.is_local_main_process)
    log_path = run_dir / "train_log.jsonl"
    if resume and accelerator.is_main_process:
        _truncate_log(log_path, start_step)
    window_tokens, window_start = 0, time.perf_counter()
    prepared.train()
    for step in progress:
        step_loss = 0.0
        for _ in range(settings.accumulation):
            batch = next(stream)
            with accelerator.accumulate(prepared):
                loss, tokens = loss_fn(prepared, _to_device(batch, accelerator.device))
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.clip_norm:
                    accelerator.clip_grad_norm_(trainable, settings.clip_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += float(loss.detach()) / settings.accumulation
            window_tokens += tokens
        record = {"step": step + 1, "loss": round(step_loss, 4), "lr": scheduler.get_last_lr()[0]}
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            elapsed = time.perf_counter() - window_start
            record["tokens_per_s"] = round(window_tokens / max(elapsed, 1e-9), 1)
            window_tokens, window_start = 0, time.perf_counter()
            progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if valid_fn and settings.valid_every and ((step + 1) % settings.valid_every == 0 or step + 1 == settings.steps):
            prepared.eval()
            with torch.no_grad():
                record["valid_loss"] = round(float(valid_fn(prepared)), 4)
            prepared.train()
            progress.write(f"step {step + 1}: valid loss {record['valid_loss']}")
        history.append(record)
        if accelerator.is_main_process:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_torch(checkpoint_path, {
                    "model": accelerator.unwrap_model(prepared).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step + 1,
                    "history": history,
                    "rng": _rng_state(),
                })
    prepared.eval()
    return {"steps": settings.steps, "history": history}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

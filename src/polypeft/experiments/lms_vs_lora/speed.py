"""Training-step time of each method against LoRA's, side by side, and FD-Share merged into a plain model.

Steps are interleaved round by round in one process (these machines are noisy: only ratios mean anything).
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ...core.languages import SHARED
from ...training.loop import TrainingStep, TrainSettings
from .protocol import Bed, train_tower
from .towers import merged_shared_route


def step_times(bed: Bed, methods: list[str], trained_layers: int, steps: int = 12,
               warmup_steps: int = 2) -> dict[str, Any]:
    """Median seconds of one training step per method on the same batches, order alternating every round;
    ratios to LoRA at equal trainable parameters (or to the first method when LoRA is not measured)."""
    steppers = {}
    for method in methods:
        tower = bed.build(method, trained_layers, 0)
        tower.model.train()
        steppers[method] = TrainingStep(tower.model, bed.loss_function(tower),
                                        TrainSettings(steps=steps + warmup_steps, lr=1e-4, warmup=0,
                                                      schedule="constant", progress=False),
                                        [p for p in tower.model.parameters() if p.requires_grad],
                                        device_placement=False)
    stream = bed.batches(12345)
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(warmup_steps + steps):
        batch = next(stream)
        for method in (methods if round_index % 2 == 0 else methods[::-1]):
            started = time.perf_counter()
            steppers[method]([batch])
            if round_index >= warmup_steps:
                seconds[method].append(time.perf_counter() - started)
    for stepper in steppers.values():
        stepper.release()
    medians = {method: statistics.median(values) for method, values in seconds.items()}
    reference = "lora_train" if "lora_train" in medians else methods[0]
    return {"seconds_per_step": {m: round(s, 4) for m, s in medians.items()}, "relative_to": reference,
            "ratio": {m: round(s / medians[reference], 3) for m, s in medians.items()},
            "steps": steps, "trained_layers": trained_layers, "batch_size": bed.settings.batch_size}


def merged_fd_share(bed: Bed, trained_layers: int, train_steps: int = 20, rounds: int = 10) -> dict[str, Any]:
    """An LMS+FD model trained a few steps, its shared route merged into a plain model: the merged model's outputs
    against the shared route's, and its forward time against the plain base model's."""
    tower = bed.build("lms_fd", trained_layers, 0)
    train_tower(bed, tower, 1e-3, train_steps, 0)
    merged, plain = merged_shared_route(tower).eval(), bed.plain().model.eval()
    inputs = bed.forward_inputs(next(iter(bed.batches(777))))
    size = len(next(iter(inputs.values())))
    with torch.inference_mode():
        difference = float((merged(**inputs)[0] - tower.model(**inputs, lang=[SHARED] * size)[0]).abs().max())
    times: dict[str, list[float]] = {"plain": [], "merged": []}
    with torch.inference_mode():
        for round_index in range(rounds + 1):
            for name, model in (("plain", plain), ("merged", merged))[::1 if round_index % 2 else -1]:
                started = time.perf_counter()
                model(**inputs)
                if round_index:
                    times[name].append(time.perf_counter() - started)
    ratio = statistics.median(times["merged"]) / statistics.median(times["plain"])
    return {"max_abs_output_diff_to_shared_route": difference, "forward_ratio_to_plain": round(ratio, 3),
            "rounds": rounds, "batch": size, "is_plain_model": not hasattr(merged, "routed_layers")}

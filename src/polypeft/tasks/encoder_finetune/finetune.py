"""Fine-tuning a classifier with the training loop: its loss function (cross-entropy, or FD over both
routes) and a random mixed-language batch stream; also the interleaved throughput measurement.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from ...methods.fd import fuse_distillation_step
from ...training.loop import LossFn, TrainingStep, train
from ..task_training import parameter_groups
from .classifier import Classifier
from .examples import EncodedExamples
from .settings import FinetuneSettings


def classifier_loss(classifier: Classifier, train_examples: EncodedExamples, kl_weight: float) -> LossFn:
    """The loss of a batch of example indices: cross-entropy on each example's own route, or for LMS+FD the
    batch on both routes in one pass (language routes, then the shared route) under the FD objective."""

    def loss_fn(model: torch.nn.Module, index: Sequence[int]) -> tuple[torch.Tensor, int]:
        device = next(model.parameters()).device
        batch = {key: value.to(device) for key, value in train_examples.batch(index).items()}
        langs = [train_examples.langs[i] for i in index]
        labels = batch.pop("labels")
        if classifier.method == "lms_fd":
            return fuse_distillation_step(model, batch, langs, langs, kl_weight, labels=labels).loss, len(index)
        return F.cross_entropy(classifier.logits(batch, langs), labels), len(index)

    return loss_fn


def random_batches(examples: EncodedExamples, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Random batches of example indices: languages mix freely, each example keeps its own route."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(len(examples), (batch_size,), generator=generator).tolist()


def finetune(classifier: Classifier, train_examples: EncodedExamples, settings: FinetuneSettings,
             progress: bool = True) -> list[float]:
    """Train for `settings.training.steps`; returns the loss of every step."""
    if len(train_examples) == 0:
        raise ValueError("no training examples")
    result = train(classifier.model, lambda: random_batches(train_examples, settings.batch_size, settings.seed),
                   classifier_loss(classifier, train_examples, settings.kl_weight),
                   settings.loop_settings(progress=progress),
                   parameters=parameter_groups(classifier.model, settings.training.lr, settings.route_lr),
                   device_placement=False, description=f"train {settings.method} seed {settings.seed}")
    classifier.model.eval()
    return [record["loss"] for record in result["history"]]


def measure_throughput(classifiers: Mapping[str, Classifier], train_examples: EncodedExamples,
                       settings: FinetuneSettings, steps: int = 20, warmup_steps: int = 2,
                       progress: bool = True) -> dict[str, Any]:
    """Training examples/s of each classifier, steps interleaved in one process on the same batches
    (these machines are noisy: only the ratios mean anything). The order alternates every step."""
    from tqdm.auto import tqdm

    trainers = {}
    for name, classifier in classifiers.items():
        classifier.model.train()
        trainers[name] = TrainingStep(classifier.model, classifier_loss(classifier, train_examples, settings.kl_weight),
                                      settings.loop_settings(steps=steps + warmup_steps),
                                      parameter_groups(classifier.model, settings.training.lr, settings.route_lr),
                                      device_placement=False)
    batches = random_batches(train_examples, settings.batch_size, settings.seed + 1)
    seconds = {name: 0.0 for name in trainers}
    names = list(trainers)
    for step in tqdm(range(warmup_steps + steps), desc="throughput", disable=not progress):
        index = next(batches)
        for name in (names if step % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            trainers[name]([index])
            if step >= warmup_steps:
                seconds[name] += time.perf_counter() - start
    for trainer in trainers.values():
        trainer.release()
    rates = {name: steps * settings.batch_size / s for name, s in seconds.items()}
    reference = "naive" if "naive" in rates else names[0]  # the baseline when it is measured
    return {"examples_per_s": {k: round(v, 2) for k, v in rates.items()},
            "relative_to": reference,
            "relative": {k: round(v / rates[reference], 3) for k, v in rates.items()},
            "steps": steps, "batch_size": settings.batch_size}

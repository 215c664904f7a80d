"""Training any encoder task head (token tags, QA spans, sequence labels): plain, with LMS, or LMS+FD.

A loss function and a seeded batch stream for the training loop; every row keeps its own language's route.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, ClassVar, Optional

import torch

from ..core.config import NonNegativeFloat, PositiveFloat, PositiveInt, TypedConfig
from ..methods.fd import fuse_distillation_step
from .records import TaskDataError
from ..training.loop import TrainSettings, train
from ..model.example_routes import example_routes, route_arguments, routed_model

# The labels each transformers head is scored against, and the output holding its logits (QA has two heads).
HEAD_OUTPUTS = {"labels": "logits", "start_positions": "start_logits", "end_positions": "end_logits"}


def task_schedule(**changes: Any) -> TrainSettings:
    """A task head's optimisation: AdamW, linear warm-up then linear decay, 100 steps at 5e-5."""
    return TrainSettings(**{"steps": 100, "lr": 5e-5, "warmup": 10, "schedule": "linear", "betas": (0.9, 0.999),
                            "log_every": 1, **changes})


@dataclass
class TaskTrainingSettings(TypedConfig):
    """`training`'s optimisation (its seed fixes the order batches are drawn in), `route_lr` the LMS routes' rate
    (default `training.lr`), `kl_weight` FD's KL weight. `TaskTrainingSettings(steps=300)` changes one setting."""

    moved_keys: ClassVar[Mapping[str, str]] = {"steps": "training.steps", "lr": "training.lr", "warmup":
                                               "training.warmup", "max_grad_norm": "training.clip_norm",
                                               "seed": "training.seed"}
    training: TrainSettings = field(default_factory=task_schedule)
    batch_size: PositiveInt = 16
    route_lr: Optional[PositiveFloat] = None
    kl_weight: NonNegativeFloat = 1.0


def _row_count(inputs: Mapping[str, torch.Tensor]) -> int:
    not_tensors = [key for key, value in inputs.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"inputs {not_tensors} are not tensors; pass what encode_tokens, encode_classification "
                         "or encode_qa(...)['inputs'] returns")
    sizes = {key: int(value.shape[0]) for key, value in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"inputs disagree on the number of rows: {sizes}")
    has_labels = "labels" in inputs or {"start_positions", "end_positions"} <= set(inputs)
    if not has_labels:
        raise ValueError(f"inputs hold {sorted(inputs)} but no labels: training needs 'labels' (token or sequence "
                         "classification) or 'start_positions' and 'end_positions' (QA, encode_qa with_labels=True)")
    return next(iter(sizes.values()))


def scored_rows(inputs: Mapping[str, torch.Tensor]) -> list[int]:
    """The rows a training step can learn from: rows with every label -100 (nothing scored) or an attention mask
    of zeros (nothing to attend to) give a NaN loss or no tokens, so they are left out with a warning that counts
    them; an input with no such row left is refused by name."""
    rows = int(next(iter(inputs.values())).shape[0])
    if rows == 0:
        raise TaskDataError("train_task got 0 input rows: nothing to train on; give at least one labelled row")
    empty: dict[str, torch.Tensor] = {}
    for key in ("labels", "attention_mask"):
        value = inputs.get(key)
        if value is not None and value.dim() >= 1:
            nothing = value.reshape(rows, -1) == (-100 if key == "labels" else 0)
            empty[key] = nothing.all(1)
    unlabelled, masked = (empty.get(key, torch.zeros(rows, dtype=torch.bool)) for key in ("labels", "attention_mask"))
    kept = [i for i in range(rows) if not (unlabelled[i] or masked[i])]
    counts = f"{int(unlabelled.sum())} with every label -100 and {int(masked.sum())} with an all-zero attention mask"
    if not kept:
        raise TaskDataError(f"train_task: none of the {rows} input rows can be trained on ({counts}); every row "
                            "needs at least one label other than -100 and one attended token")
    if len(kept) < rows:
        warnings.warn(f"train_task: {rows - len(kept)} of {rows} input rows skipped ({counts}): they score "
                      "nothing", stacklevel=3)
    return kept


def _batch(inputs: Mapping[str, torch.Tensor], index: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """The rows at `index`, cut to the columns any of them attends to (the inputs were padded to the longest row)."""
    batch = {key: value[index] for key, value in inputs.items()}
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        width, length = mask.shape[1], int(mask.any(0).nonzero().max()) + 1
        batch = {k: v[:, :length] if v.dim() >= 2 and v.shape[1] == width else v for k, v in batch.items()}
    return {key: value.to(device) for key, value in batch.items()}


class HeadLogits:
    """A task model seen through one `logits` tensor, every labelled head's logits stacked on axis 1 (QA: start
    and end), so `fuse_distillation_step` scores all heads in one pass. `.module` is the PolyModel that routes."""

    def __init__(self, model: torch.nn.Module, heads: Sequence[str]):
        self.model, self.module, self.heads = model, routed_model(model), list(heads)

    def __call__(self, **inputs: Any) -> SimpleNamespace:
        output = self.model(**inputs)
        return SimpleNamespace(logits=torch.stack([getattr(output, HEAD_OUTPUTS[h]) for h in self.heads], 1))


def fuse_distillation_heads(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], langs: Sequence[str],
                            kl_weight: float) -> torch.Tensor:
    """FD over every head the batch has labels for: one pass over the batch twice, routes [each row's language;
    shared], and the FD loss over every head's scored positions."""
    heads = [name for name in HEAD_OUTPUTS if name in batch]
    inputs = {key: value for key, value in batch.items() if key not in HEAD_OUTPUTS}
    labels = torch.stack([batch[name] for name in heads], 1)
    return fuse_distillation_step(HeadLogits(model, heads), inputs, list(langs), list(langs), kl_weight,
                                  labels=labels).loss


def parameter_groups(model: torch.nn.Module, lr: float, route_lr: Optional[float]) -> list[dict[str, Any]]:
    """AdamW groups: the LMS routes at `route_lr` (default `lr`), every other trainable parameter at `lr`."""
    poly = routed_model(model)
    route_ids = {id(p) for p in poly.route_parameters()} if poly is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in route_ids], "lr": lr},
              {"params": [p for p in trainable if id(p) in route_ids], "lr": route_lr or lr}]
    return [g for g in groups if g["params"]]


def train_task(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
               languages: Optional[Sequence[Optional[str]]] = None,
               settings: Optional[TaskTrainingSettings] = None, progress: bool = True) -> list[float]:
    """Train `model` for `settings.training.steps` batches drawn from `inputs`; returns every step's loss.

    `inputs` is what `encode_tokens`, `encode_classification` or `encode_qa(...)["inputs"]` returns, and
    `languages` each row's language (QA: its window's example's). A plain or LMS model trains on its head's
    own loss; a PolyModel with a shared route trains with fuse distillation on every head.
    """
    settings = settings or TaskTrainingSettings()
    rows = _row_count(inputs)
    languages = [None] * rows if languages is None else list(languages)
    if len(languages) != rows:
        raise ValueError(f"{len(languages)} languages for {rows} input rows; give one per row")
    kept = scored_rows(inputs)
    routes = example_routes(model, languages)
    poly = routed_model(model)
    distill = poly is not None and poly.registry.shared_route
    groups = parameter_groups(model, settings.training.lr, settings.route_lr)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")

    def batches() -> Iterator[list[int]]:
        generator, order = torch.Generator().manual_seed(settings.training.seed or 0), []
        while True:
            while len(order) < settings.batch_size:  # a fresh seeded permutation each pass over the data
                order += [kept[i] for i in torch.randperm(len(kept), generator=generator).tolist()]
            yield order[:settings.batch_size]
            order = order[settings.batch_size:]

    def loss_fn(model: torch.nn.Module, index: list[int]) -> tuple[torch.Tensor, int]:
        batch = _batch(inputs, index, next(model.parameters()).device)
        if distill:
            return fuse_distillation_heads(model, batch, [routes[i] for i in index], settings.kl_weight), len(index)
        return model(**batch, **route_arguments(routes, index)).loss, len(index)

    name = "lms_fd" if distill else "lms" if poly is not None else "plain"
    loop_settings = replace(settings.training, seed=None, progress=progress)  # the order is seeded above
    result = train(model, batches, loss_fn, loop_settings, parameters=groups, device_placement=False,
                   description=f"train {name}")
    return [record["loss"] for record in result["history"]]

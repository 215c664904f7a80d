"""transformers.Trainer with polypeft routes: a collator that turns language columns into route ids, and
Trainers that save and resume only what polypeft adds (and can train FD), so checkpoints load anywhere."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from transformers import Seq2SeqTrainer, Trainer, TrainingArguments, default_data_collator

from ..core.languages import LanguageError
from ..model.export import ADAPTER_WEIGHTS_NAME
from ..model.poly_model import PolyModel
from ..model.savefiles import WEIGHTS_NAME, read_weights
from ..methods.fd import fuse_distillation_step
from ..training.schedules import schedule, wsd_decay_steps
from ..training.settings import TrainSettings

ROUTE_COLUMNS = ("src_lang", "tgt_lang", "lang")
# transformers' nearest schedule to each of the loop's; they differ by one step, so pass `loop_schedule` for the same.
NEAREST_HF_SCHEDULE = {"linear": "linear", "constant": "constant_with_warmup", "inverse_sqrt": "inverse_sqrt",
                       "wsd": "warmup_stable_decay"}


def trainer_arguments(settings: TrainSettings, output_dir: str, **changes: Any) -> TrainingArguments:
    """TrainingArguments holding the loop's recipe: steps, accumulation, AdamW (torch's, unfused: lr, betas,
    eps 1e-8, weight decay), clipping, precision, seed; `changes` (any TrainingArguments field) win.

    It also sets a batch of one item (the loop's batches are the dataset's items) and sequential sampling
    (no shuffling), so both sides see the same batches; pass `changes` for ordinary training.
    Give the PolyTrainer `loop_schedule=settings` too (it replaces `lr_scheduler_type` and `warmup_steps`): transformers' warm-up starts at a rate of 0, the loop's at
    lr/warmup, so only that makes the rates, and with them the loss curves, the same (bench/trainer_vs_loop.py).
    Still differing: the Trainer leaves biases and LayerNorm weights out of weight decay; the loop decays every
    parameter it is given (hand it parameter groups to match), and under accumulation the Trainer weights
    micro-batches by their label tokens where the loop averages their mean losses.
    """
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a polypeft TrainSettings, got {type(settings).__name__}")
    values = dict(output_dir=output_dir, max_steps=settings.steps, learning_rate=settings.lr,
                  lr_scheduler_type=NEAREST_HF_SCHEDULE[settings.schedule], warmup_steps=settings.warmup_steps,
                  adam_beta1=settings.betas[0], adam_beta2=settings.betas[1], adam_epsilon=1e-8, optim="adamw_torch",
                  weight_decay=settings.weight_decay, gradient_accumulation_steps=settings.accumulation,
                  max_grad_norm=settings.clip_norm, bf16=settings.mixed_precision == "bf16",
                  fp16=settings.mixed_precision == "fp16", seed=42 if settings.seed is None else settings.seed,
                  per_device_train_batch_size=1, train_sampling_strategy="sequential", logging_steps=settings.log_every,
                  save_strategy="no", report_to=[], disable_tqdm=not settings.progress, dataloader_pin_memory=False)
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(TrainingArguments)})
    if unknown:
        raise TypeError(f"trainer_arguments: {unknown} are not TrainingArguments fields")
    values = {**values, **changes}
    if values["lr_scheduler_type"] == "warmup_stable_decay" and "lr_scheduler_kwargs" not in changes:
        values["lr_scheduler_kwargs"] = {"num_decay_steps": wsd_decay_steps(values["max_steps"]),
                                         "decay_type": "linear"}
    return TrainingArguments(**values)


class DataCollatorWithRoutes:
    """Wraps any collator (transformers' default when none is given): the `src_lang`/`tgt_lang`/`lang`
    columns, codes or ids, become route-id tensors the PolyModel reads; every other column goes through."""

    def __init__(self, poly_model: PolyModel, collator: Optional[Callable[[list], dict]] = None):
        self.registry = unwrap(poly_model).registry
        self.collator = collator or default_data_collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        columns = [c for c in ROUTE_COLUMNS if c in features[0]]
        if "lang" in columns and len(columns) > 1:
            raise LanguageError(f"the batch has columns {columns}: give either lang or src_lang/tgt_lang, not both")
        for position, feature in enumerate(features):
            present = [c for c in ROUTE_COLUMNS if c in feature]
            if present != columns:
                raise LanguageError(f"example {position} of the batch has route columns {present}, the first {columns}")
        stripped = [{k: v for k, v in feature.items() if k not in ROUTE_COLUMNS} for feature in features]
        batch = dict(self.collator(stripped))
        if columns:
            values = {c: [_route_value(f[c]) for f in features] for c in columns}
            lang = values.get("lang")
            routes = self.registry.routes(values.get("src_lang", lang), values.get("tgt_lang", lang), len(features))
            batch["src_lang"], batch["tgt_lang"] = routes.src, routes.tgt
        return batch


def _route_value(value: Any) -> Any:
    """A code or an id; a 0-d tensor (datasets' torch format) becomes its int."""
    return int(value) if isinstance(value, torch.Tensor) else value


def unwrap(model: torch.nn.Module) -> PolyModel:
    """The PolyModel inside accelerate/DDP wrappers; an error naming the type when there is none."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, PolyModel):
        raise TypeError(f"expected a polypeft PolyModel (pp.wrap(...)), got {type(inner).__name__}")
    return inner


class RoutedTrainerMixin:
    """What a Trainer needs to train a PolyModel: adapter-only checkpoints that `PolyModel.from_pretrained`
    and `resume_from_checkpoint` read, optionally the FD objective (`fd=True`) in `compute_loss`, and
    optionally the loop's learning-rate schedule (`loop_schedule=TrainSettings(...)`, see `trainer_arguments`)."""

    def __init__(self, *args: Any, fd: bool = False, kl_weight: float = 1.0, one_way_kl: bool = False,
                 loop_schedule: Optional[TrainSettings] = None, **kwargs: Any):
        if not isinstance(fd, bool) or not isinstance(one_way_kl, bool):
            raise TypeError(f"fd={fd!r} and one_way_kl={one_way_kl!r} must be True or False")
        if loop_schedule is not None and not isinstance(loop_schedule, TrainSettings):
            raise TypeError(f"loop_schedule must be a polypeft TrainSettings or None, got {type(loop_schedule).__name__}")
        self.fd, self.kl_weight, self.one_way_kl = fd, float(kl_weight), one_way_kl
        self.loop_schedule = loop_schedule
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        if self.loop_schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        settings = self.loop_schedule
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer or self.optimizer, schedule(settings.schedule, settings.warmup_steps, num_training_steps))
        self._created_lr_scheduler = True  # so a second train() builds it anew for its own step count
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self.fd and model.training):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        src, tgt = inputs.pop("src_lang", None), inputs.pop("tgt_lang", None)
        result = fuse_distillation_step(model, inputs, src_lang=src, tgt_lang=tgt, kl_weight=self.kl_weight,
                                        one_way=self.one_way_kl)
        return (result.loss, None) if return_outputs else result.loss

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        unwrap(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        poly = unwrap(model or self.model)
        weights = Path(resume_from_checkpoint) / WEIGHTS_NAME
        if not weights.is_file() and not (weights.parent / ADAPTER_WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{weights} not found: {resume_from_checkpoint} is not a polypeft checkpoint")
        tensors, weights = read_weights(poly.poly_config, weights.parent)  # the LoRA baseline saves PEFT's files
        poly.load_added_state_dict(tensors, where=str(weights))

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class PolyTrainer(RoutedTrainerMixin, Trainer):
    """transformers.Trainer for a PolyModel (use with `DataCollatorWithRoutes`)."""


class PolySeq2SeqTrainer(RoutedTrainerMixin, Seq2SeqTrainer):
    """transformers.Seq2SeqTrainer for a PolyModel; `predict_with_generate` routes generation and beams."""

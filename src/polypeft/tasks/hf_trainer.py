"""transformers.Trainer with polypeft routes: a collator that turns language columns into route ids, and
Trainers that save and resume only what polypeft adds (and can train FD), so checkpoints load anywhere."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from transformers import Seq2SeqTrainer, Trainer, default_data_collator

from ..core.languages import LanguageError
from ..core.export import ADAPTER_WEIGHTS_NAME
from ..core.model import WEIGHTS_NAME, PolyModel
from ..core.savefiles import read_weights
from ..methods.fd import fuse_distillation_step

ROUTE_COLUMNS = ("src_lang", "tgt_lang", "lang")


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
    and `resume_from_checkpoint` read, and optionally the FD objective (`fd=True`) in `compute_loss`."""

    def __init__(self, *args: Any, fd: bool = False, kl_weight: float = 1.0, one_way_kl: bool = False,
                 **kwargs: Any):
        if not isinstance(fd, bool) or not isinstance(one_way_kl, bool):
            raise TypeError(f"fd={fd!r} and one_way_kl={one_way_kl!r} must be True or False")
        self.fd, self.kl_weight, self.one_way_kl = fd, float(kl_weight), one_way_kl
        super().__init__(*args, **kwargs)

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

"""FLARE's two-stage recipe over the one method protocol: an English LoRA merged, then a target-language stage.

Zero-shot, translate-test, LoRA translate-train, X-Mixup, input-level fusion, FLARE and FLARE-MT: `run_recipe`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from ..core.anatomy import TASK_HEADS
from ..methods.flare.layer import FLAREConfig, FLAREError
from ..model.poly_model import wrap
from ..training.loop import BatchStreamEnded, TrainSettings, train
from .x_mixup import ManifoldMixup, XMixupSettings, mixup_block

RECIPES = ("zero_shot", "translate_test", "translate_train", "x_mixup", "input_fusion", "flare", "flare_mt")
STAGE1_ONLY = ("zero_shot", "translate_test")  # their model is the merged English LoRA
# Recipes that read an English side at test time, and where it comes from: the gold parallel text (an upper
# bound: a user has no such text) or the machine translation of the test input.
READS_ENGLISH_AT_TEST = ("translate_test", "input_fusion", "flare", "flare_mt")
ENGLISH_AT_TEST = ("gold", "translated")
Batch = Mapping[str, Any]
ParallelBatch = tuple[Batch, Batch]  # (target-language batch, its English parallel batch)


def flare_stage(**changes) -> TrainSettings:
    """One stage's optimisation, the FLARE paper's: AdamW at a constant rate, no warm-up, 100 steps by default."""
    return TrainSettings(**{"steps": 100, "lr": 1e-3, "warmup": 0, "schedule": "constant", "betas": (0.9, 0.999),
                            "seed": 0, **changes})


def default_english_at_test(recipe: str) -> str:
    """Translate-test is the machine translation by definition; the other recipes keep the gold English."""
    return "translated" if recipe == "translate_test" else "gold"


def check_english_at_test(recipe: str, english_at_test: str, translation_run: Optional[str]) -> None:
    """Refuse, by value, an English side at test that the recipe cannot have, before anything trains."""
    if recipe not in RECIPES:
        raise FLAREError(f"recipe={recipe!r} is not allowed; choose one of {list(RECIPES)}")
    if english_at_test not in ENGLISH_AT_TEST:
        raise FLAREError(f"english_at_test={english_at_test!r} is not allowed; choose one of {list(ENGLISH_AT_TEST)}")
    if english_at_test == "translated" and recipe not in READS_ENGLISH_AT_TEST:
        raise FLAREError(f"english_at_test='translated' with recipe={recipe!r}: that recipe reads no English at "
                         f"test time; only {list(READS_ENGLISH_AT_TEST)} do")
    if english_at_test == "translated" and not translation_run:
        what = ("classifies the English machine translation of each test input" if recipe == "translate_test"
                else "reads the machine translation of each test input (english_at_test='translated')")
        raise FLAREError(f"recipe={recipe!r} {what}, but translation_run={translation_run!r}: give the folder of "
                         "a trained `polypeft mmt` run (or english_at_test='gold' for the gold-English upper bound)")


def result_name(recipe: str, english_at_test: str, shown_as: Optional[str] = None) -> str:
    """The recipe's name in results (`shown_as`, else its own), saying where its English side at test came from."""
    name = shown_as or recipe
    if recipe not in READS_ENGLISH_AT_TEST:
        return name
    return f"{name} ({'gold English, upper bound' if english_at_test == 'gold' else 'machine-translated English'})"


# -- input-level fusion baseline ------------------------------------------------------------------

@dataclass
class ConcatenatedBatch:
    """English and target inputs as one sequence per row: `[source real tokens][target real tokens][pad]`.

    `target_positions[b, j]` is where target position j landed (-1 for target padding), so token-level
    outputs can be read back on the target's own positions.
    """

    batch: dict[str, torch.Tensor]
    target_positions: torch.Tensor


def concatenate_inputs(
    source_batch: Batch, target_batch: Batch, pad_token_id: int = 0, max_length: Optional[int] = None
) -> ConcatenatedBatch:
    """Input-level fusion: one sequence per row, labels moved with their tokens.

    Token-level `labels` (batch, target_len) get -100 on source positions; QA `start_positions`/
    `end_positions` shift by the source length; sequence labels (batch,) stay as they are.
    """
    rows = target_batch["input_ids"].shape[0]
    if source_batch["input_ids"].shape[0] != rows:
        raise FLAREError(
            f"source_batch has {source_batch['input_ids'].shape[0]} rows but the target batch has {rows}; "
            "input-level fusion pairs each target row with its English row"
        )
    source_mask = source_batch.get("attention_mask", torch.ones_like(source_batch["input_ids"])).bool()
    target_mask = target_batch.get("attention_mask", torch.ones_like(target_batch["input_ids"])).bool()
    target_len = target_mask.shape[1]
    pieces, positions = [], torch.full((rows, target_len), -1, dtype=torch.long)
    for row in range(rows):
        source_ids = source_batch["input_ids"][row][source_mask[row]]
        target_index = target_mask[row].nonzero().squeeze(1)
        positions[row, target_index] = len(source_ids) + torch.arange(len(target_index))
        pieces.append((row, source_ids, target_index))
    length = max(len(s) + len(t) for _, s, t in pieces)
    if max_length is not None and length > max_length:
        raise FLAREError(f"input-level fusion makes sequences of {length} tokens, over max_length={max_length}; "
                         "truncate the source or target inputs first")
    device = target_batch["input_ids"].device
    input_ids = torch.full((rows, length), pad_token_id, dtype=target_batch["input_ids"].dtype)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    token_types = torch.zeros((rows, length), dtype=torch.long) if "token_type_ids" in target_batch else None
    for row, source_ids, target_index in pieces:
        end = len(source_ids) + len(target_index)
        input_ids[row, :len(source_ids)] = source_ids
        input_ids[row, len(source_ids):end] = target_batch["input_ids"][row, target_index]
        attention_mask[row, :end] = 1
        if token_types is not None:
            if "token_type_ids" in source_batch:
                token_types[row, :len(source_ids)] = source_batch["token_type_ids"][row][source_mask[row]]
            token_types[row, len(source_ids):end] = target_batch["token_type_ids"][row, target_index]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_types is not None:
        batch["token_type_ids"] = token_types
    labels = target_batch.get("labels")
    if labels is not None and labels.dim() == 2:
        moved = torch.full((rows, length), -100, dtype=labels.dtype)
        real = positions >= 0
        moved[real.nonzero()[:, 0], positions[real]] = labels[real]
        batch["labels"] = moved
    elif labels is not None:
        batch["labels"] = labels
    for key in ("start_positions", "end_positions"):
        if key in target_batch:
            batch[key] = positions.gather(1, target_batch[key].view(-1, 1).clamp(0, target_len - 1)).view(-1)
    return ConcatenatedBatch({k: v.to(device) for k, v in batch.items()}, positions.to(device))


def on_target_positions(values: torch.Tensor, target_positions: torch.Tensor) -> torch.Tensor:
    """Token-level outputs of a concatenated batch read back on the target's positions.

    Target padding gets the dtype's minimum, so an argmax (QA spans) never picks it.
    """
    index = target_positions.clamp(min=0).to(values.device)
    gathered = values.gather(1, index.view(*index.shape, *([1] * (values.dim() - 2))).expand(
        *index.shape, *values.shape[2:]))
    padding = (target_positions < 0).view(*index.shape, *([1] * (values.dim() - 2))).to(values.device)
    return gathered.masked_fill(padding, torch.finfo(values.dtype).min)


# -- training -------------------------------------------------------------------------------------

def train_steps(model: nn.Module, parameters: list[nn.Parameter], batches: Iterable[Any], settings: TrainSettings,
                loss_of: Callable[[Any], torch.Tensor], description: str) -> list[float]:
    """`settings.steps` steps of the training loop over the batches (cycled); returns the loss of each step."""
    if not parameters:
        raise FLAREError(f"{description}: nothing to train (no trainable parameters)")
    try:
        result = train(model, lambda: itertools.cycle(batches), lambda _, batch: (loss_of(batch), 1),
                       settings, parameters=parameters, device_placement=False, description=description)
    except BatchStreamEnded:
        raise FLAREError(f"{description}: no batches to train on ({settings.steps} steps asked for)") from None
    model.eval()
    return [record["loss"] for record in result["history"]]


def with_task_head(model: nn.Module, config: FLAREConfig) -> FLAREConfig:
    """The config with the task head the model has (classifier, qa_outputs, score) trained in full, unless
    `modules_to_save` already says what trains beside the adapters."""
    if config.modules_to_save is not None:
        return config
    names = dict(model.named_children())
    return replace(config, modules_to_save=[name for name in TASK_HEADS if name in names])


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_english_lora(base_model: nn.Module, english_batches: Iterable[Batch], config: FLAREConfig,
                       settings: TrainSettings) -> nn.Module:
    """Stage 1: a plain LoRA (plus the task head) on the English task, merged into the base."""
    lora = wrap(base_model, with_task_head(base_model, replace(config, fusion=None, alignment=None)))
    train_steps(lora, trainable(lora), english_batches, settings, lambda batch: lora(**batch).loss,
                "stage 1: English LoRA")
    return lora.merge_and_unload()


@dataclass
class TrainedRecipe:
    """A trained recipe's model and how it reads a (target, English) batch pair."""

    recipe: str
    model: nn.Module
    pad_token_id: int = 0

    def __call__(self, target_batch: Batch, source_batch: Optional[Batch] = None) -> Any:
        if self.recipe == "translate_test":
            if source_batch is None:
                raise FLAREError("recipe 'translate_test' classifies the English translation of the input: give it "
                                 "as source_batch")
            return self.model(**source_batch)
        if self.recipe in ("flare", "flare_mt"):
            if source_batch is None:
                raise FLAREError(f"recipe {self.recipe!r} needs the English parallel source_batch")
            return self.model(**target_batch, source_batch=source_batch)
        if self.recipe == "input_fusion":
            if source_batch is None:
                raise FLAREError("recipe 'input_fusion' needs the English parallel source_batch")
            joined = concatenate_inputs(source_batch, target_batch, self.pad_token_id)
            outputs = self.model(**joined.batch)
            for key in ("logits", "start_logits", "end_logits"):
                value = getattr(outputs, key, None)
                if value is not None and value.dim() >= 2 and value.shape[1] == joined.batch["input_ids"].shape[1]:
                    outputs[key] = on_target_positions(value, joined.target_positions)
            return outputs
        return self.model(**target_batch)


def run_recipe(
    base_model: nn.Module,
    recipe: str,
    english_batches: Iterable[Batch],
    parallel_batches: Iterable[ParallelBatch],
    stage1_config: FLAREConfig,
    stage2_config: Optional[FLAREConfig] = None,
    stage1: Optional[TrainSettings] = None,
    stage2: Optional[TrainSettings] = None,
    mt_encoder: Optional[nn.Module] = None,
    pad_token_id: int = 0,
    skip_stage1: bool = False,
    x_mixup: Optional[XMixupSettings] = None,
) -> TrainedRecipe:
    """Stage 1 (English LoRA, merged) then the recipe's stage 2 on (target, English) batch pairs.

    For "flare_mt" the English batches of `parallel_batches` are tokenised for `mt_encoder`.
    `skip_stage1` starts stage 2 from `base_model` as given (already fine-tuned on English).
    Zero-shot and translate-test have no stage 2; translate-test reads the English translation at test time.
    """
    if recipe not in RECIPES:
        raise FLAREError(f"recipe={recipe!r} is not allowed; choose one of {list(RECIPES)}")
    x_mixup = x_mixup or XMixupSettings()
    if recipe == "x_mixup":
        mixup_block(base_model, x_mixup)  # a bad layer is refused before anything trains
    stage1, stage2 = stage1 or flare_stage(), stage2 or flare_stage()
    merged = base_model if skip_stage1 else train_english_lora(base_model, english_batches, stage1_config, stage1)
    if recipe in STAGE1_ONLY:
        return TrainedRecipe(recipe, merged, pad_token_id)
    config = with_task_head(merged, stage2_config or stage1_config)
    if recipe in ("translate_train", "x_mixup", "input_fusion"):
        config = replace(config, fusion=None, alignment=None)
    elif recipe == "flare_mt":
        config = replace(config, source="mt_encoder", fusion=config.fusion or "add_relu")
    else:
        config = replace(config, source="model", fusion=config.fusion or "add_relu")
    model = wrap(merged, config, source_encoder=mt_encoder if recipe == "flare_mt" else None)
    mixup = ManifoldMixup(model, x_mixup) if recipe == "x_mixup" else None

    def loss_of(pair: ParallelBatch) -> torch.Tensor:
        target, source = pair
        if recipe == "translate_train":
            return model(**target).loss
        if mixup is not None:
            return mixup.loss(target, source)
        if recipe == "input_fusion":
            return model(**concatenate_inputs(source, target, pad_token_id).batch).loss
        return model(**target, source_batch=source).loss

    train_steps(model, trainable(model), parallel_batches, stage2, loss_of, f"stage 2: {recipe}")
    return TrainedRecipe(recipe, model, pad_token_id)

"""The typed YAML recipe of `polypeft flare train|eval`: model, data, the two FLARE configs and stage settings.

Kept apart from the command module so that `polypeft --help` never imports torch.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from ..core.config import PositiveInt, TypedConfig
from ..experiments.flare_recipe import RECIPES, check_english_at_test, default_english_at_test, flare_stage
from ..experiments.x_mixup import XMixupSettings
from ..methods.flare.layer import FLAREConfig, FLAREError
from ..training.settings import TrainSettings
from .recipes import check_input_file, check_output_dir


@dataclass
class FlareModelBlock(TypedConfig):
    """`model:` the sequence classifier to adapt (a from_pretrained name or folder)."""

    error_type: ClassVar[type] = FLAREError
    name_or_path: str
    num_labels: PositiveInt = 2
    tokenizer: Optional[str] = None


@dataclass
class FlareDataBlock(TypedConfig):
    """`data:` JSONL files of English and target-language examples, and how they are batched."""

    error_type: ClassVar[type] = FLAREError
    english_train: Optional[str] = None
    target_train: Optional[str] = None
    eval: Optional[str] = None
    batch_size: PositiveInt = 16
    max_length: PositiveInt = 128
    prefix: str = ""


@dataclass
class FlareRecipe(TypedConfig):
    """A FLARE run: stage 1 (English LoRA, merged) and the recipe's stage 2; `stage1_lora` defaults to `flare`.

    `english_at_test` is where a recipe that reads English at test time gets it: "gold" (the data's source_text,
    an upper bound; the default) or "translated" (the input translated by `translation_run`, a `polypeft mmt` run;
    translate-test's default). `target_lang` is the language of the target-language data.
    """

    error_type: ClassVar[type] = FLAREError
    model: FlareModelBlock
    data: FlareDataBlock
    output_dir: str
    recipe: str = "flare"
    mt_model: Optional[str] = None
    target_lang: Optional[str] = None
    translation_run: Optional[str] = None
    english_at_test: Optional[Literal["gold", "translated"]] = None
    x_mixup: XMixupSettings = field(default_factory=XMixupSettings)
    flare: FLAREConfig = field(default_factory=FLAREConfig)
    stage1_lora: Optional[FLAREConfig] = None
    stage1: TrainSettings = field(default_factory=flare_stage)  # keys given in YAML change only those keys
    stage2: TrainSettings = field(default_factory=flare_stage)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recipe not in RECIPES:
            raise FLAREError(f"recipe={self.recipe!r} is not allowed; choose one of {list(RECIPES)}")
        if self.english_at_test is None:
            self.english_at_test = default_english_at_test(self.recipe)
        check_english_at_test(self.recipe, self.english_at_test, self.translation_run)
        if self.translation_run is not None and self.english_at_test == "gold":
            raise FLAREError(f"translation_run={self.translation_run!r} is given but nothing reads it: recipe "
                             f"{self.recipe!r} with english_at_test='gold'; set english_at_test: translated or drop it")
        if self.translation_run is not None and self.target_lang is None:
            raise FLAREError(f"translation_run={self.translation_run!r} translates the test inputs into English; say "
                             "from which language, with target_lang: <code>")
        if self.recipe == "flare_mt" and self.mt_model is None:
            raise FLAREError("recipe 'flare_mt' needs mt_model: <encoder-decoder name or folder, or the "
                             "directory of a `polypeft mmt` run>")
        if self.recipe == "flare_mt" and is_polypeft_run(self.mt_model) and self.target_lang is None:
            raise FLAREError(f"mt_model {self.mt_model!r} is a polypeft translation run; say which language its "
                             "encoder should read English for, with target_lang: <code>")

    @property
    def stage1_config(self) -> FLAREConfig:
        return self.stage1_lora if self.stage1_lora is not None else dataclasses.replace(self.flare)

    def check_paths(self) -> None:
        for key in ("english_train", "target_train", "eval"):
            if getattr(self.data, key) is not None:
                check_input_file(getattr(self.data, key), f"data.{key}")
        check_output_dir(self.output_dir, "output_dir")
        if self.translation_run is not None:
            from ..tasks.translation.translator import translation_run_recipe

            translation_run_recipe(self.translation_run, "translation_run", [self.target_lang])

    def input_paths(self) -> dict[str, Optional[str]]:
        data = {f"data.{key}": getattr(self.data, key) for key in ("english_train", "target_train", "eval")}
        return {**data, "model.name_or_path": self.model.name_or_path, "model.tokenizer": self.model.tokenizer,
                "mt_model": self.mt_model, "translation_run": self.translation_run}

    def output_paths(self) -> dict[str, tuple[str, str]]:
        return {"output_dir": (self.output_dir, "folder")}

    def data_file(self, key: str) -> str:
        path = getattr(self.data, key)
        if path is None:
            raise FLAREError(f"data.{key} is missing: give a JSONL file")
        return path


def is_polypeft_run(path: Optional[str]) -> bool:
    return path is not None and os.path.isfile(os.path.join(str(path), "recipe.json"))

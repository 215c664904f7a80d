"""PolyModel: the routed model with its files: save and load, PEFT export, the Hub, PEFT's everyday calls.

One save format for every method; `wrap` is how a user makes one.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..core.config import ConfigError
from ..core.method_config import MethodConfig
from ..core.fileio import copy_matching
from ..core.finite import check_finite
from ..methods.registry import config_from_dict
from .base_loading import check_options, load_recorded_base
from .export import export_lora, export_lora_routes
from .hub import push_to_hub, read_save_config, resolve_save
from .peft_conveniences import MISSING_NAMES, adapters_disabled, missing_name, refuse, trainable_parameter_counts, unload
from .routed_model import RoutedModel
from .savefiles import (CONFIG_NAME, TRAINER_WEIGHTS_NAME, check_base_class, check_base_fits, read_safetensors,
                        read_weights, write_save)


class PolyModel(RoutedModel):
    """Wraps any torch model; `model(**batch, src_lang=..., tgt_lang=...)` routes every example."""

    # The base model's revision (a Hub branch, tag or commit), recorded in saves: `wrap(..., revision=)`.
    base_revision: Optional[str] = None

    def save_pretrained(self, directory: str | Path, results: Optional[dict[str, Any]] = None) -> Path:
        """A JSON config, a safetensors file of only the added parameters (PEFT's own files for the LoRA baseline)
        and a model card (README.md) that lists `results` when given. Under FSDP every rank calls it: sharded
        weights are gathered."""
        return write_save(self, Path(directory), results)

    def load_added_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy saved added weights into this model; every name and shape must match (`where` names the file)."""
        copy_matching(self.added_state_dict(), tensors, where)

    @classmethod
    def from_pretrained(
        cls, base_model: Union[nn.Module, str, Path, None], name_or_path: Union[str, Path, None] = None,
        revision: Optional[str] = None, config: Optional[MethodConfig] = None,
        source_encoder: Optional[nn.Module] = None, *, is_trainable: bool = False, **options: Any
    ) -> "PolyModel":
        """A save folder or Hub repo id loaded onto `base_model`, or with no base (`from_pretrained(save)`) onto
        the base the save recorded (transformers class, name or path, revision), as peft's AutoPeftModel does.

        The model is for inference unless `is_trainable=True` (peft's keyword): every parameter frozen, eval mode.
        `revision` is the save's; `cache_dir`, `token`, `local_files_only`, `force_download` go to huggingface_hub;
        `dtype`, `device_map`, `quantization_config`, `attn_implementation`, `max_memory` to transformers when
        polypeft loads the base itself; any other keyword is refused by name. A base that differs from the saved
        one is refused. A plain transformers.Trainer checkpoint (the whole model's state, no polypeft config) loads
        with `config=`; `source_encoder` is the frozen encoder a source pass reads (FLARE-MT), never part of a save.
        """
        if isinstance(base_model, (str, Path)):
            if name_or_path is not None:
                raise TypeError(f"PolyModel.from_pretrained({str(base_model)!r}, {str(name_or_path)!r}): give the base "
                                "model object first and the save second, or the save alone to load its recorded base")
            base_model, name_or_path = None, base_model
        if name_or_path is None:
            raise TypeError("PolyModel.from_pretrained needs a save folder or Hub repo id")
        if not isinstance(is_trainable, bool):
            raise TypeError(f"is_trainable={is_trainable!r} must be True or False")
        hub_options, base_options = check_options(options, base_given=base_model is not None)
        directory = resolve_save(name_or_path, revision, **hub_options)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file() and (directory / TRAINER_WEIGHTS_NAME).is_file():
            if base_model is None:
                raise ConfigError(f"{directory} is a transformers.Trainer checkpoint, which records no base model: "
                                  "pass it, PolyModel.from_pretrained(base_model, folder, config=...)")
            model = cls.from_trainer_checkpoint(base_model, directory, config, source_encoder)
            return for_use(model, is_trainable)
        saved = read_save_config(directory)
        saved_config = config_from_dict(saved["config"], where=str(config_path))
        if config is not None and config.to_dict() != saved_config.to_dict():
            raise ConfigError(f"config= differs from the one saved in {config_path} ({saved_config}); a polypeft save "
                              "carries its own config: leave config= out")
        config = saved_config
        if base_model is None:
            base_model = load_recorded_base(saved["base_model"], config_path, hub_options, base_options)
        check_base_fits(base_model, config, saved["base_model"], config_path)
        check_base_class(base_model, saved["base_model"], config_path)
        tensors, weights_path = read_weights(config, directory)
        model = cls(base_model, config, source_encoder)
        model.base_revision = saved["base_model"].get("revision")
        model.load_added_state_dict(tensors, where=str(weights_path))
        return for_use(model, is_trainable)

    @classmethod
    def from_trainer_checkpoint(cls, base_model: nn.Module, directory: Path, config: Optional[MethodConfig],
                                source_encoder: Optional[nn.Module] = None) -> "PolyModel":
        """A checkpoint a plain transformers.Trainer wrote: the whole PolyModel's state dict, every name checked."""
        path = directory / TRAINER_WEIGHTS_NAME
        if config is None:
            raise ConfigError(f"{directory} is a transformers.Trainer checkpoint ({TRAINER_WEIGHTS_NAME}, no "
                              f"{CONFIG_NAME}): pass config= (the config the model was wrapped with), or train with "
                              "pp.PolyTrainer, whose checkpoints hold their config")
        model = cls(base_model, config, source_encoder)
        tensors, _ = read_safetensors(path)
        check_finite(tensors, f"{path}: refused")
        result = model.load_state_dict(tensors, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ConfigError(f"{path} does not fit this model wrapped with {type(config).__name__}: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
        return model

    # ---- PEFT's names: export, Hub, conveniences -------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in MISSING_NAMES:  # before the base model's own (transformers') adapter methods answer
            raise missing_name(name)
        return super().__getattr__(name)

    def export_lora(self, directory: str | Path, src_lang: Optional[str] = None, tgt_lang: Optional[str] = None,
                    lang: Optional[str] = None, route: Optional[str] = None, **options: Any) -> Path:
        """One route as a PEFT LoRA adapter folder (see model/export.py)."""
        return export_lora(self, directory, src_lang, tgt_lang, lang, route, **options)

    def export_lora_routes(self, directory: str | Path, pairs: Optional[list[tuple[str, str]]] = None,
                           **options: Any) -> Path:
        """Every route as a PEFT LoRA adapter, plus routes.json with the vLLM and LoRAX command lines and what
        they will not serve (also warned now); `server="vllm"`/`"lorax"` writes what that server takes (see
        model/export.py and model/serving.py)."""
        return export_lora_routes(self, directory, pairs, **options)

    def push_to_hub(self, repo_id: str, **options: Any) -> Any:
        """Upload only the adapter files and the model card to the Hub repo `repo_id`."""
        return push_to_hub(self, repo_id, **options)

    def disable_adapter(self) -> contextlib.AbstractContextManager:
        """`with model.disable_adapter():` the base model's exact outputs, on this same object."""
        return adapters_disabled(self)

    def unload(self) -> nn.Module:
        """The original base model without routes (nothing merged); this PolyModel is spent afterwards."""
        return unload(self)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return trainable_parameter_counts(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = trainable_parameter_counts(self)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def set_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise refuse("set_adapter")

    def load_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise refuse("load_adapter")

    def add_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise refuse("add_adapter")


def wrap(model: nn.Module, config: MethodConfig, source_encoder: Optional[nn.Module] = None, *,
         revision: Optional[str] = None) -> PolyModel:
    """Wrap `model` in place with the routed layers `config` describes (`source_encoder`: FLARE-MT's encoder).

    `revision`: the Hub revision the base was loaded at (peft's `get_peft_model(..., revision=)`), recorded in saves
    so `PolyModel.from_pretrained(save)` loads that base again; the base's name or path is recorded by itself."""
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision={revision!r} must be a string (a branch, tag or commit of the base's Hub repo)")
    poly = PolyModel(model, config, source_encoder)
    poly.base_revision = revision
    return poly


def for_use(model: PolyModel, is_trainable: bool) -> PolyModel:
    """A loaded model for inference (every parameter frozen, eval mode), or as `wrap` leaves it for training."""
    if not is_trainable:
        model.requires_grad_(False)
        model.eval()
    return model

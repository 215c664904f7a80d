"""The files of a polypeft save (config, weights, card), written as one folder transaction, and the checks that
a load matches them: the config that built the weights travels inside the weights file, so nothing is swapped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .. import __version__
from ..core.config import ConfigError
from ..core.method_config import CONFIG_FILE_NAME, MethodConfig
from ..core.fileio import write_json, write_safetensors, write_text
from ..core.finite import check_finite
from ..core.inject import find_targets
from ..core.languages import LanguageError
from ..core.routed import layer_shape
from ..core.transaction import folder_transaction
from .base_loading import recorded_name_or_path
from .card import CARD_NAME, model_card
from .export import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LORA_FACTORS, PEFT_PREFIX, adapter_config
from .routed_model import RoutedModel

CONFIG_NAME = CONFIG_FILE_NAME
WEIGHTS_NAME = "polypeft_model.safetensors"
TRAINER_WEIGHTS_NAME = "model.safetensors"  # what transformers.Trainer writes for a model it does not know
LANGUAGES_KEY = "polypeft_languages"
BASE_CLASS_KEY = "polypeft_base_class"
CONFIG_KEY = "polypeft_config"  # the config that built the weights, as JSON
SAVE_FILES = (CONFIG_NAME, WEIGHTS_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, CARD_NAME)


def weights_metadata(poly: RoutedModel) -> dict[str, str]:
    return {
        "format": "pt",
        "polypeft_version": __version__,
        LANGUAGES_KEY: json.dumps(poly.registry.allowed()),
        BASE_CLASS_KEY: type(poly.base_model).__name__,
        CONFIG_KEY: json.dumps(poly.poly_config.to_dict(), sort_keys=True),
    }


def whole_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded (FSDP2 DTensor) weights gathered whole, so a save holds every rank's rows; every rank must call
    this together, as the gather is a collective. Plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return {key: value.full_tensor().detach() if isinstance(value, DTensor) else value for key, value in tensors.items()}


def write_weights(poly: RoutedModel, directory: Path) -> Path:
    """The added parameters, under polypeft's names or (LoRA baseline) as a PEFT adapter."""
    tensors = whole_tensors(poly.added_state_dict())
    if not poly.poly_config.saves_as_peft:
        return write_safetensors(directory / WEIGHTS_NAME, tensors, metadata=weights_metadata(poly))
    write_json(directory / ADAPTER_CONFIG_NAME, adapter_config(poly))
    routes = {f"{name}.{factor}" for name in poly.routed_layers for factor in LORA_FACTORS}
    # PEFT's names: a factor is `<module>.lora_A.weight`; a module to save keeps its own tensor names.
    renamed = {f"{PEFT_PREFIX}{name}{'.weight' if name in routes else ''}": tensor for name, tensor in tensors.items()}
    return write_safetensors(directory / ADAPTER_WEIGHTS_NAME, renamed, metadata=weights_metadata(poly))


def write_save(poly: RoutedModel, directory: Path, results: Optional[dict[str, Any]] = None) -> Path:
    """The config JSON, the added weights and the model card (listing `results` when given) in `directory`, as one
    transaction: a reader or a killed writer never leaves new weights beside an old config; files that are not
    part of a save stay in the folder."""
    poly.check_not_spent("save")
    if poly.merged_route is not None:
        raise LanguageError("unmerge() before saving: the saved base weights must stay plain")
    check_finite(poly.added_state_dict(), f"{directory} not saved")  # before any file is written, by its name
    with folder_transaction(directory, keep=lambda name: name not in SAVE_FILES) as staging:
        write_weights(poly, staging)
        write_json(staging / CONFIG_NAME, {
            "polypeft_version": __version__,
            "config": poly.poly_config.to_dict(),
            "base_model": base_model_identity(poly.base_model, poly.routed_layers, poly.base_revision),
        })
        write_text(staging / CARD_NAME, model_card(poly, results))
    return directory


def base_model_identity(base_model: nn.Module, layers: dict[str, nn.Module],
                        revision: Optional[str] = None) -> dict[str, Any]:
    """What `from_pretrained(save)` needs to load the base again (class, name or path, revision) and to check one."""
    return {
        "class": type(base_model).__name__,
        "name_or_path": recorded_name_or_path(base_model),
        "revision": revision,
        # The layer's own (out, in): a quantized weight is packed, so its shape would not match an unquantized base.
        "targets": {name: list(layer_shape(layer.base_layer)) for name, layer in layers.items()},
    }


def check_base_fits(base_model: nn.Module, config: MethodConfig, saved: dict, where: Path) -> None:
    """Refuse, naming every difference, a base model whose target names or shapes differ from the saved one."""
    targets = find_targets(base_model, config.target_modules, config.handles_conv1d, config.targets_by_default)
    found = {name: list(layer_shape(linear)) for name, linear in targets}
    expected = saved.get("targets", {})
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    reshaped = [f"{n}: saved {expected[n]}, model {found[n]}" for n in sorted(set(found) & set(expected))
                if found[n] != expected[n]]
    if missing or extra or reshaped:
        parts = []
        if missing:
            parts.append(f"modules missing from this model: {missing[:5]}")
        if extra:
            parts.append(f"modules this model has but the save does not: {extra[:5]}")
        if reshaped:
            parts.append(f"shapes differ: {reshaped[:5]}")
        raise ConfigError(
            f"{where} was saved for a {saved.get('class')} ({saved.get('name_or_path')}) and does not fit this "
            f"{type(base_model).__name__}: " + "; ".join(parts)
        )


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of `path`; a missing or damaged file is an error that names it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the save has a config but no weights file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a readable safetensors file ({error})") from None


def read_weights(config: MethodConfig, directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The saved added parameters under polypeft's names, with the language order checked."""
    peft_path = directory / ADAPTER_WEIGHTS_NAME
    if config.saves_as_peft and peft_path.is_file():
        tensors, metadata = read_safetensors(peft_path)
        tensors = {peft_to_polypeft_name(key[len(PEFT_PREFIX):]): tensor for key, tensor in tensors.items()
                   if key.startswith(PEFT_PREFIX)}
        path = peft_path
    else:  # every other method, and LoRA saves from before the PEFT layout
        path = directory / WEIGHTS_NAME
        tensors, metadata = read_safetensors(path)
    check_language_order(metadata, config, path)
    check_recorded_config(metadata, config, path)
    return tensors, path


def peft_to_polypeft_name(name: str) -> str:
    """`<module>.lora_A.weight` is the factor `<module>.lora_A`; other names (modules to save) stay as they are."""
    stem = name[:-len(".weight")] if name.endswith(".weight") else name
    return stem if stem.rsplit(".", 1)[-1] in LORA_FACTORS else name


def check_language_order(metadata: dict[str, str], config: MethodConfig, path: Path) -> None:
    """Route i of the weights must be route i of the config: a reordered list would swap languages."""
    if LANGUAGES_KEY not in metadata:
        if config.language_agnostic:
            return  # one route for every language: there is no order to swap
        raise ConfigError(
            f"{path} does not record the language order of its routes (it was not written by polypeft's "
            f"save_pretrained), so loading it with languages {list(config.languages)} could give each language "
            "another's route; save the weights with PolyModel.save_pretrained"
        )
    saved = json.loads(metadata[LANGUAGES_KEY])
    expected = list(config.languages) + (["shared"] if config.shared_route else [])
    if saved != expected:
        raise LanguageError(
            f"{path} holds routes for languages {saved} in that order, but the config lists {expected}; "
            "loading would give each language another language's route. Restore the saved order in the config"
        )


def check_recorded_config(metadata: dict[str, str], config: MethodConfig, path: Path) -> None:
    """The config being loaded must be the one that built the weights: an edited synthesis, rank or target list
    keeps the shapes (or not) but changes what every route means."""
    if CONFIG_KEY not in metadata:
        return  # saved before polypeft recorded its config; the language order was checked above
    try:
        recorded = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError:
        raise ConfigError(f"{path}: its record of the config that built it is not JSON; the file is damaged") from None
    current = json.loads(json.dumps(config.to_dict(), sort_keys=True))  # tuples as lists, as in the record
    differing = sorted(key for key in set(recorded) | set(current) if recorded.get(key) != current.get(key))
    if differing:
        pairs = "; ".join(f"{key}: weights {recorded.get(key)!r}, config {current.get(key)!r}" for key in differing)
        raise ConfigError(f"{path} was built by another config than the one being loaded ({pairs}); the weights "
                          "only mean what they meant under their own config: restore it")


def check_base_class(base_model: nn.Module, saved: dict[str, Any], where: Path) -> None:
    """A save belongs to one model class: BART and Marian share layer names and shapes, not weights."""
    saved_class = saved.get("class")
    if saved_class and saved_class != type(base_model).__name__:
        raise ConfigError(
            f"{where} was saved for a {saved_class} ({saved.get('name_or_path')}) but is being loaded into a "
            f"{type(base_model).__name__}; load it into the {saved_class} it was trained on"
        )

"""The weights file of a polypeft save, and the checks that a load matches what was saved.

Language order and base class travel with the weights, so a load never silently swaps routes or bases.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .. import __version__
from .config import ConfigError, MethodConfig
from .export import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LORA_FACTORS, PEFT_PREFIX, adapter_config
from .fileio import write_json, write_safetensors
from .finite import check_finite
from .languages import LanguageError

if TYPE_CHECKING:
    from .model import PolyModel

CONFIG_NAME = "polypeft_config.json"
WEIGHTS_NAME = "polypeft_model.safetensors"
TRAINER_WEIGHTS_NAME = "model.safetensors"  # what transformers.Trainer writes for a model it does not know
LANGUAGES_KEY = "polypeft_languages"
BASE_CLASS_KEY = "polypeft_base_class"


def saves_as_peft(config: MethodConfig) -> bool:
    """The LoRA baseline is a plain LoRA: its save is PEFT's own adapter layout."""
    return bool(getattr(config, "saves_as_peft", False))


def weights_metadata(poly: "PolyModel") -> dict[str, str]:
    return {
        "format": "pt",
        "polypeft_version": __version__,
        LANGUAGES_KEY: json.dumps(poly.registry.allowed()),
        BASE_CLASS_KEY: type(poly.base_model).__name__,
    }


def whole_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded (FSDP2 DTensor) weights gathered whole, so a save holds every rank's rows; every rank must call
    this together, as the gather is a collective. Plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return {key: value.full_tensor().detach() if isinstance(value, DTensor) else value for key, value in tensors.items()}


def write_weights(poly: "PolyModel", directory: Path) -> Path:
    """The added parameters, under polypeft's names or (LoRA baseline) as a PEFT adapter."""
    tensors = whole_tensors(poly.added_state_dict())
    if not saves_as_peft(poly.poly_config):
        return write_safetensors(directory / WEIGHTS_NAME, tensors, metadata=weights_metadata(poly))
    write_json(directory / ADAPTER_CONFIG_NAME, adapter_config(poly))
    routes = {f"{name}.{factor}" for name in poly.routed_layers for factor in LORA_FACTORS}
    # PEFT's names: a factor is `<module>.lora_A.weight`; a module to save keeps its own tensor names.
    renamed = {f"{PEFT_PREFIX}{name}{'.weight' if name in routes else ''}": tensor for name, tensor in tensors.items()}
    return write_safetensors(directory / ADAPTER_WEIGHTS_NAME, renamed, metadata=weights_metadata(poly))


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
    if saves_as_peft(config) and peft_path.is_file():
        tensors, metadata = read_safetensors(peft_path)
        tensors = {peft_to_polypeft_name(key[len(PEFT_PREFIX):]): tensor for key, tensor in tensors.items()
                   if key.startswith(PEFT_PREFIX)}
        path = peft_path
    else:  # every other method, and LoRA saves from before the PEFT layout
        path = directory / WEIGHTS_NAME
        tensors, metadata = read_safetensors(path)
    check_language_order(metadata, config, path)
    return tensors, path


def peft_to_polypeft_name(name: str) -> str:
    """`<module>.lora_A.weight` is the factor `<module>.lora_A`; other names (modules to save) stay as they are."""
    stem = name[:-len(".weight")] if name.endswith(".weight") else name
    return stem if stem.rsplit(".", 1)[-1] in LORA_FACTORS else name


def check_language_order(metadata: dict[str, str], config: MethodConfig, path: Path) -> None:
    """Route i of the weights must be route i of the config: a reordered list would swap languages."""
    if LANGUAGES_KEY not in metadata:
        return  # saved before polypeft recorded the order
    saved = json.loads(metadata[LANGUAGES_KEY])
    expected = list(config.languages) + (["shared"] if config.shared_route else [])
    if saved != expected:
        raise LanguageError(
            f"{path} holds routes for languages {saved} in that order, but the config lists {expected}; "
            "loading would give each language another language's route. Restore the saved order in the config"
        )


def check_base_class(base_model: nn.Module, saved: dict[str, Any], where: Path) -> None:
    """A save belongs to one model class: BART and Marian share layer names and shapes, not weights."""
    saved_class = saved.get("class")
    if saved_class and saved_class != type(base_model).__name__:
        raise ConfigError(
            f"{where} was saved for a {saved_class} ({saved.get('name_or_path')}) but is being loaded into a "
            f"{type(base_model).__name__}; load it into the {saved_class} it was trained on"
        )


def copy_matching(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str,
                  error: type[Exception] = ConfigError) -> None:
    """Copy saved tensors into a model's own (`expected`): names and shapes must match, else `error` names
    `where`, the missing and unexpected names or the first differing shape."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise error(f"{where}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for key, parameter in expected.items():
        if parameter.shape != tensors[key].shape:
            raise error(f"{where}: {key} has shape {tuple(tensors[key].shape)}, the model expects "
                        f"{tuple(parameter.shape)}")
        if parameter.is_floating_point() != tensors[key].is_floating_point():
            raise error(f"{where}: {key} is stored as {tensors[key].dtype}, the model's is {parameter.dtype}; a "
                        "weight is never cast between integer and floating point: the file was not written by "
                        "polypeft for this model")
    check_finite(tensors, f"{where}: refused")
    with torch.no_grad():
        for key, parameter in expected.items():
            parameter.copy_(tensors[key].to(parameter.dtype))

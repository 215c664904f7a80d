"""The base model a save was made on: recorded at save time (class, name or path, revision), loaded back from it.

`PolyModel.from_pretrained(save)` with no base loads the recorded one, as peft's AutoPeftModel does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..core.config import ConfigError

# Keyword arguments of `PolyModel.from_pretrained` that go to huggingface_hub (the save and the recorded base).
HUB_OPTIONS = ("cache_dir", "token", "local_files_only", "force_download")
# Keyword arguments that go only to transformers' `from_pretrained` of a base polypeft loads itself.
BASE_OPTIONS = ("dtype", "torch_dtype", "device_map", "quantization_config", "attn_implementation", "max_memory")


def recorded_name_or_path(base_model: nn.Module) -> Optional[str]:
    """The name or path transformers loaded `base_model` from; a local folder as an absolute path, so the save
    can find it again from another working directory."""
    name = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
    if name and Path(name).is_dir():
        return str(Path(name).resolve())
    return name


def check_options(options: dict[str, Any], base_given: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hub options, base options) from `from_pretrained`'s keyword arguments; any other name is refused by name."""
    unknown = sorted(set(options) - set(HUB_OPTIONS) - set(BASE_OPTIONS))
    if unknown:
        why = ("; adapter_name: a polypeft save holds all of a task's language routes and they are chosen per call "
               "(lang= or src_lang=/tgt_lang=), not by adapter name (to switch tasks on one base see the README's "
               "'Several tasks on one base')") if "adapter_name" in unknown else ""
        raise TypeError(f"PolyModel.from_pretrained got unknown keyword argument(s) {unknown}; it takes revision, "
                        f"config, source_encoder, is_trainable, the Hub options {list(HUB_OPTIONS)} and, when it loads "
                        f"the base itself, {list(BASE_OPTIONS)}{why}")
    base_options = {key: value for key, value in options.items() if key in BASE_OPTIONS}
    if base_given and base_options:
        raise TypeError(f"PolyModel.from_pretrained got {sorted(base_options)} together with a base model: these "
                        "options apply when polypeft loads the recorded base; load your base with them instead")
    return {key: value for key, value in options.items() if key in HUB_OPTIONS}, base_options


def load_recorded_base(saved: dict[str, Any], where: Path, hub_options: dict[str, Any],
                       base_options: dict[str, Any]) -> nn.Module:
    """The base model `saved` (the save's `base_model` record) names, loaded with transformers' class of that name
    at the recorded revision; a save that records no name, or a class transformers lacks, asks for the base."""
    import transformers

    class_name, name, revision = saved.get("class"), saved.get("name_or_path"), saved.get("revision")
    if not name:
        raise ConfigError(f"{where} records no base model name or path (its {class_name} was built in memory, not "
                          "loaded with from_pretrained): pass the base, PolyModel.from_pretrained(base_model, save)")
    model_class = getattr(transformers, str(class_name), None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ConfigError(f"{where} was saved on a {class_name!r}, which is no transformers model class: load the base "
                          f"({name}) yourself and pass it, PolyModel.from_pretrained(base_model, save)")
    if Path(name).is_absolute() and not Path(name).is_dir():
        raise FileNotFoundError(f"{where} was saved on the base at {name}, which no longer exists: pass the base, "
                                "PolyModel.from_pretrained(base_model, save)")
    try:
        return model_class.from_pretrained(name, revision=revision, **hub_options, **base_options)
    except OSError as error:
        raise FileNotFoundError(f"{where} was saved on {class_name} {name!r} (revision {revision or 'main'}), which "
                                f"could not be loaded ({error}); pass the base, PolyModel.from_pretrained(base_model, "
                                "save)") from None

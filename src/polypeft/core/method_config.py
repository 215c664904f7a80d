"""MethodConfig: the fields and traits every routed method shares, and a config's own file (save and load alone).

Each method's config (LMSConfig, LoRAConfig, ...) adds its fields to these; the registry of methods lives above.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from .. import __version__
from .config import ConfigError, LanguageList, TypedConfig, as_error_type, build
from .fileio import write_json
from .hub_files import local_or_hub_file
from .json_files import read_json_file

SHARED_ROUTE_CODE = "shared"  # polypeft.core.languages.SHARED, repeated so this module needs no torch
CONFIG_FILE_NAME = "polypeft_config.json"  # a config alone, or the config of a whole save


@dataclass
class MethodConfig(TypedConfig):
    """Fields every routed method shares: the languages, which linears to wrap, and what else trains.

    Attributes:
        languages (list[str]): Language codes, one route each, in this order (the order is part of a save).
            Required except for language-agnostic methods (LoRA, Switch). `"shared"` is reserved.
        target_modules (str | list[str] | None): The linears to wrap: module names or their last parts
            (`["fc1", "fc2"]`), or one regular expression over whole names. Default None: the method's default
            from the model's anatomy table, the FFN linears of every block (`DEFAULT_FFN_TARGETS`; CLSR: the
            output linear of every sublayer).
        shared_route (bool): Default False. Adds the FD shared route, `"shared"`: one more route that serves
            every language, trained by fuse distillation and mergeable into a plain model.
        freeze_base (bool): Default True, as in peft: only the routes and `modules_to_save` train. False trains
            the base weights too (the from-scratch translation recipes).
        modules_to_save (list[str] | None): Default None. Base modules trained and saved with the routes, by full
            name or last parts (task heads: `["classifier"]`), as peft's `modules_to_save`.
        keep_base_dtype (bool): Default False: added weights are float32 on a bf16/fp16 or quantized base, so
            small updates survive. True keeps the base's half dtype.
    """

    method: ClassVar[str] = ""
    # Declared traits: what the rest of the library may do with the method, read instead of lists of names.
    # FD's KL: symmetric between the routes, or one-way from the language route (a full-rank copy).
    fd_one_way: ClassVar[bool] = False
    # No parameter depends on the language: runs and merges without a route.
    language_agnostic: ClassVar[bool] = False
    # Its layers also wrap a transposed linear (transformers' Conv1D, GPT-2), not only nn.Linear.
    handles_conv1d: ClassVar[bool] = False
    # Saved as PEFT's own adapter files (a plain LoRA), so peft loads the save as it is.
    saves_as_peft: ClassVar[bool] = False
    # Its forward takes `source_batch=`: a frozen pass over it first gives the layers an input (FLARE's English).
    needs_source_pass: ClassVar[bool] = False
    # What target_modules=None wraps, from the anatomy table: "ffn" (the FFN linears) or "sublayer_outputs".
    targets_by_default: ClassVar[str] = "ffn"
    languages: LanguageList = ()
    target_modules: Optional[Union[str, list[str]]] = None
    shared_route: bool = False
    freeze_base: bool = True
    modules_to_save: Optional[list[str]] = None
    keep_base_dtype: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.check_shared_fields()
        except ConfigError as error:
            raise as_error_type(error, self.error_type) from None

    def check_shared_fields(self) -> None:
        """What the types cannot say about the shared fields: languages, targets, modules to save."""
        owner = type(self).__name__
        if not self.languages and not self.language_agnostic:
            raise ConfigError(f"{owner}.languages is empty: give at least one language code")
        if self.shared_route and self.language_agnostic:
            raise ConfigError(f"{owner}.shared_route=True has no meaning: {owner} has one language-agnostic route "
                              "and no language routes to distil; leave shared_route=False")
        if SHARED_ROUTE_CODE in self.languages:
            raise ConfigError(f"'{SHARED_ROUTE_CODE}' is reserved for the FD route; use shared_route=True instead")
        if self.target_modules is not None and not isinstance(self.target_modules, str) and not self.target_modules:
            raise ConfigError("target_modules is an empty list: leave it None for the FFN defaults")
        if isinstance(self.target_modules, str):  # a regular expression over module names (see core/inject.py)
            try:
                re.compile(self.target_modules)
            except re.error as error:
                raise ConfigError(f"{owner}.target_modules={self.target_modules!r} is not a valid regular expression "
                                  f"({error}); give one matching whole module names, or a list of names") from None
        if self.modules_to_save is not None and not all(isinstance(n, str) and n for n in self.modules_to_save):
            raise ConfigError(f"{owner}.modules_to_save={self.modules_to_save!r}: give module names (non-empty "
                              "strings), e.g. ['classifier']")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write this config alone as `directory/polypeft_config.json` (peft's `LoraConfig.save_pretrained`);
        `from_pretrained` and `pp.load_config` read it back. Returns the file."""
        directory = Path(directory)
        existing = directory / CONFIG_FILE_NAME
        if existing.is_file() and "base_model" in (read_json_file(existing) or {}):
            raise ConfigError(f"{directory} holds a whole save (routes and the config that built them); writing a "
                              "config there would part the weights from their config: save the config elsewhere")
        directory.mkdir(parents=True, exist_ok=True)
        return write_json(directory / CONFIG_FILE_NAME, {"polypeft_version": __version__, "config": self.to_dict()})

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, Path], revision: Optional[str] = None,
                        **hub_options: Any) -> "MethodConfig":
        """The config in a folder (a config alone or a whole save), its polypeft_config.json, or a Hub repo id
        (`revision`, `cache_dir`, `token`, `local_files_only` go to huggingface_hub); every field checked.
        Called on a method's class it refuses another method's config; `pp.load_config` takes any method."""
        path = local_or_hub_file(name_or_path, CONFIG_FILE_NAME, revision, **hub_options)
        saved = read_json_file(path)
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise ConfigError(f"{path}: expected a polypeft config file, a JSON object with key 'config' (the method "
                              "config), as save_pretrained writes it")
        fields = dict(saved["config"])
        method = fields.pop("method", None)
        if not cls.method:
            raise ConfigError(f"{path} holds a {method!r} config: load it with pp.load_config({str(name_or_path)!r}) "
                              "or with the from_pretrained of that method's config class")
        if method != cls.method:
            raise ConfigError(f"{path} holds a {method!r} config, not {cls.method!r} ({cls.__name__}): load it with "
                              f"pp.load_config({str(name_or_path)!r})")
        return build(cls, fields, str(path))

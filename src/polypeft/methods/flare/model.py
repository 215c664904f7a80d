"""FLAREConfig and FLAREModel: LoRA on any HF model, fusing an English (source) pass into each bottleneck.

Without a source batch the model is plain LoRA; save/load keeps only the added weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...core.config import (ConfigError, Fraction, PositiveFloat, PositiveInt, Source, TypedConfig, build,
                            source_of)
from ...core.fileio import atomic_write, write_json
from ...core.modes import evaluation_mode
from ...core.fileio import copy_matching
from ...core.inject import find_targets, replace_targets, restore_base_layers
from .fusion import ALIGNMENTS, FUSIONS, build_fusion
from .source import MTSourceProjection, SourceCapture, encoder_hidden_size, source_module_name
from .layer import FusionSource, LoRALinear

SOURCES = ("model", "mt_encoder")
TASK_HEADS = ("classifier", "qa_outputs", "score")
# Keys a source batch may carry for training that its frozen pass must not see.
LABEL_KEYS = ("labels", "label", "start_positions", "end_positions")
CONFIG_FILE = "flare_config.json"
WEIGHTS_FILE = "flare_adapter.safetensors"


class FLAREError(ConfigError):
    """A FLARE configuration, batch or saved adapter that cannot be used."""


@dataclass
class FLAREConfig(TypedConfig):
    """LoRA with FLARE's bottleneck fusion.

    fusion=None is plain LoRA (FLARE's stage 1 and the LoRA baselines). alignment defaults to
    "position" ("attention" for fusion="cross_attention"). train_modules=None trains the task head
    the model has (classifier / qa_outputs / score) fully; [] trains only the adapters.
    """

    method: ClassVar[str] = "flare"
    error_type: ClassVar[type] = FLAREError
    rank: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Fraction = 0.0
    target_modules: Optional[Union[str, list[str]]] = None
    fusion: Optional[str] = "add_relu"
    source_layer_offset: int = 1
    source: str = "model"
    alignment: Optional[str] = None
    mt_hidden_size: Optional[PositiveInt] = None
    train_modules: Optional[list[str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = "FLAREConfig"
        if self.fusion is not None and self.fusion not in FUSIONS:
            raise FLAREError(f"{owner}.fusion={self.fusion!r} is not allowed; choose one of {list(FUSIONS)} or None")
        if self.source not in SOURCES:
            raise FLAREError(f"{owner}.source={self.source!r} is not allowed; choose one of {list(SOURCES)}")
        if self.alignment is None:
            self.alignment = "attention" if self.fusion == "cross_attention" else "position"
        if self.alignment not in ALIGNMENTS:
            raise FLAREError(f"{owner}.alignment={self.alignment!r} is not allowed; choose one of {list(ALIGNMENTS)}")
        if self.fusion == "cross_attention" and self.alignment != "attention":
            raise FLAREError(f"{owner}: fusion='cross_attention' aligns by attention; alignment={self.alignment!r} "
                             "is not allowed with it (leave alignment unset)")
        if self.target_modules is not None and not isinstance(self.target_modules, str) and not self.target_modules:
            raise FLAREError(f"{owner}.target_modules is an empty list; leave it None for the FFN defaults")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: Union[str, Source] = "FLARE config") -> "FLAREConfig":
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise FLAREError(f"{source_of(where).where() or where}: method={method!r}, expected {cls.method!r}")
        return build(cls, data, where)


def batch_size_of(batch: Mapping[str, Any], what: str) -> int:
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise FLAREError(f"{what} has no input_ids, inputs_embeds or attention_mask tensor; keys: {sorted(batch)}")


def resolve_train_modules(model: nn.Module, train_modules: Optional[list[str]]) -> list[str]:
    """Qualified names of the modules trained in full; None means the task head the model has."""
    names = dict(model.named_modules())
    if train_modules is None:
        return [n for n in TASK_HEADS if n in names]
    resolved = []
    for wanted in train_modules:
        matches = [n for n in names if n == wanted or n.endswith("." + wanted)]
        if not matches:
            raise FLAREError(f"FLAREConfig.train_modules names {wanted!r}, which {type(model).__name__} does not have")
        resolved.extend(matches)
    return resolved


class FLAREModel(nn.Module):
    """Wraps an HF model: `model(**target_batch, source_batch={...})` fuses the English pass.

    The base model's own weights are frozen. With source="model" the source batch runs through the
    base model with every adapter off and without gradients; with source="mt_encoder" it runs
    through the (frozen) MT encoder and a learned projection.
    """

    def __init__(self, base_model: nn.Module, config: FLAREConfig, mt_encoder: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        self.base_model = base_model
        self.requires_grad_before = {n: p.requires_grad for n, p in base_model.named_parameters()}
        base_model.requires_grad_(False)
        self.head_names = resolve_train_modules(base_model, config.train_modules)
        for name in self.head_names:
            base_model.get_submodule(name).requires_grad_(True)

        def wrap(name: str, linear: nn.Linear) -> LoRALinear:
            fusion = None if config.fusion is None else build_fusion(config.fusion, config.rank, config.alignment)
            return LoRALinear(linear, config.rank, config.alpha, config.dropout, fusion=fusion, name=name)

        self.lora_layers: dict[str, LoRALinear] = replace_targets(base_model, config.target_modules, wrap)
        if config.fusion is not None and config.source == "model":
            self.source_names = {
                name: source_module_name(base_model, name, config.source_layer_offset) for name in self.lora_layers
            }
        else:
            self.source_names = {}
        # Kept out of the module tree so the frozen MT encoder is neither saved nor handed to optimisers.
        self.__dict__["mt_encoder"] = mt_encoder
        self.mt_projection: Optional[MTSourceProjection] = None
        if config.fusion is not None and config.source == "mt_encoder":
            if mt_encoder is None:
                raise FLAREError("FLAREConfig.source='mt_encoder' needs FLAREModel(..., mt_encoder=<HF encoder>)")
            mt_encoder.requires_grad_(False)
            if config.mt_hidden_size is None:
                config.mt_hidden_size = encoder_hidden_size(mt_encoder)
            widths = {layer.in_features for layer in self.lora_layers.values()}
            device = next(base_model.parameters()).device
            self.mt_projection = MTSourceProjection(config.mt_hidden_size, widths).to(device)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, source_batch: Optional[Mapping[str, Any]] = None, **target_batch: Any) -> Any:
        if source_batch is None:
            return self.base_model(**target_batch)
        if self.config.fusion is None:
            raise FLAREError("this FLAREModel is plain LoRA (fusion=None); call it without source_batch")
        source_rows, target_rows = batch_size_of(source_batch, "source_batch"), batch_size_of(target_batch, "target batch")
        if source_rows != target_rows:
            raise FLAREError(
                f"source_batch has {source_rows} rows but the target batch has {target_rows}; FLARE pairs each "
                "target example with its English parallel example, so both batches need the same size"
            )
        sources = self.source_hidden(source_batch)
        source_mask = source_batch.get("attention_mask")
        target_mask = target_batch.get("attention_mask")
        with ExitStack() as stack:
            for name, layer in self.lora_layers.items():
                stack.enter_context(layer.fused_with(FusionSource(sources[name], source_mask, target_mask)))
            return self.base_model(**target_batch)

    def source_hidden(self, source_batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The source input of each adapted linear, by the adapted linear's name."""
        if self.config.source == "mt_encoder":
            return self.mt_source_hidden(source_batch)
        inputs = {k: v for k, v in source_batch.items() if k not in LABEL_KEYS}
        if getattr(getattr(self.base_model, "config", None), "use_cache", False):
            inputs["use_cache"] = False
        runner = self.source_runner()
        capture = SourceCapture(self.base_model, self.source_names.values())
        # The frozen English pass: no gradients, adapters off, and no dropout, so it is the same every time.
        with evaluation_mode(runner), self.adapters_disabled(), capture.recording() as captured:
            runner(**inputs)
        return {name: captured[source] for name, source in self.source_names.items()}

    def source_runner(self) -> nn.Module:
        """The backbone when it holds every source module (skips the task head), else the whole model."""
        backbone = getattr(self.base_model, "base_model", self.base_model)
        inside = {id(m) for m in backbone.modules()}
        needed = [self.base_model.get_submodule(n) for n in set(self.source_names.values())]
        return backbone if all(id(m) in inside for m in needed) else self.base_model

    def mt_source_hidden(self, source_batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in source_batch.items() if k in ("input_ids", "attention_mask", "inputs_embeds")}
        with evaluation_mode(self.mt_encoder):
            encoder_states = self.mt_encoder(**inputs)[0]
        by_width = {w: self.mt_projection(encoder_states, w) for w in {l.in_features for l in self.lora_layers.values()}}
        return {name: by_width[layer.in_features] for name, layer in self.lora_layers.items()}

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        with ExitStack() as stack:
            for layer in self.lora_layers.values():
                stack.enter_context(layer.disabled())
            yield

    # -- parameters, merge ------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the added and fully trained weights, under stable names."""
        state = {}
        for name, layer in self.lora_layers.items():
            state[f"lora.{name}.A"] = layer.lora_A
            state[f"lora.{name}.B"] = layer.lora_B
            if layer.fusion is not None:
                for key, value in layer.fusion.named_parameters():
                    state[f"fusion.{name}.{key}"] = value
        if self.mt_projection is not None:
            for key, value in self.mt_projection.named_parameters():
                state[f"mt_projection.{key}"] = value
        for head in self.head_names:
            for key, value in self.base_model.get_submodule(head).named_parameters():
                state[f"head.{head}.{key}"] = value
        return state

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter_state_dict().values())

    def num_adapter_parameters(self) -> int:
        """Parameters FLARE adds (LoRA, fusion, MT projection); fully trained heads not counted."""
        return sum(v.numel() for k, v in self.adapter_state_dict().items() if not k.startswith("head."))

    def merge_and_unload(self) -> nn.Module:
        """The base model with each LoRA update merged into W and the wrappers gone (plain LoRA only)."""
        for layer in self.lora_layers.values():
            layer.merge()
        restore_base_layers(self.base_model, self.lora_layers)
        for name, parameter in self.base_model.named_parameters():
            parameter.requires_grad_(self.requires_grad_before.get(name, True))
        return self.base_model

    # -- save / load ------------------------------------------------------------------------------

    def save_pretrained(self, path: str) -> None:
        """`flare_config.json` plus `flare_adapter.safetensors` of only the added weights."""
        os.makedirs(path, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.adapter_state_dict().items()}
        atomic_write(os.path.join(path, WEIGHTS_FILE), lambda target: save_file(tensors, target))
        record = {
            **self.config.to_dict(),
            "base_model_class": type(self.base_model).__name__,
            "adapted_layers": {n: [l.in_features, l.out_features] for n, l in self.lora_layers.items()},
        }

        write_json(os.path.join(path, CONFIG_FILE), record)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, path: str, mt_encoder: Optional[nn.Module] = None
    ) -> "FLAREModel":
        """Rebuild the adapters saved at `path` on `base_model`; says clearly what does not fit."""
        config_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FLAREError(f"{config_path} does not exist: not a saved FLARE adapter folder")
        with open(config_path, encoding="utf-8") as handle:
            record = json.load(handle)
        saved_class = record.pop("base_model_class", None)
        saved_layers = record.pop("adapted_layers", {})
        config = FLAREConfig.from_dict(record, where=config_path)
        present = {n: [m.in_features, m.out_features] for n, m in find_targets(base_model, config.target_modules)}
        if present != saved_layers:
            differing = sorted(set(present) ^ set(saved_layers)) + sorted(
                n for n in present if n in saved_layers and present[n] != saved_layers[n]
            )
            raise FLAREError(
                f"{path}: saved for {saved_class} with adapted layers that {type(base_model).__name__} does not "
                f"match; differing layers: {differing[:6]}"
            )
        model = cls(base_model, config, mt_encoder=mt_encoder)
        saved = load_file(os.path.join(path, WEIGHTS_FILE))
        copy_matching(model.adapter_state_dict(), saved, f"{path}: weights do not fit", error=FLAREError)
        return model

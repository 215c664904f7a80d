"""PEFT-format export: each polypeft route written as a LoRA adapter that peft, vLLM and LoRAX load.

An LMS route (src, tgt) is the LoRA `lora_A = F[tgt]`, `lora_B = V[src]` with `lora_alpha = r`.
"""
from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import __version__
from ..core.anatomy import is_encoder_decoder
from ..core.json_files import read_json_file
from ..core.fileio import is_temporary, write_json, write_safetensors
from ..core.finite import check_finite
from ..core.languages import SHARED, LanguageError
from ..core.transaction import folder_transaction
from .routed_model import RoutedModel
from .serving import SERVERS, not_served_lines, serving_reports, vllm_rank
from .trainable import saved_module_tensors

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
INDEX_NAME = "routes.json"
PEFT_PREFIX = "base_model.model."
LORA_FACTORS = ("lora_A", "lora_B")
MODULES_FILE_NAME = "modules_to_save.safetensors"  # the trained base modules (heads), once, beside the adapters
MAX_NAME_BYTES = 255  # the longest file name most file systems allow

# Base model class name endings -> PEFT task_type (decides which PeftModel subclass wraps the base).
TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("MTModel", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


class ExportError(ValueError):
    """A model or route that cannot be written as a PEFT LoRA adapter."""


class ServingWarning(UserWarning):
    """An export that a server (vLLM, LoRAX) will refuse, or serve with other outputs than polypeft's."""


def peft_key(module_name: str, factor: str) -> str:
    """PEFT's saved name of a LoRA factor (`lora_A` or `lora_B`) of module `module_name`."""
    return f"{PEFT_PREFIX}{module_name}.{factor}.weight"


def task_type_of(base_model: torch.nn.Module) -> str:
    name = type(base_model).__name__
    for ending, task_type in TASK_TYPES:
        if name.endswith(ending):
            return task_type
    return "SEQ_2_SEQ_LM" if is_encoder_decoder(base_model) else "FEATURE_EXTRACTION"


def check_low_rank(poly: RoutedModel) -> None:
    """Every routed layer must have LoRA factors: a layer whose `lora_factors` is None has no low-rank form."""
    if not poly.routed_layers:
        raise ExportError("this PolyModel was spent by merge_and_unload() or unload(): it has no routes to export")
    full_rank = sorted({type(layer).__name__ for layer in poly.routed_layers.values() if layer.lora_factors((0, 0)) is None})
    if full_rank:
        raise ExportError(
            f"method {poly.poly_config.method!r} cannot be exported as a LoRA adapter: its {', '.join(full_rank)} "
            "layers hold no low-rank update (full-rank weights, experts or gates). Serve one route of this model "
            "with merge_and_unload(src=..., tgt=...) where the method can merge"
        )


def lora_scale(poly: RoutedModel) -> tuple[int, float]:
    """(r, lora_alpha): LMS adds V F unscaled, so alpha = r; the LoRA baseline keeps its own alpha."""
    config = poly.poly_config
    return config.rank, float(getattr(config, "alpha", config.rank))


def route_factors(layer: torch.nn.Module, route: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of one layer for one (src, tgt) route id pair."""
    factors = layer.lora_factors(route)
    if factors is not None:
        return factors
    raise ExportError(f"{layer.layer_name}: a {type(layer).__name__} has no LoRA factors to export")


def short_target_names(poly: RoutedModel) -> list[str]:
    """PEFT's target_modules: last name parts when they select exactly the routed layers, else full names."""
    routed = set(poly.routed_layers)
    endings = sorted({name.rsplit(".", 1)[-1] for name in routed})
    selected = {name for name, _ in poly.base_model.named_modules() if name.rsplit(".", 1)[-1] in endings}
    return endings if selected == routed else sorted(routed)


def adapter_config(poly: RoutedModel, base_model_name_or_path: Optional[str] = None, with_modules: bool = True) -> dict:
    """The adapter_config.json PEFT, vLLM and LoRAX read for these routed layers (`with_modules` False: without
    the modules to save, which vLLM refuses and LoRAX does not load)."""
    rank, alpha = lora_scale(poly)
    name = base_model_name_or_path or getattr(getattr(poly.base_model, "config", None), "_name_or_path", None)
    return {
        "peft_type": "LORA",
        "task_type": task_type_of(poly.base_model),
        "base_model_name_or_path": name or None,
        "revision": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(getattr(poly.poly_config, "dropout", 0.0)),
        "target_modules": short_target_names(poly),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": (sorted(poly.saved_modules) or None) if with_modules else None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def peft_tensors(poly: RoutedModel, route: tuple[int, int], with_modules: bool = True) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, layer in poly.routed_layers.items():
        lora_a, lora_b = route_factors(layer, route)
        tensors[peft_key(name, "lora_A")] = lora_a
        tensors[peft_key(name, "lora_B")] = lora_b
    for name, tensor in saved_module_tensors(poly.saved_modules).items() if with_modules else ():
        tensors[PEFT_PREFIX + name] = tensor.detach()  # trained heads go with every route
    return tensors


def write_adapter(
    poly: RoutedModel, directory: str | Path, route: tuple[int, int], base_model_name_or_path: Optional[str] = None,
    with_modules: bool = True,
) -> Path:
    """Write one route as adapter_config.json + adapter_model.safetensors in `directory`."""
    directory = Path(directory)
    src, tgt = (poly.registry.code_of(i) for i in route)
    metadata = {"format": "pt", "polypeft_route": f"{src}->{tgt}", "polypeft_version": __version__}
    write_safetensors(directory / ADAPTER_WEIGHTS_NAME, peft_tensors(poly, route, with_modules), metadata=metadata)
    write_json(directory / ADAPTER_CONFIG_NAME, adapter_config(poly, base_model_name_or_path, with_modules))
    return directory


def route_ids(
    poly: RoutedModel,
    src_lang: Optional[str] = None,
    tgt_lang: Optional[str] = None,
    lang: Optional[str] = None,
    route: Optional[str] = None,
) -> tuple[int, int]:
    """One checked (src, tgt) id pair from exactly one of src_lang/tgt_lang, lang= or route=."""
    given = [name for name, value in (("lang", lang), ("route", route)) if value is not None]
    if src_lang is not None or tgt_lang is not None:
        given.append("src_lang/tgt_lang")
    if len(given) > 1:
        raise LanguageError(f"pass one of src_lang=/tgt_lang=, lang= or route=, not {' and '.join(given)}")
    single = lang if lang is not None else route
    if single is not None:
        src_lang = tgt_lang = single
    if src_lang is None and tgt_lang is None:
        if not poly.poly_config.language_agnostic:
            raise LanguageError(
                f"export_lora needs a route: lang=, src_lang=/tgt_lang= or route='shared'; known codes are "
                f"{poly.registry.allowed()}"
            )
        return 0, 0  # the layers ignore the route
    for where, value in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
        if value is not None and not isinstance(value, str):
            raise LanguageError(f"export_lora {where}={value!r}: one route is exported at a time; give one code")
    routes = poly.registry.routes(src_lang, tgt_lang)
    return int(routes.src[0]), int(routes.tgt[0])


def export_lora(
    poly: RoutedModel,
    directory: str | Path,
    src_lang: Optional[str] = None,
    tgt_lang: Optional[str] = None,
    lang: Optional[str] = None,
    route: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
) -> Path:
    """One route as a PEFT LoRA adapter; `peft.PeftModel.from_pretrained(base, directory)` runs it."""
    check_low_rank(poly)
    route_pair = route_ids(poly, src_lang, tgt_lang, lang, route)
    check_finite(poly.added_state_dict(), f"{directory} not exported")
    # One transaction: the adapter's weights never stand beside another export's config; other files stay.
    adapter_files = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
    with folder_transaction(directory, keep=lambda name: name not in adapter_files) as staging:
        write_adapter(poly, staging, route_pair, base_model_name_or_path)
    return Path(directory)


def routes_to_export(
    poly: RoutedModel, pairs: Optional[Sequence[tuple[str, str]]] = None
) -> list[tuple[str, tuple[int, int]]]:
    """(name, route ids) of every route: one per language (language-wise), every pair or `pairs` (pair-wise)."""
    config, registry = poly.poly_config, poly.registry
    if config.language_agnostic:
        return [(config.method, (0, 0))]
    if pairs is not None:
        chosen = [(src, tgt) for src, tgt in pairs]
    elif getattr(config, "synthesis", "pair") == "language":
        chosen = [(code, code) for code in registry.languages]
    else:
        chosen = [(src, tgt) for src in registry.languages for tgt in registry.languages]
    if registry.shared_route and (SHARED, SHARED) not in chosen:
        chosen.append((SHARED, SHARED))
    named = []
    for src, tgt in chosen:
        name = src if src == tgt else f"{src}-{tgt}"
        if not re.fullmatch(r"[\w.\-]+", name) or name in (".", "..") or len(name.encode()) > MAX_NAME_BYTES:
            raise ExportError(f"route {src}->{tgt} gives the adapter name {name!r}, which is not a safe folder name "
                              f"(letters, digits, '_', '.', '-'; at most {MAX_NAME_BYTES} bytes)")
        named.append((name, route_ids(poly, src, tgt)))
    names = [name for name, _ in named]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ExportError(f"pairs={list(pairs or [])} name the routes {duplicated} more than once")
    return named


def serving_commands(base: str, adapters: dict[str, Path], rank: int) -> dict[str, str]:
    """The vLLM and LoRAX command lines that serve every adapter of `adapters` on `base`."""
    max_rank = vllm_rank(rank) or rank
    modules = " ".join(shlex.quote(f"{name}={path}") for name, path in adapters.items())
    vllm = (f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {modules} "
            f"--max-lora-rank {max_rank} --max-loras {len(adapters)}")
    root = Path(next(iter(adapters.values()))).parent
    lorax = (f"docker run --gpus all --shm-size 1g -p 8080:80 -v {shlex.quote(str(root))}:/data/routes "
             f"ghcr.io/predibase/lorax:main --model-id {shlex.quote(base)}")
    first = next(iter(adapters))
    request = ("curl 127.0.0.1:8080/generate -X POST -H 'Content-Type: application/json' -d "
               + shlex.quote('{"inputs": "...", "parameters": {"adapter_id": "/data/routes/%s", '
                             '"adapter_source": "local"}}' % first))
    return {"vllm": vllm, "lorax": lorax, "lorax_request": request}


def export_lora_routes(
    poly: RoutedModel,
    directory: str | Path,
    pairs: Optional[Sequence[tuple[str, str]]] = None,
    base_model_name_or_path: Optional[str] = None,
    server: Optional[str] = None,
) -> Path:
    """Every route as its own adapter folder, plus routes.json: the index, the serving command lines and what vLLM
    and LoRAX will not serve (also said in a warning now). `server="vllm"` or `"lorax"` writes adapters that server
    takes and refuses what it cannot serve; the modules to save (a trained head) go beside the adapters either way."""
    check_low_rank(poly)
    if server is not None and server not in SERVERS:
        raise ExportError(f"server={server!r} is not known; choose None (PEFT adapters) or one of {list(SERVERS)}")
    directory = Path(directory).resolve()
    routes = routes_to_export(poly, pairs)
    with_modules = server is None
    reports = serving_reports(poly.base_model, adapter_config(poly, with_modules=with_modules), list(poly.routed_layers))
    if server is not None and reports[server]["refused"]:
        raise ExportError(f"{server} will not serve these routes: " + "; ".join(reports[server]["refused"]))
    check_earlier_export(directory)
    base = base_model_name_or_path or adapter_config(poly)["base_model_name_or_path"] or "<base model>"
    adapters, entries = {}, []
    # One transaction: routes.json never lists adapters of two exports, and an earlier export's adapters that
    # this one does not write (pairs before, languages now) go with it; nothing is written through its links.
    with folder_transaction(directory) as staging:
        for name, route in routes:
            write_adapter(poly, staging / name, route, base_model_name_or_path, with_modules)
            adapters[name] = directory / name
            src, tgt = (poly.registry.code_of(i) for i in route)
            entries.append({"name": name, "path": name, "src_lang": src, "tgt_lang": tgt})
        index = routes_index(poly, base, entries, adapters)
        index["servers"] = reports
        if poly.saved_modules:
            index["modules_to_save"] = write_saved_modules(poly, staging, server)
        write_json(staging / INDEX_NAME, index)
    lines = not_served_lines(reports if server is None else {server: reports[server]})
    if lines:
        warnings.warn(f"export to {directory}: " + " | ".join(lines), ServingWarning, stacklevel=3)
    return directory / INDEX_NAME


def write_saved_modules(poly: RoutedModel, staging: Path, server: Optional[str]) -> dict:
    """The modules to save (trained heads), once, under the base model's names, with a note on how to serve them."""
    tensors = {name: tensor.detach() for name, tensor in saved_module_tensors(poly.saved_modules).items()}
    write_safetensors(staging / MODULES_FILE_NAME, tensors, metadata={"format": "pt", "polypeft_version": __version__})
    where = ("inside every adapter as well (peft loads them from there)" if server is None else
             f"not inside the adapters, which {server} would refuse or ignore with them")
    return {"file": MODULES_FILE_NAME, "modules": sorted(poly.saved_modules),
            "note": f"the same for every route; {where}. To serve with vLLM or LoRAX, load this file into the base "
                    "(base.load_state_dict(safetensors.torch.load_file(file), strict=False)), save that base and serve "
                    "it with adapters exported with server='vllm' or 'lorax'"}


def routes_index(poly: RoutedModel, base: str, entries: list[dict], adapters: dict[str, Path]) -> dict:
    """routes.json: what was exported, from which model, and the command lines that serve it."""
    rank, alpha = lora_scale(poly)
    return {
        "polypeft_version": __version__,
        "method": poly.poly_config.method,
        "synthesis": getattr(poly.poly_config, "synthesis", None),
        "base_model": base,
        "base_class": type(poly.base_model).__name__,
        # Without freeze_base the routes were trained together with the base weights: serve those.
        "base_weights_trained": not poly.poly_config.freeze_base,
        "r": rank,
        "lora_alpha": alpha,
        "routes": entries,
        "commands": serving_commands(base, adapters, rank),
    }


def check_earlier_export(directory: Path) -> None:
    """An export replaces its whole folder, so the folder must hold nothing but an earlier export: the entries
    its routes.json lists, or adapter folders. Anything else is the user's and is refused, never removed."""
    if not directory.is_dir():
        return
    listed: set[str] = {INDEX_NAME, MODULES_FILE_NAME}
    if (directory / INDEX_NAME).is_file():
        index = read_json_file(directory / INDEX_NAME)
        routes = index.get("routes") if isinstance(index, dict) else None
        if not isinstance(routes, list):
            raise ExportError(f"{directory / INDEX_NAME} is not an export's index (no list of routes); an export "
                              "replaces its whole folder: export into an empty folder or an earlier export's")
        listed |= {str(entry.get("path")) for entry in routes if isinstance(entry, dict)}
    foreign = sorted(entry.name for entry in directory.iterdir() if not is_temporary(entry.name)
                     and entry.name not in listed and not is_adapter_folder(entry))
    if foreign:
        raise ExportError(f"{directory} holds {foreign[:5]}, which no earlier export wrote; an export replaces its "
                          "whole folder, so it is refused here: export into an empty folder or an earlier export's")


def is_adapter_folder(entry: Path) -> bool:
    return entry.is_dir() and not entry.is_symlink() and (entry / ADAPTER_CONFIG_NAME).is_file()

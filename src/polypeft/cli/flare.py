"""`polypeft flare train|eval CONFIG.yaml`: the FLARE recipe on JSONL text-classification data.

Lines are {"text", "label"} (English stage 1) or {"text", "source_text", "label"} (target + English).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from typing import Any, Optional

import torch
import yaml

from ..methods.flare.recipe import RECIPES, TrainedRecipe, StageSettings, run_recipe
from ..core.inject import replace_targets, restore_base_layers
from ..core.fileio import write_json
from ..methods.flare.model import FLAREConfig, FLAREError, FLAREModel

CONFIG_KEYS = ("model", "mt_model", "target_lang", "data", "recipe", "flare", "stage1_lora", "stage1", "stage2",
               "output_dir")


def read_yaml(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        try:
            config = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise FLAREError(f"{path}: not valid YAML ({error})") from None
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise FLAREError(f"{path}: unknown keys {unknown}; allowed keys are {list(CONFIG_KEYS)}")
    for required in ("model", "data", "output_dir"):
        if required not in config:
            raise FLAREError(f"{path}: missing key {required!r}")
    recipe = config.setdefault("recipe", "flare")
    if recipe not in RECIPES:
        raise FLAREError(f"{path}: recipe={recipe!r} is not allowed; choose one of {list(RECIPES)}")
    if recipe == "flare_mt" and "mt_model" not in config:
        raise FLAREError(f"{path}: recipe 'flare_mt' needs mt_model: <encoder-decoder name or folder, or the "
                         "directory of a `polypeft mmt` run>")
    if recipe == "flare_mt" and is_polypeft_run(config["mt_model"]) and "target_lang" not in config:
        raise FLAREError(f"{path}: mt_model {config['mt_model']!r} is a polypeft translation run; say which "
                         "language its encoder should read English for, with target_lang: <code>")
    return config


def is_polypeft_run(path: str) -> bool:
    return os.path.isfile(os.path.join(str(path), "recipe.json"))


def read_jsonl(path: str, needs_source: bool) -> list[dict[str, Any]]:
    """Examples from a JSONL file; a bad line is named by file and line number."""
    examples = []
    needed = ("text", "source_text", "label") if needs_source else ("text", "label")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                raise FLAREError(f"{path}:{number}: not valid JSON ({error})") from None
            missing = [k for k in needed if k not in example]
            if missing:
                raise FLAREError(f"{path}:{number}: missing {missing}; each line needs {list(needed)}")
            if not isinstance(example["label"], int):
                raise FLAREError(f"{path}:{number}: label={example['label']!r} must be an int class id")
            examples.append(example)
    if not examples:
        raise FLAREError(f"{path}: no examples")
    return examples


def batched(examples: list[dict], size: int) -> list[list[dict]]:
    return [examples[i:i + size] for i in range(0, len(examples), size)]


def encode(tokenizer: Any, texts: list[str], max_length: int, prefix: str = "") -> dict[str, torch.Tensor]:
    return dict(tokenizer([prefix + t for t in texts], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))


class Data:
    """The YAML `data:` block turned into tokenised batches."""

    def __init__(self, block: dict, tokenizer: Any, source_tokenizer: Any):
        self.block, self.tokenizer, self.source_tokenizer = block, tokenizer, source_tokenizer
        self.size, self.max_length = int(block.get("batch_size", 16)), int(block.get("max_length", 128))
        self.prefix = block.get("prefix", "")

    def english(self) -> list[dict[str, torch.Tensor]]:
        batches = []
        for chunk in batched(read_jsonl(self.block["english_train"], needs_source=False), self.size):
            batch = encode(self.tokenizer, [e["text"] for e in chunk], self.max_length, self.prefix)
            batches.append({**batch, "labels": torch.tensor([e["label"] for e in chunk])})
        return batches

    def parallel(self, key: str) -> list[tuple[dict, dict]]:
        pairs = []
        for chunk in batched(read_jsonl(self.block[key], needs_source=True), self.size):
            target = encode(self.tokenizer, [e["text"] for e in chunk], self.max_length, self.prefix)
            target["labels"] = torch.tensor([e["label"] for e in chunk])
            source_prefix = self.prefix if self.source_tokenizer is self.tokenizer else ""
            source = encode(self.source_tokenizer, [e["source_text"] for e in chunk], self.max_length, source_prefix)
            pairs.append((target, source))
        return pairs


def load_models(config: dict, base_path: Optional[str] = None) -> tuple[Any, Any, Any, Any]:
    """Base classifier, its tokenizer, and for FLARE-MT the MT encoder and its tokenizer."""
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

    block = config["model"]
    name = base_path or block["name_or_path"]
    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=int(block.get("num_labels", 2)))
    tokenizer = AutoTokenizer.from_pretrained(block.get("tokenizer", block["name_or_path"]))
    mt_encoder, mt_tokenizer = None, tokenizer
    if config["recipe"] == "flare_mt" and is_polypeft_run(config["mt_model"]):
        from ..tasks.translation.run import translation_encoder

        mt_encoder, mt_tokenizer = translation_encoder(config["mt_model"], config["target_lang"])
    elif config["recipe"] == "flare_mt":
        mt_encoder = AutoModelForSeq2SeqLM.from_pretrained(config["mt_model"]).get_encoder().eval()
        mt_tokenizer = AutoTokenizer.from_pretrained(config["mt_model"])
    return model, tokenizer, mt_encoder, mt_tokenizer


def settings_from(block: Optional[dict], where: str) -> StageSettings:
    block = dict(block or {})
    allowed = {f.name for f in fields(StageSettings)}
    unknown = sorted(set(block) - allowed)
    if unknown:
        raise FLAREError(f"{where}: unknown keys {unknown}; allowed keys are {sorted(allowed)}")
    return StageSettings(**block)


def train_command(args: argparse.Namespace) -> None:
    config = read_yaml(args.config)
    model, tokenizer, mt_encoder, mt_tokenizer = load_models(config)
    data = Data(config["data"], tokenizer, mt_tokenizer)
    stage2_config = FLAREConfig.from_dict(config.get("flare", {}), where=f"{args.config}: flare")
    stage1_config = FLAREConfig.from_dict(config.get("stage1_lora", config.get("flare", {})),
                                          where=f"{args.config}: stage1_lora")
    trained = run_recipe(model, config["recipe"], data.english(), data.parallel("target_train"), stage1_config,
                         stage2_config, settings_from(config.get("stage1"), f"{args.config}: stage1"),
                         settings_from(config.get("stage2"), f"{args.config}: stage2"), mt_encoder=mt_encoder,
                         pad_token_id=tokenizer.pad_token_id or 0)
    save_trained(trained, config["output_dir"])
    print(f"saved {config['recipe']} to {config['output_dir']}")


def save_trained(trained: TrainedRecipe, output_dir: str) -> None:
    """The stage-1 merged model in full, the stage-2 adapter alone, and which recipe made them."""
    os.makedirs(output_dir, exist_ok=True)
    if isinstance(trained.model, FLAREModel):
        trained.model.save_pretrained(os.path.join(output_dir, "adapter"))
        base = trained.model.base_model
        # The merged stage-1 weights sit under the stage-2 wrappers; save them without the wrappers.
        restore_base_layers(base, trained.model.lora_layers)
        base.save_pretrained(os.path.join(output_dir, "stage1_merged"))
        replace_targets(base, list(trained.model.lora_layers), lambda name, linear: trained.model.lora_layers[name])
    else:
        trained.model.save_pretrained(os.path.join(output_dir, "stage1_merged"))
    write_json(os.path.join(output_dir, "recipe.json"), {"recipe": trained.recipe})


def evaluate_command(args: argparse.Namespace) -> None:
    config = read_yaml(args.config)
    output_dir = config["output_dir"]
    with open(os.path.join(output_dir, "recipe.json"), encoding="utf-8") as handle:
        recipe = json.load(handle)["recipe"]
    model, tokenizer, mt_encoder, mt_tokenizer = load_models(config, os.path.join(output_dir, "stage1_merged"))
    if recipe != "zero_shot":
        model = FLAREModel.from_pretrained(model, os.path.join(output_dir, "adapter"), mt_encoder=mt_encoder)
    trained = TrainedRecipe(recipe, model.eval(), tokenizer.pad_token_id or 0)
    data = Data(config["data"], tokenizer, mt_tokenizer)
    correct = total = 0
    with torch.no_grad():
        for target, source in data.parallel("eval"):
            labels = target.pop("labels")
            predictions = trained(target, source).logits.argmax(-1)
            correct += int((predictions == labels).sum())
            total += len(labels)
    metrics = {"recipe": recipe, "accuracy": correct / total, "examples": total}
    write_json(os.path.join(output_dir, "metrics.json"), metrics)
    print(json.dumps(metrics))


def add_cli(subparsers: Any) -> None:
    """Register `flare train CONFIG` and `flare eval CONFIG` under the main `polypeft` parser."""
    flare = subparsers.add_parser("flare", help="FLARE: LoRA with English fused into the bottleneck")
    commands = flare.add_subparsers(dest="flare_command", required=True)
    train = commands.add_parser("train", help="stage 1 (English LoRA, merged) and the recipe's stage 2")
    train.add_argument("config", help="YAML recipe file")
    train.set_defaults(func=train_command)
    evaluate = commands.add_parser("eval", help="accuracy of a trained recipe on data.eval")
    evaluate.add_argument("config", help="the YAML file it was trained with")
    evaluate.set_defaults(func=evaluate_command)

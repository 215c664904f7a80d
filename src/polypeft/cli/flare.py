"""`polypeft flare train|eval CONFIG.yaml`: the FLARE recipe on JSONL text-classification data.

Lines are {"text", "label"} (English stage 1) or {"text", "source_text", "label"} (target + English).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any, Optional

from .recipes import add_recipe_arguments, load_recipe

if TYPE_CHECKING:
    import torch

    from ..experiments.flare_recipe import TrainedRecipe
    from .flare_recipe import FlareDataBlock, FlareRecipe


def read_yaml(path: str, pairs: Optional[list[str]] = None) -> "FlareRecipe":
    """The checked FLARE recipe of a YAML file (with `--set` pairs): every block typed, files and folder checked."""
    from ..methods.flare.layer import FLAREError
    from .flare_recipe import FlareRecipe

    return load_recipe(FlareRecipe, path, pairs, error_type=FLAREError)


def read_jsonl(path: str, needs_source: bool) -> list[dict[str, Any]]:
    """Examples from a JSONL file; a bad line is named by file and line number."""
    from ..methods.flare.layer import FLAREError

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


def encode(tokenizer: Any, texts: list[str], max_length: int, prefix: str = "") -> dict[str, "torch.Tensor"]:
    return dict(tokenizer([prefix + t for t in texts], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))


class Data:
    """The recipe's `data:` block turned into tokenised batches."""

    def __init__(self, recipe: "FlareRecipe", tokenizer: Any, source_tokenizer: Any):
        self.recipe, self.tokenizer, self.source_tokenizer = recipe, tokenizer, source_tokenizer
        block: FlareDataBlock = recipe.data
        self.size, self.max_length, self.prefix = block.batch_size, block.max_length, block.prefix

    def english(self) -> list[dict[str, "torch.Tensor"]]:
        import torch

        batches = []
        for chunk in batched(read_jsonl(self.recipe.data_file("english_train"), needs_source=False), self.size):
            batch = encode(self.tokenizer, [e["text"] for e in chunk], self.max_length, self.prefix)
            batches.append({**batch, "labels": torch.tensor([e["label"] for e in chunk])})
        return batches

    def parallel(self, key: str, english: Optional[list[str]] = None,
                 with_english: bool = True) -> list[tuple[dict, Optional[dict]]]:
        """(target, English) batch pairs; `english` (one text per line, a machine translation) replaces the
        file's source_text; without English the pairs are (target, None) and the file needs no source_text."""
        import torch

        examples = read_jsonl(self.recipe.data_file(key), needs_source=with_english and english is None)
        if english is not None:
            examples = [{**example, "source_text": text} for example, text in zip(examples, english, strict=True)]
        pairs = []
        for chunk in batched(examples, self.size):
            target = encode(self.tokenizer, [e["text"] for e in chunk], self.max_length, self.prefix)
            target["labels"] = torch.tensor([e["label"] for e in chunk])
            source = None
            if with_english:
                source_prefix = self.prefix if self.source_tokenizer is self.tokenizer else ""
                source = encode(self.source_tokenizer, [e["source_text"] for e in chunk], self.max_length,
                                source_prefix)
            pairs.append((target, source))
        return pairs

    def translated_english(self, key: str) -> list[str]:
        """The file's texts translated into English by the recipe's translation run."""
        from ..tasks.translation.translator import Translator

        texts = [e["text"] for e in read_jsonl(self.recipe.data_file(key), needs_source=False)]
        return Translator(self.recipe.translation_run)(texts, self.recipe.target_lang)


def load_models(recipe: "FlareRecipe", base_path: Optional[str] = None) -> tuple[Any, Any, Any, Any]:
    """Base classifier, its tokenizer, and for FLARE-MT the MT encoder and its tokenizer."""
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

    from .flare_recipe import is_polypeft_run

    block = recipe.model
    name = base_path or block.name_or_path
    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=block.num_labels)
    tokenizer = AutoTokenizer.from_pretrained(block.tokenizer or block.name_or_path)
    mt_encoder, mt_tokenizer = None, tokenizer
    if recipe.recipe == "flare_mt" and is_polypeft_run(recipe.mt_model):
        from ..tasks.translation.mt_encoder import translation_encoder

        mt_encoder, mt_tokenizer = translation_encoder(recipe.mt_model, recipe.target_lang)
    elif recipe.recipe == "flare_mt":
        mt_encoder = AutoModelForSeq2SeqLM.from_pretrained(recipe.mt_model).get_encoder().eval()
        mt_tokenizer = AutoTokenizer.from_pretrained(recipe.mt_model)
    return model, tokenizer, mt_encoder, mt_tokenizer


def train_command(args: argparse.Namespace) -> None:
    from ..experiments.flare_recipe import STAGE1_ONLY, run_recipe

    recipe = read_yaml(args.config, getattr(args, "set", None))
    model, tokenizer, mt_encoder, mt_tokenizer = load_models(recipe)
    data = Data(recipe, tokenizer, mt_tokenizer)
    pairs = [] if recipe.recipe in STAGE1_ONLY else data.parallel("target_train")
    trained = run_recipe(model, recipe.recipe, data.english(), pairs, recipe.stage1_config,
                         recipe.flare, recipe.stage1, recipe.stage2, mt_encoder=mt_encoder,
                         pad_token_id=tokenizer.pad_token_id or 0, x_mixup=recipe.x_mixup)
    save_trained(trained, recipe.output_dir)
    print(f"saved {recipe.recipe} to {recipe.output_dir}")


def save_trained(trained: "TrainedRecipe", output_dir: str) -> None:
    """The stage-1 merged model in full, the stage-2 adapter alone, and which recipe made them; a stage-2 model
    is spent afterwards (its layers are taken out)."""
    from ..core.fileio import write_json
    from ..model.poly_model import PolyModel

    os.makedirs(output_dir, exist_ok=True)
    if isinstance(trained.model, PolyModel):
        trained.model.save_pretrained(os.path.join(output_dir, "adapter"))
        # The merged stage-1 weights sit under the stage-2 layers: taken out, they save under the base's own
        # names (saved in place, every adapted linear's weight would be named `...base_layer.weight` and not load).
        trained.model.unload().save_pretrained(os.path.join(output_dir, "stage1_merged"))
    else:
        trained.model.save_pretrained(os.path.join(output_dir, "stage1_merged"))
    write_json(os.path.join(output_dir, "recipe.json"), {"recipe": trained.recipe})


def stored_recipe(config: "FlareRecipe") -> str:
    """The recipe the folder was trained with (its recipe.json), refused when the eval file names another: what
    is read at test time (English or not) follows the recipe, so the two must agree."""
    from ..methods.flare.layer import FLAREError

    with open(os.path.join(config.output_dir, "recipe.json"), encoding="utf-8") as handle:
        recipe = json.load(handle)["recipe"]
    if recipe != config.recipe:
        raise FLAREError(f"recipe={config.recipe!r} in the eval file, but output_dir={config.output_dir!r} was trained "
                         f"with recipe={recipe!r} (its recipe.json): evaluate it with the file it was trained with")
    return recipe


def output_name(stem: str, suffix: str, english_at_test: Optional[str]) -> str:
    """An eval output's file name; a recipe that reads English at test keeps one per English side
    (`metrics_gold.json`, `metrics_translated.json`), so scoring one side never replaces the other."""
    return f"{stem}_{english_at_test}{suffix}" if english_at_test else f"{stem}{suffix}"


def evaluate_command(args: argparse.Namespace) -> None:
    import torch

    from ..core.fileio import write_json, write_text
    from ..experiments.flare_recipe import READS_ENGLISH_AT_TEST, STAGE1_ONLY, TrainedRecipe, result_name
    from ..model.poly_model import PolyModel

    config = read_yaml(args.config, getattr(args, "set", None))
    output_dir = config.output_dir
    recipe = stored_recipe(config)
    model, tokenizer, mt_encoder, mt_tokenizer = load_models(config, os.path.join(output_dir, "stage1_merged"))
    if recipe not in STAGE1_ONLY:
        model = PolyModel.from_pretrained(model, os.path.join(output_dir, "adapter"), source_encoder=mt_encoder)
    trained = TrainedRecipe(recipe, model.eval(), tokenizer.pad_token_id or 0)
    data = Data(config, tokenizer, mt_tokenizer)
    reads_english = recipe in READS_ENGLISH_AT_TEST
    side = config.english_at_test if reads_english else None
    english = None
    if side == "translated":
        english = data.translated_english("eval")
        # Kept beside the metrics, so the translations the score rests on can be read.
        write_text(os.path.join(output_dir, "english_at_test.jsonl"),
                   "".join(json.dumps({"english": text}, ensure_ascii=False) + "\n" for text in english))
    rows = []
    with torch.no_grad():
        for target, source in data.parallel("eval", english, with_english=reads_english):
            labels = target.pop("labels")
            predictions = trained(target, source).logits.argmax(-1)
            rows += [{"prediction": int(p), "label": int(l)} for p, l in zip(predictions, labels)]
    # One line per example, in the file's order: what a paired comparison of two recipes reads.
    write_text(os.path.join(output_dir, output_name("predictions", ".jsonl", side)),
               "".join(json.dumps(row) + "\n" for row in rows))
    correct = sum(row["prediction"] == row["label"] for row in rows)
    metrics = {"recipe": recipe, "name": result_name(recipe, config.english_at_test), "accuracy": correct / len(rows),
               "examples": len(rows)}
    if reads_english:
        metrics["english_at_test"] = side
    write_json(os.path.join(output_dir, output_name("metrics", ".json", side)), metrics)
    print(json.dumps(metrics))


def add_cli(subparsers: Any) -> None:
    """Register `flare train CONFIG` and `flare eval CONFIG` under the main `polypeft` parser."""
    flare = subparsers.add_parser("flare", help="FLARE: LoRA with English fused into the bottleneck")
    commands = flare.add_subparsers(dest="flare_command", required=True)
    train = commands.add_parser("train", help="stage 1 (English LoRA, merged) and the recipe's stage 2")
    add_recipe_arguments(train, "YAML recipe file")
    train.set_defaults(func=train_command)
    evaluate = commands.add_parser("eval", help="accuracy of a trained recipe on data.eval")
    add_recipe_arguments(evaluate, "the YAML file it was trained with")
    evaluate.set_defaults(func=evaluate_command)

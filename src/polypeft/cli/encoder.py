"""The `polypeft encode|retrieve|classify` commands on any HF encoder (e5-small offline by default).

Each reads a YAML recipe (`--set key=value` overrides keys) and writes JSON and Markdown under `output_dir`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional

from ..core.config import (ConfigError, Fraction, LanguageList, NonNegativeInt, PositiveFloat, PositiveInt,
                           TypedConfig)
from ..training.settings import TrainSettings
from .recipes import add_recipe_arguments, check_input_file, check_output_dir, load_recipe

BIBLE_LANGUAGES = ["en", "fr", "es", "de", "ru", "ar", "ko"]


def _load(model: str):
    from ..backbones.e5 import load_encoder

    return load_encoder(model)


# ----------------------------------------------------------------------------- encode

@dataclass
class EncodeRecipe(TypedConfig):
    """Embed a text file (one text per line) into a safetensors file holding `embeddings` (lines x hidden)."""

    input: str = ""
    output: str = "embeddings.safetensors"
    model: str = "e5-small"
    prefix: str = "passage: "
    layer: Optional[int] = None  # hidden-state index; None = last layer
    pooling: Literal["mean", "cls"] = "mean"
    batch_size: PositiveInt = 32
    max_length: Optional[PositiveInt] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.input:
            raise ConfigError("encode: 'input' (a text file, one text per line) is required")

    def check_paths(self) -> None:
        check_input_file(self.input, "encode: input")
        check_output_dir(Path(self.output).parent, "encode: the folder of output")

    def input_paths(self) -> dict[str, str]:
        return {"encode: input": self.input}

    def output_paths(self) -> dict[str, tuple[str, str]]:
        return {"encode: output": (self.output, "file")}


def run_encode(recipe: EncodeRecipe) -> dict[str, Any]:
    from ..core.fileio import write_safetensors
    from ..backbones.e5 import embed

    source = Path(recipe.input)
    if not source.is_file():
        raise ConfigError(f"encode: input file {recipe.input!r} does not exist")
    texts = source.read_text(encoding="utf-8").splitlines()
    empty = [number for number, text in enumerate(texts, 1) if not text.strip()]
    if empty:
        raise ConfigError(f"{recipe.input} line {empty[0]}: empty line ({len(empty)} in all); one text per line")
    model, tokenizer = _load(recipe.model)
    embeddings = embed(model, tokenizer, texts, prefix=recipe.prefix, layer=recipe.layer, pooling=recipe.pooling,
                       batch_size=recipe.batch_size, max_length=recipe.max_length, progress=True)
    metadata = {"model": recipe.model, "input": recipe.input, "layer": str(recipe.layer), "pooling": recipe.pooling,
                "prefix": recipe.prefix}
    write_safetensors(Path(recipe.output), {"embeddings": embeddings.contiguous()}, metadata=metadata)
    return {"texts": len(texts), "dimension": int(embeddings.shape[1]), "output": recipe.output}


# ----------------------------------------------------------------------------- retrieve

@dataclass
class RetrieveRecipe(TypedConfig):
    """Retrieval xx -> pivot accuracy@1 per language and layer: Bible verses of `books`, or bitext files."""

    model: str = "e5-small"
    languages: LanguageList = field(default_factory=lambda: list(BIBLE_LANGUAGES))
    pivot: str = "en"
    books: list[int] = field(default_factory=lambda: [43])
    max_verses: Optional[PositiveInt] = None
    bitext: dict[str, str] = field(default_factory=dict)  # lang -> JSONL/TSV with `source` (lang) and `target` (pivot)
    layers: Optional[list[NonNegativeInt]] = None  # hidden-state indices; None = every layer
    prefix: str = "query: "
    batch_size: PositiveInt = 32
    output_dir: str = "runs/retrieve"

    def check_paths(self) -> None:
        for lang, path in self.bitext.items():
            check_input_file(path, f"retrieve: bitext.{lang}")
        check_output_dir(self.output_dir, "retrieve: output_dir")

    def input_paths(self) -> dict[str, str]:
        return {f"retrieve: bitext.{lang}": path for lang, path in self.bitext.items()}

    def output_paths(self) -> dict[str, tuple[str, str]]:
        return {"retrieve: output_dir": (self.output_dir, "folder")}


def run_retrieve(recipe: RetrieveRecipe) -> dict[str, Any]:
    from ..experiments.bible_eval import mean_over_languages, verse_retrieval
    from ..tasks.retrieval import bitext_retrieval, read_bitext

    model, tokenizer = _load(recipe.model)
    layers = recipe.layers if recipe.layers is not None else list(range(model.config.num_hidden_layers + 1))
    if recipe.bitext:
        scores = {}
        for lang, path in recipe.bitext.items():
            sources, targets = read_bitext(path)
            scores[lang] = bitext_retrieval(model, tokenizer, sources, targets, layers, prefix=recipe.prefix,
                                            batch_size=recipe.batch_size)
        source = {"bitext": recipe.bitext}
    else:
        scores = verse_retrieval(model, tokenizer, recipe.languages, recipe.pivot, recipe.books, layers,
                                 prefix=recipe.prefix, max_verses=recipe.max_verses, batch_size=recipe.batch_size)
        source = {"bible_books": recipe.books, "max_verses": recipe.max_verses}
    table = {lang: {str(layer): round(100 * value, 2) for layer, value in per_layer.items()}
             for lang, per_layer in scores.items()}
    table["average"] = {str(layer): round(100 * value, 2) for layer, value in mean_over_languages(scores).items()}
    return {"model": recipe.model, "pivot": recipe.pivot, "source": source, "layers": layers,
            "accuracy_at_1": table}


def retrieval_markdown(results: dict[str, Any]) -> str:
    layers = [str(layer) for layer in results["layers"]]
    lines = [f"Retrieval xx -> {results['pivot']} accuracy@1 (%) per hidden-state layer, {results['model']}", "",
             "| language | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for lang, per_layer in results["accuracy_at_1"].items():
        lines.append(f"| {lang} | " + " | ".join(f"{per_layer[layer]:.1f}" for layer in layers) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- classify

def classify_schedule(**changes: Any) -> TrainSettings:
    """The fine-tune's optimisation (`FinetuneSettings.training`: AdamW, linear warm-up and decay, clipping at 1)
    at the classify recipe's length and rate; warm-up left null is a tenth of the steps, as `steps` changes."""
    return TrainSettings(**{"steps": 300, "lr": 2e-4, "warmup": None, "schedule": "linear", "betas": (0.9, 0.999),
                            "clip_norm": 1.0, "seed": None, **changes})


@dataclass
class ClassifyRecipe(TypedConfig):
    """Fine-tune an encoder for classification with naive / LMS / LMS+FD and score every language.

    Data: the Bible canon-section task (default), or `files` = {"train": {lang: path}, "test": {lang: path}}
    in the classification reader's JSONL/TSV format. `train_languages: [en]` is zero-shot transfer;
    `lirp_at_test` adds LRP2 at test time (LIRP on the cached states at layer `frozen_layers`).
    `valid_fraction` holds verses out of training; `score: valid` scores them and leaves the test split unread,
    so settings are chosen on the valid split and the test split is scored once, with the same training verses.
    `training` is the optimisation (warm-up null: a tenth of the steps); `seeds` seed the runs, so its seed stays null.
    """

    # Recipes written before the training block say steps, lr and warmup at the top; they move into it.
    moved_keys: ClassVar[Mapping[str, str]] = {key: f"training.{key}" for key in ("steps", "lr", "warmup")}
    model: str = "e5-small"
    languages: LanguageList = field(default_factory=lambda: list(BIBLE_LANGUAGES))
    train_languages: Optional[list[str]] = None
    methods: list[Literal["naive", "lms", "lms_fd"]] = field(default_factory=lambda: ["naive", "lms", "lms_fd"])
    seeds: list[NonNegativeInt] = field(default_factory=lambda: [0])
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    verses_per_section: Optional[PositiveInt] = 100
    test_fraction: Fraction = 0.3
    valid_fraction: Fraction = 0.0
    score: Literal["test", "valid"] = "test"
    training: TrainSettings = field(default_factory=classify_schedule)
    batch_size: PositiveInt = 32
    route_lr: Optional[PositiveFloat] = 2e-3  # the LMS routes' rate; null: training.lr
    rank: PositiveInt = 8
    max_length: PositiveInt = 48
    frozen_layers: NonNegativeInt = 10
    prefix: str = "query: "
    throughput_steps: NonNegativeInt = 0  # > 0: also measure training examples/s of each method, interleaved
    lirp_at_test: bool = False  # also score with LRP2's LIRP at the first trained layer ("<variant>+lirp")
    pivot: str = "en"
    output_dir: str = "runs/classify"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.training.seed is not None:
            raise ConfigError(f"training.seed={self.training.seed} would seed every run of `seeds` alike; the runs "
                              "take their seeds from `seeds`: leave training.seed null")
        if self.lirp_at_test and self.frozen_layers <= 0:
            raise ConfigError("classify: lirp_at_test applies LIRP at the cache boundary; it needs frozen_layers > 0")
        if self.lirp_at_test and self.pivot not in self.languages:
            raise ConfigError(f"classify: pivot {self.pivot!r} is not among languages {self.languages}")
        if self.files and set(self.files) != {"train", "test"}:
            raise ConfigError(f"classify: files has parts {sorted(self.files)}; it needs exactly 'train' and 'test'")
        if self.files and (self.valid_fraction or self.score == "valid"):
            raise ConfigError(f"classify: valid_fraction={self.valid_fraction}, score={self.score!r} split the Bible "
                              "task; with `files`, give the valid split's files as `test`")
        if self.score == "valid" and not self.valid_fraction:
            raise ConfigError("classify: score='valid' needs valid_fraction > 0 (now 0.0)")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ConfigError(f"classify: valid_fraction={self.valid_fraction} + test_fraction={self.test_fraction} "
                              "leave no training verses; together they must be below 1")

    def check_paths(self) -> None:
        for part, by_language in self.files.items():
            for lang, path in by_language.items():
                check_input_file(path, f"classify: files.{part}.{lang}")
        check_output_dir(self.output_dir, "classify: output_dir")

    def input_paths(self) -> dict[str, str]:
        return {f"classify: files.{part}.{lang}": path for part, files in self.files.items()
                for lang, path in files.items()}

    def output_paths(self) -> dict[str, tuple[str, str]]:
        return {"classify: output_dir": (self.output_dir, "folder")}


def classification_data(recipe: ClassifyRecipe) -> tuple[dict, dict, list[str]]:
    """`(train, scored, label_names)`, each split a mapping language -> ClassificationData.

    `scored` is the test split, or the valid split when the recipe says `score: valid`."""
    from ..experiments.bible_eval import SECTION_NAMES, verse_classification
    from ..tasks.classification import read_classification

    if not recipe.files:
        data = verse_classification(recipe.languages, valid_fraction=recipe.valid_fraction,
                                    test_fraction=recipe.test_fraction,
                                    max_verses_per_section=recipe.verses_per_section, seed=0)
        return data["train"], data[recipe.score], list(SECTION_NAMES)
    splits: dict[str, dict] = {}
    label_names: Optional[list[str]] = None
    for part in ("train", "test"):
        missing = [lang for lang in recipe.languages if lang not in recipe.files[part]]
        if part == "test" and missing:
            raise ConfigError(f"classify: files.test has no file for languages {missing}")
        splits[part] = {}
        for lang, path in recipe.files[part].items():
            splits[part][lang] = read_classification(path, label_names=label_names)
            label_names = splits[part][lang].label_names
    return splits["train"], splits["test"], list(label_names or [])


def finetune_settings(recipe: ClassifyRecipe):
    """The fine-tuning settings a classify recipe stands for, its warm-up resolved (a null one: a tenth of the
    steps), so the throughput measurement's shorter runs keep the full run's rate."""
    from ..tasks import encoder_finetune as ef

    training = dataclasses.replace(recipe.training, warmup=recipe.training.warmup_steps)
    return ef.FinetuneSettings.from_values(training=training, batch_size=recipe.batch_size, route_lr=recipe.route_lr,
                                           max_length=recipe.max_length, frozen_layers=recipe.frozen_layers,
                                           rank=recipe.rank, prefix=recipe.prefix)


def run_classify(recipe: ClassifyRecipe) -> dict[str, Any]:
    from ..tasks import encoder_finetune as ef

    started = time.time()
    model, tokenizer = _load(recipe.model)
    train_data, test_data, label_names = classification_data(recipe)
    settings = finetune_settings(recipe)
    train = ef.encode_examples(model, tokenizer, train_data, settings.max_length, settings.frozen_layers,
                               prefix=settings.prefix)
    test = ef.encode_examples(model, tokenizer, test_data, settings.max_length, settings.frozen_layers,
                              prefix=settings.prefix)
    spec = ef.ExperimentSpec(list(recipe.languages), recipe.train_languages, list(recipe.methods),
                             list(recipe.seeds), "zero-shot" if recipe.train_languages else "multilingual")
    variants = {}
    if recipe.lirp_at_test:  # language vectors from the (unlabeled) training texts of every language
        variants["+lirp"] = ef.lirp_shifted(test, ef.language_means(train), recipe.pivot)
    results = ef.run_experiment(model, spec, settings, train, test, label_names, test_variants=variants)
    if recipe.throughput_steps > 0:
        classifiers = {m: ef.build_classifier(model, label_names, recipe.languages, settings.replaced(method=m))
                       for m in recipe.methods}
        results["throughput"] = ef.measure_throughput(classifiers, train, settings, steps=recipe.throughput_steps)
    results["recipe"] = dataclasses.asdict(recipe)
    results["scored_split"] = recipe.score
    results["total_seconds"] = round(time.time() - started, 1)
    return results


# ----------------------------------------------------------------------------- the commands

COMMANDS = {
    "encode": (EncodeRecipe, run_encode, "embed a text file (one text per line) with an encoder"),
    "retrieve": (RetrieveRecipe, run_retrieve, "retrieval xx -> pivot accuracy@1 per language and layer"),
    "classify": (ClassifyRecipe, run_classify, "fine-tune naive / LMS / LMS+FD classifiers, accuracy per language"),
}


def run_command(name: str, config: str, pairs: Optional[list[str]] = None) -> dict[str, Any]:
    """Run one encoder command from its YAML recipe and `--set` pairs; writes `<output_dir>/<name>.{json,md}`
    where it has one. The recipe, its files and its output folder are checked before any model or data loads."""
    from ..core.fileio import write_json, write_text
    from ..tasks.encoder_finetune import markdown_report

    recipe_class, runner, _ = COMMANDS[name]
    recipe = load_recipe(recipe_class, config, pairs)
    results = runner(recipe)
    if name == "encode":
        print(f"wrote {results['texts']} embeddings of dimension {results['dimension']} to {results['output']}")
        return results
    report = retrieval_markdown(results) if name == "retrieve" else markdown_report(results)
    out = Path(recipe.output_dir)
    write_json(out / f"{name}.json", results)
    write_text(out / f"{name}.md", report)
    print(report)
    print(f"written: {out / (name + '.json')}, {out / (name + '.md')}")
    return results


def add_cli(subparsers) -> None:
    """Register `encode`, `retrieve` and `classify`, each taking a YAML recipe and `--set` overrides."""
    for name, (_, _, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        add_recipe_arguments(sub)
        sub.set_defaults(func=_command(name))


def _command(name: str):
    def run(args) -> int:
        run_command(name, args.config, args.set)
        return 0
    return run

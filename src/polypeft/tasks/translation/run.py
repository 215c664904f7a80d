"""English-centric multilingual translation on the Bible corpus: the LMS/FD paper's main experiment.

A recipe (YAML) names the languages, model preset, method and schedule; `prepare`, `train_run` and
`evaluate_run` are the CLI's `polypeft mmt prepare|train|eval`.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Mapping, Optional, Sequence

import torch
from transformers.models.marian.modeling_marian import shift_tokens_right

from ...core.config import (ConfigError, Fraction, LanguageList, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                            PositiveInt, Source, TypedConfig, build, checked, recipe_from_dict)
from ...core.method_config import MethodConfig
from ...core.yaml_files import recipe_from_yaml
from ...data.batching import TokenBudgetBatcher, collate, token_lengths
from ...data.bible import BibleCorpus, BibleSplit
from ...data.parallel import ParallelExample, english_centric
from ...data.pruned_vocab import PrunedTokenizer, pruned_tokenizer
from ...data.spm import SpmTokenizer, bible_spm
from .compare import EVAL_SPLITS, WEIGHTS_NAME
from .evaluate import score_directions, sentences_by_direction, translate
from .run_dir import RESUMABLE_KEYS, check_resumable, claim_run_dir, flat_keys, run_dir_to_replace
from ...core.fileio import file_sha256, single_path_component, write_json, write_model_weights
from ...methods.fd import fuse_distillation_step, token_cross_entropy
from ...core.finite import check_finite
from ...methods.registry import registered_methods
from ...model.poly_model import PolyModel, wrap
from ...backbones.seq2seq import PRESETS, build_translation_model
from ...backbones.warm_start import WarmStart, build_warm_model, decoder_start_column, load_pretrained
from ...training.loop import TrainSettings, seed_everything, train
from ...training.processes import process_state

# Method-block keys of Fuse Distillation (the rest are the method config's own fields).
FD_KEYS = {"fd": bool, "kl_weight": NonNegativeFloat}
# A run directory holds its tokenizer, so the model can be reused without the corpus (FLARE-MT); a warm-started
# run's is a folder (the base tokenizer and the pruned vocabulary's mapping).
TOKENIZER_NAME = "spm.model"
PRUNED_TOKENIZER_NAME = "tokenizer"
# Which English-centric directions a run trains and is scored on.
DIRECTIONS = {"both": lambda e, pivot: True, "into_pivot": lambda e, pivot: e.tgt_lang == pivot,
              "out_of_pivot": lambda e, pivot: e.src_lang == pivot}


@dataclass
class MMTRecipe(TypedConfig):
    """Everything one translation run needs; unknown keys in a YAML file are refused by name."""

    moved_keys: ClassVar[Mapping[str, str]] = {key: f"training.{key}" for key in (
        "steps", "lr", "warmup", "accumulation", "checkpoint_every", "valid_every", "mixed_precision")}

    name: str = "run"
    languages: LanguageList = field(default_factory=lambda: ["en", "fr", "es", "de", "ru", "ar", "ko"])
    pivot: str = "en"
    directions: Literal["both", "into_pivot", "out_of_pivot"] = "both"
    # From scratch: `preset` (a Marian shape) and a SentencePiece vocabulary of `vocab_size`. With `base`, the model
    # is warm-started from a pretrained encoder instead, over its vocabulary pruned to the training data.
    preset: str = "tiny"
    base: Optional[WarmStart] = None
    vocab_size: PositiveInt = 8000
    spm_max_sentences: Optional[PositiveInt] = None
    test_books: list[int] = field(default_factory=lambda: [43])
    valid_books: list[int] = field(default_factory=lambda: [49])
    max_train_verses: Optional[PositiveInt] = None
    max_eval_verses: Optional[PositiveInt] = None
    method: dict[str, Any] = field(default_factory=lambda: {"name": "naive"})
    batching: Literal["homogeneous", "mixed"] = "homogeneous"
    max_tokens: PositiveInt = 4096
    temperature: PositiveFloat = 5.0
    max_length: PositiveInt = 160
    dropout: Fraction = 0.1
    label_smoothing: Fraction = 0.1
    # The optimisation (steps, lr, warmup, accumulation, checkpoint and validation cadence, mixed precision);
    # its seed is the recipe's `seed`. Files written before it was a block still read: their flat keys move here.
    training: TrainSettings = field(default_factory=lambda: TrainSettings(valid_every=200))
    seed: NonNegativeInt = 0
    beam: PositiveInt = 5
    length_penalty: float = 1.0
    eval_batch_size: PositiveInt = 32
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pivot not in self.languages:
            raise ConfigError(f"pivot {self.pivot!r} is not among languages {self.languages}")
        if self.preset not in PRESETS:
            raise ConfigError(f"preset={self.preset!r} is not allowed; choose one of {sorted(PRESETS)}")
        targets = {self.pivot} if self.directions == "into_pivot" else set(self.languages) - (
            {self.pivot} if self.directions == "out_of_pivot" else set())
        if self.base is not None:
            self.base.check_targets(len(targets))
        self.method_config()  # the method block is checked now, before any data is prepared

    def method_config(self) -> Optional[MethodConfig]:
        """The method block as its typed config (None for the naive baseline), every key checked."""
        known = sorted(registered_methods())
        if "name" not in self.method:
            raise ConfigError(f"method={self.method!r} has no 'name'; choose naive or one of {known}")
        source = Source(prefix="method.")
        fd = {key: checked(self.method[key], hint, key, source) for key, hint in FD_KEYS.items() if key in self.method}
        fields = {key: value for key, value in self.method.items() if key not in FD_KEYS and key != "name"}
        name = self.method["name"]
        if name == "naive":
            if fields or fd:
                raise ConfigError(f"method: naive takes no other keys; got {sorted([*fields, *fd])}")
            return None
        if name not in known:
            raise ConfigError(f"method.name: unknown method {name!r}; choose naive or one of {known}")
        if "languages" in fields:
            raise ConfigError("method.languages: a method block takes the recipe's languages; remove the key")
        if fd.get("fd", False):
            fields["shared_route"] = True
        fields.setdefault("freeze_base", False)  # the presets train from scratch: the base trains with the routes
        return build(registered_methods()[name].config_class, {**fields, "languages": self.languages}, source)

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "MMTRecipe":
        return recipe_from_dict(cls, data, where)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Optional[dict] = None) -> "MMTRecipe":
        return recipe_from_yaml(cls, path, overrides)

    @property
    def uses_fd(self) -> bool:
        return bool(self.method.get("fd", False))

    def output_paths(self) -> dict[str, tuple[Path, str]]:
        """What the run writes (and --overwrite clears): checked against the command's inputs before any work."""
        return {"output_dir/name": (self.run_dir, "folder")}

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / f"{single_path_component(self.name, 'name')}-seed{self.seed}"

    def split(self) -> BibleSplit:
        return BibleSplit(test_books=tuple(self.test_books), valid_books=tuple(self.valid_books))


@dataclass
class MMTData:
    tokenizer: SpmTokenizer | PrunedTokenizer
    train: list[ParallelExample]
    valid: list[ParallelExample]
    test: list[ParallelExample]


def _rows(corpus: BibleCorpus, recipe: MMTRecipe, part: str, limit: Optional[int]) -> list[dict]:
    """The verses of one split; a size limit draws the same verses for every seed, so runs of
    different seeds are trained and scored on the same data."""
    rows = corpus.parallel(recipe.languages, books=recipe.split().books(part))
    if limit is not None and len(rows) > limit:
        rows = random.Random(f"bible-{part}").sample(rows, limit)
    return rows


def split_examples(recipe: MMTRecipe, part: str, limit: Optional[int], corpus: Optional[BibleCorpus] = None
                   ) -> list[ParallelExample]:
    """One split's translation pairs in the recipe's directions (at most `limit` verses, drawn as `_rows` does)."""
    keep = DIRECTIONS[recipe.directions]
    pairs = english_centric(_rows(corpus or BibleCorpus(), recipe, part, limit), recipe.languages, pivot=recipe.pivot)
    return [example for example in pairs if keep(example, recipe.pivot)]


def prepare(recipe: MMTRecipe) -> MMTData:
    """The tokenizer (trained on the training books, or the base's pruned to them; cached) and the three splits."""
    corpus = BibleCorpus()
    train, valid, test = (split_examples(recipe, "train", recipe.max_train_verses, corpus),
                          split_examples(recipe, "valid", recipe.max_eval_verses, corpus),
                          split_examples(recipe, "test", recipe.max_eval_verses, corpus))
    if recipe.base is not None:
        tokenizer = warm_tokenizer(recipe, train)
    else:
        tokenizer = bible_spm(recipe.languages, vocab_size=recipe.vocab_size, split=recipe.split(),
                              max_sentences=recipe.spm_max_sentences, corpus=corpus)
    return MMTData(tokenizer, train, valid, test)


def warm_tokenizer(recipe: MMTRecipe, train: list[ParallelExample]) -> PrunedTokenizer:
    """The base encoder's tokenizer pruned to the training examples' pieces (sources and targets apart)."""
    tags = [lang for lang in recipe.languages if any(example.tgt_lang == lang for example in train)]
    return pruned_tokenizer(load_pretrained(recipe.base)[1], [example.src for example in train],
                            [example.tgt for example in train], tags,
                            target_tags=tags if recipe.base.decoder_start == "language" else ())


def build_model(recipe: MMTRecipe, tokenizer: SpmTokenizer | PrunedTokenizer) -> torch.nn.Module:
    """The preset (or warm-started) model, wrapped with the recipe's method unless it is the naive baseline."""
    seed_everything(recipe.seed)
    if recipe.base is not None:
        model = build_warm_model(recipe.base, tokenizer, dropout=recipe.dropout)
    else:
        model = build_translation_model(recipe.preset, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id,
                                        tokenizer.decoder_start_id, dropout=recipe.dropout)
    config = recipe.method_config()
    if config is None:
        return model
    return wrap(model, config)


def add_decoder_inputs(batch: dict, model_config) -> dict:
    batch["decoder_input_ids"] = shift_tokens_right(
        batch["labels"], model_config.pad_token_id, model_config.decoder_start_token_id
    )
    starts = decoder_start_column(model_config, batch["tgt_lang"])
    if starts is not None:  # a warm start with base.decoder_start "language"
        batch["decoder_input_ids"][:, 0] = starts
    return batch


def make_loss_fn(recipe: MMTRecipe):
    """CE with label smoothing (plus any auxiliary loss), or the FD objective when the method uses it."""
    config = recipe.method_config()
    one_way = config is not None and config.fd_one_way
    kl_weight = float(recipe.method.get("kl_weight", 1.0))

    def loss_fn(model, batch: dict) -> tuple[torch.Tensor, int]:
        batch = dict(batch)
        src, tgt = batch.pop("src_lang"), batch.pop("tgt_lang")
        labels = batch.pop("labels")
        tokens = int((labels != -100).sum())
        poly = getattr(model, "module", model)
        if recipe.uses_fd:
            # The FD pass runs the model on [batch; batch]; the labels only score it.
            loss = fuse_distillation_step(model, batch, src, tgt, kl_weight=kl_weight, one_way=one_way,
                                          label_smoothing=recipe.label_smoothing, labels=labels).loss
        else:
            routes = {"src_lang": src, "tgt_lang": tgt} if isinstance(poly, PolyModel) else {}
            logits = model(**batch, **routes).logits
            loss = token_cross_entropy(logits, labels, recipe.label_smoothing)
        if isinstance(poly, PolyModel):
            loss = loss + poly.auxiliary_loss()
        return loss, tokens

    return loss_fn


def batch_stream(recipe: MMTRecipe, data: MMTData, model_config) -> Iterator[dict]:
    lengths = [min(n, recipe.max_length) for n in token_lengths(data.train, data.tokenizer)]
    batcher = TokenBudgetBatcher(lengths, [e.direction for e in data.train], recipe.max_tokens,
                                 mode=recipe.batching, temperature=recipe.temperature, seed=recipe.seed)
    for indices in batcher.sampled_batches():
        examples = [data.train[i] for i in indices]
        batch = collate(examples, data.tokenizer, recipe.max_length, recipe.max_length)
        yield add_decoder_inputs(batch, model_config)


def valid_loss_fn(recipe: MMTRecipe, data: MMTData, model_config, batch_size: int = 64,
                  examples: Optional[list] = None, route: Optional[str] = None):
    """Mean token CE (no smoothing) on the validation book (or `examples`) over each example's own route.

    `route` (e.g. "shared", FD-Share) replaces every example's languages, as in `translate`.
    """
    examples = data.valid if examples is None else examples
    batches = [add_decoder_inputs(collate(examples[i : i + batch_size], data.tokenizer, recipe.max_length,
                                          recipe.max_length), model_config)
               for i in range(0, len(examples), batch_size)]

    def valid(model) -> float:
        poly = getattr(model, "module", model)
        total, count = 0.0, 0
        for batch in batches:
            batch = dict(batch)
            src, tgt, labels = batch.pop("src_lang"), batch.pop("tgt_lang"), batch.pop("labels")
            if route is not None:
                src = tgt = route
            routes = {"src_lang": src, "tgt_lang": tgt} if isinstance(poly, PolyModel) else {}
            device = next(model.parameters()).device
            logits = model(**{k: v.to(device) for k, v in batch.items()}, **routes).logits
            tokens = int((labels != -100).sum())
            total += float(token_cross_entropy(logits, labels.to(device))) * tokens
            count += tokens
        return total / max(count, 1)

    return valid


def parameter_table(model: torch.nn.Module, recipe: MMTRecipe) -> dict:
    """Base size and the extra parameters for training and for each way of running inference."""
    if isinstance(model, PolyModel):
        counts = model.parameter_counts().as_dict()
    else:
        base = sum(p.numel() for p in model.parameters())
        counts = {"base": base, "training_extra": 0, "inference_extra_language_routes": 0,
                  "inference_extra_shared_route": 0, "language_specific": 0, "shared_route": 0}
    counts["method"] = recipe.method["name"]
    return counts


def train_run(recipe: MMTRecipe, resume: bool = False, data: Optional[MMTData] = None,
              overwrite: bool = False) -> Path:
    """Train one run; writes checkpoint, log, final weights and the parameter table into its run dir.

    A run dir that already holds a run is continued (`resume`), replaced (`overwrite`) or refused.
    """
    run_dir = recipe.run_dir
    claim_run_dir(recipe, run_dir, resume, overwrite)
    data = data or prepare(recipe)
    model = build_model(recipe, data.tokenizer)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "recipe.json", dataclasses.asdict(recipe))
    data.tokenizer.save(run_dir / tokenizer_name(recipe))
    params = parameter_table(model, recipe)
    write_json(run_dir / "parameters.json", params)
    print(f"[{recipe.name} seed {recipe.seed}] extra parameters: training {params['training_extra']:,}, "
          f"inference {params['inference_extra_language_routes']:,} (language routes) / "
          f"{params['inference_extra_shared_route']:,} (shared route; 0 once merged); base {params['base']:,}")
    settings = dataclasses.replace(recipe.training, seed=recipe.seed)
    config = model.config
    started = time.perf_counter()
    result = train(model, lambda: batch_stream(recipe, data, config), make_loss_fn(recipe), settings, run_dir,
                   resume=resume, valid_fn=valid_loss_fn(recipe, data, config) if recipe.training.valid_every else None)
    state = process_state()
    if state.is_main_process:  # every process holds the same weights; one writes them
        write_model_weights(run_dir / WEIGHTS_NAME, model)
        # wall_seconds: this command alone; training_seconds: the loop over every part, a resumed run's earlier ones
        write_json(run_dir / "train_summary.json", {"wall_seconds": round(time.perf_counter() - started, 1),
                                                    "training_seconds": result["history"][-1].get("elapsed_s"),
                                                    "steps": recipe.training.steps, "resumed": resume})
    state.wait_for_everyone()
    return run_dir


def load_run(run_dir: str | Path, data: Optional[MMTData] = None) -> tuple[MMTRecipe, MMTData, torch.nn.Module]:
    """A trained run with its data splits, for evaluation."""
    recipe = read_run_recipe(run_dir)
    data = data or prepare(recipe)
    return recipe, data, load_translation_model(run_dir, data.tokenizer)[2]


def tokenizer_name(recipe: MMTRecipe) -> str:
    """Where a run folder keeps its tokenizer: a SentencePiece file, or a warm start's pruned tokenizer folder."""
    return PRUNED_TOKENIZER_NAME if recipe.base is not None else TOKENIZER_NAME


def read_run_recipe(run_dir: str | Path) -> MMTRecipe:
    run_dir = Path(run_dir)
    for needed in ("recipe.json", WEIGHTS_NAME):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir / needed} not found: is {run_dir} a trained `polypeft mmt` run?")
    return MMTRecipe.from_dict(json.loads((run_dir / "recipe.json").read_text()), where=str(run_dir / "recipe.json"))


def load_translation_model(run_dir: str | Path, tokenizer: Optional[SpmTokenizer] = None
                           ) -> tuple[MMTRecipe, SpmTokenizer, torch.nn.Module]:
    """A trained run's recipe, tokenizer and model from its directory alone (no corpus needed)."""
    from safetensors.torch import load_model

    recipe = read_run_recipe(run_dir)
    saved = Path(run_dir) / tokenizer_name(recipe)
    if tokenizer is None:
        # Runs trained before the tokenizer was kept in the run directory find it in the cache (or retrain it).
        loader = PrunedTokenizer.load if recipe.base is not None else SpmTokenizer
        tokenizer = loader(saved) if saved.exists() else prepare(recipe).tokenizer
    model = build_model(recipe, tokenizer)
    load_model(model, str(Path(run_dir) / WEIGHTS_NAME))
    check_finite(model.state_dict(), f"{Path(run_dir) / WEIGHTS_NAME}: refused")
    return recipe, tokenizer, model.eval()


def eval_variants(recipe: MMTRecipe) -> dict[str, Optional[str]]:
    """FD runs are scored both ways: FD-Share (the shared route, the headline) and FD-LS."""
    return {"fd_share": "shared", "fd_ls": None} if recipe.uses_fd else {"default": None}


def book_examples(recipe: MMTRecipe, books: Sequence[int]) -> list[ParallelExample]:
    """The test pairs of some of the run's test books alone (at most `max_eval_verses` verses, drawn as a run whose
    test books were these would draw them); a book the run trained on, or validated on, is refused by name."""
    recipe.split().check_scored_books(books)
    return split_examples(dataclasses.replace(recipe, test_books=sorted(books)), "test", recipe.max_eval_verses)


def evaluate_run(run_dir: str | Path, data: Optional[MMTData] = None, split: str = "test",
                 books: Optional[Sequence[int]] = None) -> dict:
    """Beam search on the split, BLEU/chrF per direction and averages, written as JSON next to the run with each
    verse's hypothesis and BLEU statistics (so intervals and paired tests need no second decoding).

    `books` scores some of the test books alone (eval_test_books-<ids>.json), with the run's own tokenizer: a run
    holding out several books is then comparable with one that held out those alone. The JSON records the
    SHA-256 of the weights it scored, so a later comparison can tell it is stale.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"evaluate_run: split={split!r}; choose one of {list(EVAL_SPLITS)}")
    if books is not None:
        if split != "test":
            raise ValueError(f"evaluate_run: books={list(books)} score test books; split={split!r} has none")
        examples = book_examples(read_run_recipe(run_dir), books)  # a wrong book is refused before the model loads
        recipe, tokenizer, model = load_translation_model(run_dir)
    else:
        recipe, data, model = load_run(run_dir, data)
        tokenizer, examples = data.tokenizer, data.test if split == "test" else data.valid
    weights_sha256 = file_sha256(Path(run_dir) / WEIGHTS_NAME)
    results = {"name": recipe.name, "seed": recipe.seed, "method": recipe.method, "split": split, "pivot": recipe.pivot,
               "weights_sha256": weights_sha256, "parameters": parameter_table(model, recipe), "variants": {},
               **({"books": sorted(books)} if books is not None else {})}
    for variant, route in eval_variants(recipe).items():
        started = time.perf_counter()
        hypotheses = translate(model, tokenizer, examples, beam=recipe.beam,
                               length_penalty=recipe.length_penalty, batch_size=recipe.eval_batch_size, route=route,
                               max_source_length=recipe.max_length, max_new_tokens=recipe.max_length)
        scores = score_directions(examples, hypotheses, pivot=recipe.pivot)
        scores["decode_seconds"] = round(time.perf_counter() - started, 1)
        scores["sentences"] = sentences_by_direction(examples, hypotheses)
        results["variants"][variant] = scores
    write_json(eval_file(run_dir, split, books), results)
    return results


def eval_file(run_dir: str | Path, split: str = "test", books: Optional[Sequence[int]] = None) -> Path:
    """Where `evaluate_run` writes a run's scores: eval_<split>.json, or eval_test_books-<ids>.json for some books."""
    suffix = "" if books is None else "_books-" + "-".join(str(book) for book in sorted(books))
    return Path(run_dir) / f"eval_{split}{suffix}.json"

"""A small English-centric Llama-style causal LM built from scratch on the Bible corpus: its settings, model,
tokenizer view, mixed-language token stream and files. Training it lives in `tasks/language_model.py`.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Optional, Sequence

import torch
import transformers as tf
from safetensors.torch import load_model

from ..core.config import ConfigError, NonNegativeInt, PositiveInt, TypedConfig
from ..core.fileio import cache_root, write_json, write_model_weights
from ..data.bible import BIBLE_VERSIONS, BibleCorpus, BibleSplit
from ..data.spm import SpmTokenizer, bible_spm
from ..training.settings import FrozenTrainSettings, TrainSettings

__all__ = ["CAUSAL_LM_FORMAT", "CausalLmSettings", "CausalLmTokenizer", "build_model", "causal_lm_dir",
           "lm_schedule", "load_causal_lm", "mixture_weights", "save_causal_lm", "token_windows", "tokenizer_for",
           "training_verses"]

CAUSAL_LM_FORMAT = 1  # bump when the build changes, so an old cached model is not reused
WEIGHTS_NAME, CONFIG_NAME, BUILD_NAME = "model.safetensors", "config.json", "build.json"
# The training fields the settings once held at the top, and those of the block that do not shape the model.
FLAT_TRAINING_KEYS = ("steps", "lr", "warmup", "checkpoint_every")
NOT_SHAPING = ("checkpoint_every", "valid_every", "log_every", "progress")


def lm_schedule(**changes: Any) -> TrainSettings:
    """The LM's optimisation: AdamW (betas 0.9/0.95, weight decay 0.01), linear warm-up and decay, 700 steps at
    2e-3, validated every 70 and at the end; the block's seed stays null, the settings' `seed` seeds training."""
    return TrainSettings(**{"steps": 700, "lr": 2e-3, "warmup": 50, "schedule": "linear", "betas": (0.9, 0.95),
                            "weight_decay": 0.01, "checkpoint_every": 100, "valid_every": 70, "log_every": 10,
                            "seed": None, **changes})


@dataclass(frozen=True)
class CausalLmSettings(TypedConfig):
    """Everything that shapes the model: languages and their token shares, tokenizer, size, optimisation.

    `english_share` of the training tokens is English and the rest is split evenly over the other languages,
    so English dominates as it does in the pretraining data of English-centric LLMs. Books `test_books` and
    `valid_books` are never trained on (the tokenizer does not see them either). `training` is the optimisation
    (`lm_schedule()`); `seed` seeds the tokenizer, the weights, the batches and training alike.
    """

    # Settings written before the training block say steps, lr, warmup and checkpoint_every at the top.
    moved_keys: ClassVar[Mapping[str, str]] = {key: f"training.{key}" for key in FLAT_TRAINING_KEYS}
    languages: tuple[str, ...] = ("en", "fr", "es", "de", "ru", "ar", "ko")
    english_share: float = 0.9
    vocab_size: PositiveInt = 4000
    spm_sentences: PositiveInt = 4000  # verses per language the tokenizer is trained on (every language weighs the same)
    hidden_size: PositiveInt = 256
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 4
    intermediate_size: PositiveInt = 688
    seq_len: PositiveInt = 128
    batch_size: PositiveInt = 16
    training: TrainSettings = field(default_factory=lm_schedule)
    max_verses: Optional[PositiveInt] = None  # per language (tests); None: every training verse
    seed: NonNegativeInt = 0
    test_books: tuple[int, ...] = (43,)  # John
    valid_books: tuple[int, ...] = (45, 46, 47, 48, 49)  # Romans .. Ephesians: layer choices are made here

    def __post_init__(self) -> None:
        super().__post_init__()  # every field's type (tuples stay tuples)
        # A frozen copy: the key is read from the block, so neither the caller's object nor `training.x = ...`
        # may change it later (and the settings hash, as a frozen dataclass should).
        object.__setattr__(self, "training", FrozenTrainSettings.of(self.training))
        unknown = [code for code in self.languages if code not in BIBLE_VERSIONS]
        if unknown:
            raise ConfigError(f"CausalLmSettings.languages has {unknown}; allowed: {sorted(BIBLE_VERSIONS)}")
        if "en" not in self.languages or len(self.languages) < 2:
            raise ConfigError(f"CausalLmSettings.languages={self.languages} must hold 'en' and at least one other")
        if not 0 < self.english_share < 1:
            raise ConfigError(f"CausalLmSettings.english_share={self.english_share}; must be in (0, 1)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"CausalLmSettings: hidden_size={self.hidden_size} is not a multiple of "
                              f"num_heads={self.num_heads}")
        if self.training.seed is not None:
            raise ConfigError(f"CausalLmSettings.training.seed={self.training.seed}: the LM has one seed, `seed` "
                              "(tokenizer, weights, batches and training); set that and leave training.seed null")

    @property
    def split(self) -> BibleSplit:
        return BibleSplit(test_books=self.test_books, valid_books=self.valid_books)

    def loop_settings(self, progress: bool = True) -> TrainSettings:
        """What the training loop runs: the block, seeded with the LM's `seed`."""
        return replace(self.training.thawed(), seed=self.seed, progress=progress)

    def flat_values(self) -> dict[str, Any]:
        """The settings laid out as before the training block: its steps, lr, warmup and checkpoint_every at the
        top, any other of its model-shaping fields that differs from `lm_schedule()` as `training.<name>`."""
        values = {name: value for name, value in asdict(self).items() if name != "training"}
        values.update({name: getattr(self.training, name) for name in FLAT_TRAINING_KEYS},
                      warmup=self.training.warmup_steps)
        default = lm_schedule()
        left = [f.name for f in fields(TrainSettings) if f.name not in (*FLAT_TRAINING_KEYS, *NOT_SHAPING, "seed")]
        values.update({f"training.{name}": getattr(self.training, name) for name in left
                       if getattr(self.training, name) != getattr(default, name)})
        return values

    def key(self) -> str:
        """A short hash of every setting that shapes the model (not how often it checkpoints): the cache folder's
        name. Hashed from the flat layout, so every model built before the training block keeps its folder."""
        shaping = {name: value for name, value in self.flat_values().items() if name != "checkpoint_every"}
        text = json.dumps({"format": CAUSAL_LM_FORMAT, **shaping}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def causal_lm_dir(settings: CausalLmSettings, cache_dir: Optional[str | Path] = None) -> Path:
    """`cache_root()/causal_lm/<key>`: the run folder (checkpoints, log) and the finished model."""
    return Path(cache_dir if cache_dir is not None else cache_root() / "causal_lm") / settings.key()


@dataclass
class CausalLmTokenizer:
    """The SentencePiece vocabulary as a causal LM reads it: bos, then the pieces, no language tag.

    Called on texts it returns right-padded `input_ids`/`attention_mask` (what LRP2 and LENS capture from);
    no eos is appended, so the last token of a prompt is where its continuation starts.
    """

    spm: SpmTokenizer
    padding_side: str = "right"

    @property
    def pad_token(self) -> str:
        return self.spm.pad_token

    @property
    def pad_token_id(self) -> int:
        return self.spm.pad_id

    @property
    def eos_token_id(self) -> int:
        return self.spm.eos_id

    @property
    def bos_token_id(self) -> int:
        return self.spm.bos_id

    def encode(self, text: str, eos: bool = False) -> list[int]:
        return [self.spm.bos_id] + self.spm.encode(text, add_eos=eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.spm.decode(ids)

    def __call__(self, texts: Sequence[str] | str, padding: bool = True, truncation: bool = True,
                 max_length: Optional[int] = None, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if return_tensors != "pt" or not padding:
            raise ValueError("CausalLmTokenizer(...) returns padded PyTorch tensors only (return_tensors='pt')")
        rows = [self.encode(text) for text in texts]
        if truncation and max_length:
            rows = [row[:max_length] for row in rows]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.spm.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            span = slice(width - len(row), width) if self.padding_side == "left" else slice(0, len(row))
            ids[index, span] = torch.tensor(row)
            mask[index, span] = 1
        return {"input_ids": ids, "attention_mask": mask}


def tokenizer_for(settings: CausalLmSettings, corpus: Optional[BibleCorpus] = None) -> CausalLmTokenizer:
    """The cached SentencePiece model trained on the training books of the settings' languages."""
    spm = bible_spm(list(settings.languages), vocab_size=settings.vocab_size, split=settings.split,
                    max_sentences=settings.spm_sentences, corpus=corpus, seed=settings.seed)
    return CausalLmTokenizer(spm)


def build_model(settings: CausalLmSettings, tokenizer: CausalLmTokenizer) -> tf.LlamaForCausalLM:
    """A randomly initialised Llama of the settings' size, embeddings tied to the output layer."""
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer.spm), hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads, max_position_embeddings=max(256, 2 * settings.seq_len),
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(settings.seed)
    return tf.LlamaForCausalLM(config)


def training_verses(settings: CausalLmSettings, tokenizer: CausalLmTokenizer, part: str = "train",
                    corpus: Optional[BibleCorpus] = None) -> dict[str, list[list[int]]]:
    """Token ids (bos, pieces, eos) of every verse of one split part, per language, in canonical order."""
    corpus = corpus or BibleCorpus()
    books = settings.split.books(part)
    verses = {}
    for language in settings.languages:
        texts = list(corpus.verses(language, books).values())[: settings.max_verses]
        verses[language] = [tokenizer.encode(text, eos=True) for text in texts]
    return verses


def mean_verse_lengths(verses: dict[str, list[list[int]]]) -> dict[str, float]:
    """Mean tokens per verse of each language: what turns verse weights into token shares and back."""
    return {code: sum(map(len, rows)) / max(1, len(rows)) for code, rows in verses.items()}


def mixture_weights(settings: CausalLmSettings, verses: dict[str, list[list[int]]]) -> dict[str, float]:
    """Probability of drawing a verse of each language, so that the token shares are the settings' ones."""
    missing = [code for code in settings.languages if not verses.get(code)]
    if missing:
        raise ValueError(f"no training verses for languages {missing} in books {sorted(settings.split.books('train'))[:5]}"
                         "...: choose languages the corpus has there")
    others = (1 - settings.english_share) / (len(settings.languages) - 1)
    shares = {code: settings.english_share if code == "en" else others for code in settings.languages}
    mean_length = mean_verse_lengths(verses)
    raw = {code: shares[code] / mean_length[code] for code in settings.languages}
    total = sum(raw.values())
    return {code: value / total for code, value in raw.items()}


def token_windows(verses: dict[str, list[list[int]]], weights: dict[str, float], seq_len: int, batch_size: int,
                  seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """An endless seeded stream of (batch, seq_len) windows cut from verses drawn by language weight.

    Verses are packed end to end (no padding); the same seed gives the same stream, so a resumed run skips
    exactly the batches it had trained on.
    """
    generator = random.Random(seed)
    codes = sorted(weights)
    chances = [weights[code] for code in codes]
    buffer: list[int] = []
    need = seq_len * batch_size
    while True:
        while len(buffer) < need:
            code = generator.choices(codes, weights=chances)[0]
            rows = verses[code]
            buffer.extend(rows[generator.randrange(len(rows))])
        chunk, buffer = buffer[:need], buffer[need:]
        yield {"input_ids": torch.tensor(chunk, dtype=torch.long).view(batch_size, seq_len)}


def save_causal_lm(directory: Path, model: tf.LlamaForCausalLM, record: dict) -> Path:
    """Config and build record first, weights last: the weights file on disk means a finished build."""
    write_json(directory / CONFIG_NAME, model.config.to_dict())
    write_json(directory / BUILD_NAME, record)
    write_model_weights(directory / WEIGHTS_NAME, model)
    return directory


def load_causal_lm(directory: Path) -> Optional[tf.LlamaForCausalLM]:
    """The finished model in `directory`, or None when no build finished there."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        return None
    config = tf.LlamaConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")))
    model = tf.LlamaForCausalLM(config)
    load_model(model, str(weights))
    return model.eval()

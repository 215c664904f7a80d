"""What the LMS-against-LoRA comparison runs: the methods, their search grids, the data sizes and the seeds.

Every method gets the same number of trials on the valid books; the test book is scored once with the choice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from ...core.config import ConfigError, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, TypedConfig

Method = Literal["lora_train", "lora_infer", "lms", "lms_fd", "full"]
METHODS: tuple[str, ...] = get_args(Method)
# What each trained method is scored as: FD on each of its routes; the others on their own weights.
VARIANTS = {"lora_train": ("lora_train",), "lora_infer": ("lora_infer",), "lms": ("lms",),
            "lms_fd": ("fd_share", "fd_ls"), "full": ("full",)}
# The variant a method's trials are chosen by: FD-Share is FD's headline (no per-language weights at inference).
CHOSEN_BY = {"lora_train": "lora_train", "lora_infer": "lora_infer", "lms": "lms", "lms_fd": "fd_share",
             "full": "full"}
LABELS = {"base": "base model (no training)", "lora_train": "LoRA, equal trainable parameters",
          "lora_infer": "LoRA, equal inference parameters", "lms": "LMS (language-wise)",
          "fd_share": "LMS+FD, FD-Share", "fd_ls": "LMS+FD, FD-LS", "full": "full fine-tuning of the same layers"}
# The other non-English languages of the corpus; English is the index side.
CORPUS_LANGUAGES = ["fr", "es", "de", "it", "pt", "ru", "ar", "fa", "ko", "vi", "tl"]
LOW_RANK_RATES = [3e-4, 1e-3, 3e-3]
FULL_RATES = [1e-5, 3e-5, 1e-4]


@dataclass
class ComparisonSettings(TypedConfig):
    """What every testbed shares: the methods and their trial grids, the held-out books, the seeds."""

    languages: list[str] = field(default_factory=lambda: list(CORPUS_LANGUAGES))
    methods: list[Method] = field(default_factory=lambda: list(METHODS))
    test_book: PositiveInt = 43  # John
    valid_books: list[int] = field(default_factory=lambda: [45, 46, 47, 48, 49])  # Romans to Ephesians
    trained_layers: list[int] = field(default_factory=lambda: [2, 4])  # trial grid: how many top blocks adapt
    low_rank_rates: list[float] = field(default_factory=lambda: list(LOW_RANK_RATES))  # trial grid, LoRA/LMS/FD
    full_rates: list[float] = field(default_factory=lambda: list(FULL_RATES))  # trial grid, full fine-tuning
    rank: PositiveInt = 8  # LMS's rank per language; LoRA's ranks follow from the parameter budgets
    batch_size: PositiveInt = 32
    max_steps: PositiveInt = 300
    check_every: PositiveInt = 100  # the stop step is chosen among these checkpoints on the valid books
    warmup: NonNegativeInt = 30
    kl_weight: NonNegativeFloat = 1.0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    trial_seed: int = 100  # the trials' seed, kept apart from the test seeds
    bootstrap: PositiveInt = 2000

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if "en" in self.languages or len(set(self.languages)) != len(self.languages) or not self.languages:
            raise ConfigError(f"{owner}.languages={self.languages}: give distinct non-English codes (English is "
                              "the pivot, checked on its own)")
        if self.test_book in self.valid_books:
            raise ConfigError(f"{owner}.test_book={self.test_book} is among valid_books={self.valid_books}: the "
                              "test book never chooses anything")
        if self.max_steps % self.check_every:
            raise ConfigError(f"{owner}.max_steps={self.max_steps} must be a multiple of check_every="
                              f"{self.check_every}")
        if not self.trained_layers or any(k < 1 for k in self.trained_layers):
            raise ConfigError(f"{owner}.trained_layers={self.trained_layers}: give numbers of top blocks, each >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or self.trial_seed in self.seeds:
            raise ConfigError(f"{owner}.seeds={self.seeds}: give distinct seeds, none equal to trial_seed="
                              f"{self.trial_seed}")
        if len(self.methods) != len(set(self.methods)) or not self.methods:
            raise ConfigError(f"{owner}.methods={self.methods}: name each of {list(METHODS)} at most once")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rates(self, method: str) -> list[float]:
        return self.full_rates if method == "full" else self.low_rank_rates

    def trials(self, method: str) -> list[dict[str, Any]]:
        """The method's trial grid: every learning rate with every number of adapted blocks."""
        return [{"lr": lr, "trained_layers": k} for k in self.trained_layers for lr in self.rates(method)]


@dataclass
class RetrievalTestbed(ComparisonSettings):
    """xx->en verse retrieval with e5-small: the query side adapts, the English index stays as the base built it.

    States below `cache_layer` are computed once; a trial trains the FFNs of the top `trained_layers` blocks."""

    valid_queries: PositiveInt = 300  # per language, spread over the valid books; all their English verses compete
    test_queries: NonNegativeInt = 0  # per language, spread over the test book; 0 = every verse
    test_candidates: NonNegativeInt = 0  # English verses of the test book that compete, spread; 0 = every verse
    train_verses: PositiveInt = 2000  # verse ids of the training books, each in every language
    extra_negatives: NonNegativeInt = 256  # English training passages added to each batch's candidates
    max_length: PositiveInt = 64
    cache_layer: PositiveInt = 8  # blocks below run once per query (their states cached)
    temperature: PositiveFloat = 0.05
    # The top two blocks only: on 2 CPU cores the trial budget goes to the rate and the stop step (--trained-layers
    # 2 4 adds the top four blocks to the grid).
    trained_layers: list[int] = field(default_factory=lambda: [2])

    def __post_init__(self) -> None:
        super().__post_init__()
        too_deep = [k for k in self.trained_layers if k > 12 - self.cache_layer]
        if too_deep:
            raise ConfigError(f"RetrievalTestbed.trained_layers={self.trained_layers}: each must be at most "
                              f"{12 - self.cache_layer} (the blocks above cache_layer={self.cache_layer} of e5-small's 12)")

    def as_dict(self) -> dict[str, Any]:
        """The settings; `test_candidates` only when it limits the candidates (runs made before it existed used
        every verse, and their folders and caches keep matching)."""
        return {key: value for key, value in asdict(self).items() if key != "test_candidates" or value}

    def data_dict(self) -> dict[str, Any]:
        """The settings that decide the cached data (not the training)."""
        keys = ("languages", "test_book", "valid_books", "valid_queries", "test_queries", "test_candidates",
                "train_verses", "max_length", "cache_layer")
        return {key: value for key, value in self.as_dict().items() if key in keys}


@dataclass
class LanguageModelTestbed(ComparisonSettings):
    """Language adaptation of the English-centric causal LM (all twelve languages, 90 % English): continued on
    the other languages' training books, each window on its language's route; scored by perplexity per verse."""

    lm_steps: PositiveInt = 700  # the base LM's build (bench/experiments/english_centric_lm, every language)
    seq_len: PositiveInt = 64
    valid_verses: PositiveInt = 100  # per language, spread over the valid books
    test_verses: NonNegativeInt = 300  # per language, spread over the test book; 0 = every verse
    batch_size: PositiveInt = 16
    max_steps: PositiveInt = 150
    check_every: PositiveInt = 50
    warmup: NonNegativeInt = 10
    # Every block (the LM has four): on 2 CPU cores the trial budget goes to the rate and the stop step.
    trained_layers: list[int] = field(default_factory=lambda: [4])

    def __post_init__(self) -> None:
        super().__post_init__()
        if max(self.trained_layers) > 4:
            raise ConfigError(f"LanguageModelTestbed.trained_layers={self.trained_layers}: the LM has 4 blocks")


def demo_testbed(quick: bool, seed: int = 0, test_book: int = 43) -> RetrievalTestbed:
    """The demo's size: every language, fewer verses, the top two blocks (states cached below them), two seeds
    from `seed`; the demo trains with the choices the full comparison made on the valid books."""
    common = dict(methods=["lora_train", "lms", "lms_fd"], test_book=test_book, seeds=[seed, seed + 1],
                  trial_seed=seed + 10_000, cache_layer=10, trained_layers=[2], valid_books=[49])
    if quick:
        return RetrievalTestbed(**common, languages=["fr", "ko"], valid_queries=8, test_queries=16,
                                test_candidates=16, train_verses=40, extra_negatives=8, batch_size=8, max_steps=4,
                                check_every=4, warmup=1, bootstrap=200)
    return RetrievalTestbed(**common, valid_queries=30, test_queries=150, test_candidates=150, train_verses=150,
                            extra_negatives=128, batch_size=32, max_steps=70, check_every=70, warmup=7,
                            bootstrap=1000)

"""Multilingual fine-tuning of an HF encoder under a classification head: naive, LMS or LMS+FD, scored per language.

Zero-shot transfer (train one language, test all) and multilingual runs; FD is scored on the shared route and on the language routes.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..core.config import ConfigError
from ..methods.lms import LMSConfig
from ..core.languages import SHARED
from ..methods.fd import fuse_distillation_loss
from ..core.model import PolyModel, wrap
from .classification import ClassificationData, classification_model

METHODS = ("naive", "lms", "lms_fd")
# What each method is scored as: naive and LMS on their own weights, LMS+FD on each route separately.
EVAL_ROUTES = {"naive": ("none",), "lms": ("language",), "lms_fd": ("shared", "language")}
VARIANT_NAMES = {("naive", "none"): "naive", ("lms", "language"): "lms",
                 ("lms_fd", "shared"): "lms_fd_share", ("lms_fd", "language"): "lms_fd_ls"}


@dataclass
class FinetuneSettings:
    """One fine-tuning recipe. `frozen_layers` > 0 freezes the embeddings and the lowest layers and runs
    them once per example (a cache), so only the upper layers, their LMS routes and the head train."""

    method: str = "lms"
    rank: int = 8
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-5
    route_lr: Optional[float] = None  # LMS routes' learning rate; default `lr`
    warmup: int = 20
    max_length: int = 64
    frozen_layers: int = 0
    freeze_embeddings: bool = True
    kl_weight: float = 1.0
    init_std: float = 0.01
    seed: int = 0
    prefix: str = ""
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"FinetuneSettings.method={self.method!r}; allowed: {list(METHODS)}")
        for name in ("rank", "steps", "batch_size", "max_length", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"FinetuneSettings.{name}={value!r}; must be a positive integer")
        if self.frozen_layers < 0 or self.warmup < 0:
            raise ConfigError(f"FinetuneSettings: frozen_layers={self.frozen_layers}, warmup={self.warmup}; "
                              "both must be >= 0")
        if self.lr <= 0 or (self.route_lr is not None and self.route_lr <= 0):
            raise ConfigError(f"FinetuneSettings: lr={self.lr}, route_lr={self.route_lr}; learning rates must be > 0")

    def replaced(self, **changes: Any) -> "FinetuneSettings":
        return FinetuneSettings(**{**asdict(self), **changes})


# ----------------------------------------------------------------------------- encoded examples

class PassThroughEmbeddings(nn.Module):
    """Stands in for a frozen embedding layer + lower layers whose output was cached: returns `inputs_embeds`."""

    def forward(self, input_ids=None, inputs_embeds=None, **_: Any) -> torch.Tensor:
        if inputs_embeds is None:
            raise ValueError("this encoder's lower layers were cut off; feed the cached states as inputs_embeds")
        return inputs_embeds


@dataclass
class EncodedExamples:
    """Examples tokenized once (token ids) or run once through the frozen lower layers (hidden states)."""

    items: list[torch.Tensor]  # per example: token ids (T,) or hidden states (T, H), no padding
    labels: torch.Tensor
    langs: list[str]
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def holds_states(self) -> bool:
        return bool(self.items) and self.items[0].dim() == 2

    def batch(self, index: Sequence[int]) -> dict[str, torch.Tensor]:
        """Padded model inputs and `labels` for the examples at `index`."""
        items = [self.items[i] for i in index]
        length = max(len(item) for item in items)
        mask = torch.zeros(len(items), length, dtype=torch.long)
        for row, item in enumerate(items):
            mask[row, :len(item)] = 1
        labels = self.labels[list(index)]
        if self.holds_states:
            states = torch.zeros(len(items), length, items[0].shape[1])
            for row, item in enumerate(items):
                states[row, :len(item)] = item
            return {"inputs_embeds": states, "attention_mask": mask, "labels": labels}
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, :len(item)] = item
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def subset(self, langs: Sequence[str]) -> "EncodedExamples":
        keep = [i for i, lang in enumerate(self.langs) if lang in set(langs)]
        return EncodedExamples([self.items[i] for i in keep], self.labels[keep], [self.langs[i] for i in keep],
                               self.pad_id)


def encoder_body(model: nn.Module) -> nn.Module:
    """The transformer body (`bert`, `roberta`, ...) of a model with a task head, or the model itself."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def encode_examples(encoder: nn.Module, tokenizer, data: Mapping[str, ClassificationData], max_length: int,
                    frozen_layers: int = 0, prefix: str = "", batch_size: int = 64,
                    progress: bool = True) -> EncodedExamples:
    """Tokenize every language's examples; with `frozen_layers` > 0 also run them through the encoder's
    embeddings and lowest `frozen_layers` layers once, keeping the hidden states without padding."""
    from tqdm.auto import tqdm

    texts, labels, langs = [], [], []
    for lang, part in data.items():
        for example in part.examples:
            texts.append(prefix + example.text)
            labels.append(example.label)
            langs.append(lang)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    items: list[torch.Tensor] = [torch.tensor(row) for row in ids]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if frozen_layers > 0:
        num_layers = encoder_body(encoder).config.num_hidden_layers
        if frozen_layers > num_layers:
            raise ConfigError(f"frozen_layers={frozen_layers} but the encoder has {num_layers} layers")
        body = encoder_body(encoder)
        token_ids = EncodedExamples(items, torch.tensor(labels), langs, pad_id)
        order = sorted(range(len(items)), key=lambda i: len(items[i]), reverse=True)  # little padding
        states: list[Optional[torch.Tensor]] = [None] * len(items)
        was_training = body.training
        body.eval()
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc=f"frozen layers 0-{frozen_layers - 1}",
                              disable=not progress, unit="batch"):
                index = order[start:start + batch_size]
                batch = token_ids.batch(index)
                hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=True).hidden_states[frozen_layers]
                for row, i in enumerate(index):
                    states[i] = hidden[row, :len(items[i])].float().clone()
        body.train(was_training)
        items = states  # type: ignore[assignment]
    return EncodedExamples(items, torch.tensor(labels), langs, pad_id)


def language_means(examples: EncodedExamples) -> dict[str, torch.Tensor]:
    """Per language, the mean over examples of each example's token-averaged cached state: LRP2's language
    vector (mean pooling) at the layer the cache stops at."""
    if not examples.holds_states:
        raise ValueError("language_means needs cached hidden states (encode_examples with frozen_layers > 0)")
    pooled = torch.stack([item.mean(0) for item in examples.items])
    langs = list(dict.fromkeys(examples.langs))
    return {lang: pooled[[i for i, l in enumerate(examples.langs) if l == lang]].mean(0) for lang in langs}


def lirp_shifted(examples: EncodedExamples, means: Mapping[str, torch.Tensor], pivot: str = "en") -> EncodedExamples:
    """LRP2's LIRP applied to cached states, at the input of the first trained layer: every token of an
    example moves by means[pivot] - means[its language], so the upper layers see it as if in the pivot."""
    missing = sorted({lang for lang in examples.langs if lang not in means} | ({pivot} - set(means)))
    if missing:
        raise ValueError(f"no language mean for {missing}; means exist for {sorted(means)}")
    items = [item + (means[pivot] - means[lang]) for item, lang in zip(examples.items, examples.langs)]
    return EncodedExamples(items, examples.labels, list(examples.langs), examples.pad_id)


# ----------------------------------------------------------------------------- models

def ffn_targets(num_layers: int, first_layer: int = 0) -> str:
    """A target regex for both FFN linears of BERT-style layers `first_layer`..`num_layers - 1`."""
    layers = "|".join(str(i) for i in range(first_layer, num_layers))
    return rf".*\.layer\.({layers})\.(intermediate\.dense|output\.dense)"


@dataclass
class Classifier:
    """A classification model ready to train, with its exact parameter counts on the full encoder."""

    model: nn.Module
    method: str
    parameter_counts: dict[str, int]
    trainable: int = 0

    def logits(self, batch: Mapping[str, torch.Tensor], langs: Sequence[str]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if isinstance(self.model, PolyModel):
            return self.model(**inputs, lang=list(langs)).logits
        return self.model(**inputs).logits


def build_classifier(encoder: nn.Module, label_names: Sequence[str], languages: Sequence[str],
                     settings: FinetuneSettings) -> Classifier:
    """A copy of `encoder` under a fresh classification head, wrapped with LMS (routes on the FFNs of the
    trained layers, plus a shared route for FD) unless the method is naive. Frozen lower layers are cut
    off: their cached output is fed as `inputs_embeds`."""
    torch.manual_seed(settings.seed)
    model = classification_model(copy.deepcopy(encoder), label_names)
    body = encoder_body(model)
    num_layers = body.config.num_hidden_layers
    if settings.frozen_layers > num_layers:
        raise ConfigError(f"frozen_layers={settings.frozen_layers} but the encoder has {num_layers} layers")
    if settings.method != "naive":
        if settings.frozen_layers == num_layers:
            raise ConfigError("LMS needs at least one trained layer; lower frozen_layers")
        config = LMSConfig(languages=list(languages), rank=settings.rank, synthesis="language",
                           shared_route=settings.method == "lms_fd", init_std=settings.init_std,
                           target_modules=ffn_targets(num_layers, settings.frozen_layers))
        model = wrap(model, config)
        counts = model.parameter_counts().as_dict()
    else:
        total = sum(p.numel() for p in model.parameters())
        counts = {"base": total, "language_specific": 0, "shared_route": 0, "training_extra": 0,
                  "inference_extra_language_routes": 0, "inference_extra_shared_route": 0,
                  "inference_extra_merged": 0}
    if settings.freeze_embeddings or settings.frozen_layers > 0:
        for parameter in body.embeddings.parameters():
            parameter.requires_grad_(False)
    for layer in body.encoder.layer[:settings.frozen_layers]:
        for parameter in layer.parameters():
            parameter.requires_grad_(False)
    if settings.frozen_layers > 0:
        body.encoder.layer = nn.ModuleList(list(body.encoder.layer)[settings.frozen_layers:])
        body.config.num_hidden_layers = num_layers - settings.frozen_layers
        body.embeddings = PassThroughEmbeddings()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Classifier(model, settings.method, counts, trainable)


# ----------------------------------------------------------------------------- training

def _route_parameter_ids(classifier: Classifier) -> set[int]:
    if not isinstance(classifier.model, PolyModel):
        return set()
    return {id(p) for p in classifier.model.added_state_dict().values()}


class Trainer:
    """AdamW with linear warm-up and decay, one step at a time, so runs can be interleaved for timing."""

    def __init__(self, classifier: Classifier, settings: FinetuneSettings, train: EncodedExamples):
        self.classifier, self.settings, self.train = classifier, settings, train
        routes = _route_parameter_ids(classifier)
        params = [p for p in classifier.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in routes], "lr": settings.lr}]
        route_params = [p for p in params if id(p) in routes]
        if route_params:
            groups.append({"params": route_params, "lr": settings.route_lr or settings.lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        total, warmup = settings.steps, max(1, settings.warmup)
        schedule = lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.step_count = 0

    def next_index(self) -> list[int]:
        """A random batch: languages mix freely, each example keeps its own route."""
        return torch.randint(len(self.train), (self.settings.batch_size,), generator=self.generator).tolist()

    def loss(self, index: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = self.train.batch(index)
        langs = [self.train.langs[i] for i in index]
        labels = batch["labels"]
        if self.classifier.method == "lms_fd":
            # Both routes in one pass: the batch twice, language routes then the shared route.
            doubled = {k: torch.cat([v, v]) for k, v in batch.items() if k != "labels"}
            logits = self.classifier.logits(doubled, langs + [SHARED] * len(langs))
            language_logits, shared_logits = logits.split(len(langs))
            fd = fuse_distillation_loss(language_logits, shared_logits, labels, self.settings.kl_weight)
            return {"loss": fd.loss, "ce_language": fd.ce_language, "ce_shared": fd.ce_shared, "kl": fd.kl}
        return {"loss": F.cross_entropy(self.classifier.logits(batch, langs), labels)}

    def step(self, index: Optional[Sequence[int]] = None) -> dict[str, float]:
        self.classifier.model.train()
        parts = self.loss(self.next_index() if index is None else index)
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return {k: float(v.detach()) for k, v in parts.items()}


def finetune(classifier: Classifier, train: EncodedExamples, settings: FinetuneSettings,
             progress: bool = True) -> list[float]:
    """Train for `settings.steps`; returns the loss of every step."""
    from tqdm.auto import tqdm

    if len(train) == 0:
        raise ValueError("no training examples")
    trainer = Trainer(classifier, settings, train)
    losses = []
    bar = tqdm(range(settings.steps), desc=f"train {settings.method} seed {settings.seed}", disable=not progress)
    for _ in bar:
        losses.append(trainer.step()["loss"])
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
    classifier.model.eval()
    return losses


# ----------------------------------------------------------------------------- evaluation

def predict(classifier: Classifier, examples: EncodedExamples, route: str = "language",
            batch_size: int = 64) -> list[int]:
    """Arg-max labels; `route` is "language" (each example's own route), "shared", or "none" (naive)."""
    if route not in ("language", "shared", "none"):
        raise ValueError(f"route={route!r}; allowed: 'language', 'shared', 'none'")
    model = classifier.model
    model.eval()
    predictions: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            index = list(range(start, min(start + batch_size, len(examples))))
            batch = examples.batch(index)
            langs = [SHARED] * len(index) if route == "shared" else [examples.langs[i] for i in index]
            predictions += classifier.logits(batch, langs).argmax(-1).tolist()
    return predictions


def accuracy_per_language(classifier: Classifier, test: EncodedExamples, route: str = "language",
                          batch_size: int = 64) -> dict[str, float]:
    """Accuracy (in %) per language, then their mean under "average"."""
    predictions = torch.tensor(predict(classifier, test, route, batch_size))
    correct = (predictions == test.labels).float()
    scores: dict[str, float] = {}
    for lang in dict.fromkeys(test.langs):
        mask = torch.tensor([l == lang for l in test.langs])
        scores[lang] = round(100.0 * float(correct[mask].mean()), 2)
    scores["average"] = round(sum(scores.values()) / len(scores), 2)
    return scores


# ----------------------------------------------------------------------------- throughput

def measure_throughput(classifiers: Mapping[str, Classifier], train: EncodedExamples, settings: FinetuneSettings,
                       steps: int = 20, warmup_steps: int = 2, progress: bool = True) -> dict[str, Any]:
    """Training examples/s of each classifier, steps interleaved in one process on the same batches
    (these machines are noisy: only the ratios mean anything). The order alternates every step."""
    from tqdm.auto import tqdm

    trainers = {name: Trainer(c, settings.replaced(method=c.method, steps=steps + warmup_steps), train)
                for name, c in classifiers.items()}
    generator = torch.Generator().manual_seed(settings.seed + 1)
    seconds = {name: 0.0 for name in trainers}
    names = list(trainers)
    for step in tqdm(range(warmup_steps + steps), desc="throughput", disable=not progress):
        index = torch.randint(len(train), (settings.batch_size,), generator=generator).tolist()
        for name in (names if step % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            trainers[name].step(index)
            if step >= warmup_steps:
                seconds[name] += time.perf_counter() - start
    rates = {name: steps * settings.batch_size / s for name, s in seconds.items()}
    reference = "naive" if "naive" in rates else names[0]  # the baseline when it is measured
    return {"examples_per_s": {k: round(v, 2) for k, v in rates.items()},
            "relative_to": reference,
            "relative": {k: round(v / rates[reference], 3) for k, v in rates.items()},
            "steps": steps, "batch_size": settings.batch_size}


# ----------------------------------------------------------------------------- experiments

@dataclass
class ExperimentSpec:
    """Which runs to make: methods x seeds, trained on `train_languages`, tested on every language."""

    languages: list[str]
    train_languages: Optional[list[str]] = None  # None: all (multilingual); ["en"]: zero-shot from English
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    name: str = "classify"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"methods {unknown} unknown; allowed: {list(METHODS)}")
        outside = [l for l in (self.train_languages or []) if l not in self.languages]
        if outside:
            raise ConfigError(f"train_languages {outside} are not in languages {self.languages}")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")


def run_experiment(encoder: nn.Module, spec: ExperimentSpec, settings: FinetuneSettings,
                   train: EncodedExamples, test: EncodedExamples, label_names: Sequence[str],
                   progress: bool = True, test_variants: Optional[Mapping[str, EncodedExamples]] = None
                   ) -> dict[str, Any]:
    """Every method x seed: fine-tune, score every variant per language; means and spreads over seeds.

    `test_variants` maps a suffix to another version of `test` (e.g. "+lirp": LRP2-shifted states), each
    scored as its own variant ("naive+lirp")."""
    tests = {"": test, **(test_variants or {})}
    train_langs = spec.train_languages or spec.languages
    train_part = train.subset(train_langs)
    runs: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    for method in spec.methods:
        for seed in spec.seeds:
            run_settings = settings.replaced(method=method, seed=seed)
            classifier = build_classifier(encoder, label_names, spec.languages, run_settings)
            counts[method] = {**classifier.parameter_counts, "trainable": classifier.trainable}
            started = time.perf_counter()
            losses = finetune(classifier, train_part, run_settings, progress)
            seconds = time.perf_counter() - started
            for (route, suffix) in [(r, x) for r in EVAL_ROUTES[method] for x in tests]:
                runs.append({"variant": VARIANT_NAMES[(method, route)] + suffix, "method": method, "route": route,
                             "seed": seed, "accuracy": accuracy_per_language(classifier, tests[suffix], route,
                                                                              settings.eval_batch_size),
                             "first_loss": round(sum(losses[:10]) / len(losses[:10]), 4),
                             "last_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
                             "train_seconds": round(seconds, 1)})
    return {"name": spec.name, "languages": spec.languages, "train_languages": train_langs,
            "settings": asdict(settings), "runs": runs, "summary": summarize(runs),
            "parameters": parameter_table(counts)}


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and language: mean and (population) standard deviation of accuracy over seeds."""
    by_variant: dict[str, list[Mapping[str, float]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run["accuracy"])
    summary = {}
    for variant, scores in by_variant.items():
        summary[variant] = {}
        for lang in scores[0]:
            values = [s[lang] for s in scores]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            summary[variant][lang] = {"mean": round(mean, 2), "std": round(std, 2), "n": len(values)}
    return summary


def parameter_table(counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, Any]]:
    """Training and inference parameters of each variant, and the inference overhead over the base in %."""
    table = {}
    for method, c in counts.items():
        for route in EVAL_ROUTES[method]:
            extra = {"none": 0, "language": c["inference_extra_language_routes"],
                     "shared": c["inference_extra_shared_route"]}[route]
            table[VARIANT_NAMES[(method, route)]] = {
                "base": c["base"], "training_extra": c["training_extra"], "trainable": c["trainable"],
                "inference_extra": extra, "inference_total": c["base"] + extra,
                "inference_extra_percent": round(100.0 * extra / c["base"], 3)}
    return table


def markdown_report(results: Mapping[str, Any]) -> str:
    """Accuracy tables (mean ± std over seeds per language) and the parameter table, as Markdown."""
    lines = [f"## {results['name']}: trained on {', '.join(results['train_languages'])}", ""]
    langs = list(results["languages"]) + ["average"]
    lines.append("| variant | " + " | ".join(langs) + " |")
    lines.append("|---|" + "---|" * len(langs))
    for variant, per_lang in results["summary"].items():
        cells = [f"{per_lang[l]['mean']:.2f} ± {per_lang[l]['std']:.2f}" if l in per_lang else "–" for l in langs]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in results["runs"]})
    lines += ["", f"Accuracy in %, mean ± std over seeds {seeds}.", ""]
    lines += ["| variant | base | trainable | training extra | inference extra | inference extra % |",
              "|---|---|---|---|---|---|"]
    for variant, p in results["parameters"].items():
        lines.append(f"| {variant} | {p['base']:,} | {p['trainable']:,} | {p['training_extra']:,} | "
                     f"{p['inference_extra']:,} | {p['inference_extra_percent']:.3f} |")
    if "throughput" in results:
        t = results["throughput"]
        lines += ["", f"Training throughput ({t['steps']} interleaved steps of {t['batch_size']} mixed-language "
                  "examples):", "", "| method | examples/s | relative |", "|---|---|---|"]
        for name, rate in t["examples_per_s"].items():
            lines.append(f"| {name} | {rate} | {t['relative'][name]:.3f} |")
    return "\n".join(lines) + "\n"

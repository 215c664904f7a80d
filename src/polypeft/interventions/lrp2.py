"""LRP2 (Xu et al. 2023): shift hidden states from a language to the pivot's (LIRP) and back (LSRP).

Parameter-free forward hooks driven by per-layer language vectors, plus the per-language layer search.

Layer convention, used by every function here and in `lens.py`: layer `k` of a stack with `N`
blocks is the hidden state that enters block `k` (for `k < N`) and layer `N` is the output of the
last block. That is `hidden_states[k]` of a transformers output, except layer `N` on models with a
final norm after the blocks (Llama, Qwen, T5): transformers reports the normed state there, polypeft
the state before the norm, so that language vectors and the hooks that use them see the same thing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..core.fileio import atomic_write
from ..core.modes import evaluation_mode

POOLINGS = ("mean", "last")
STACKS = ("encoder", "decoder")
# Names that transformers gives to the list of transformer blocks (BERT/XLM-R `encoder.layer`,
# BART/Marian `encoder.layers`, T5 `block`, Llama/Qwen `model.layers`, GPT-2 `transformer.h`).
BLOCK_LIST_NAMES = ("layer", "layers", "block", "h")
# Config fields that decide what the hidden states of a model look like; their hash is part of
# the identity that language vectors carry.
IDENTITY_FIELDS = (
    "model_type", "hidden_size", "d_model", "num_hidden_layers", "num_layers", "encoder_layers",
    "decoder_layers", "num_decoder_layers", "num_attention_heads", "intermediate_size", "d_ff",
    "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size", "max_position_embeddings", "hidden_act",
    "activation_function", "layer_norm_eps", "rms_norm_eps", "type_vocab_size",
)
FORMAT_NAME = "polypeft.language_vectors"


class InterventionError(ValueError):
    """A model, layer, language or vector file that an LRP2 or LENS intervention cannot use."""


# ----------------------------------------------------------------------------------------------
# Model structure
# ----------------------------------------------------------------------------------------------

def find_blocks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The transformer block lists of a model, keyed "encoder" and/or "decoder".

    A list whose path mentions neither (Llama `model.layers`, GPT-2 `transformer.h`) is a decoder.
    """
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
        and name.split(".")[-1] in BLOCK_LIST_NAMES
    ]
    # T5 keeps a ModuleList named `layer` inside each block: only the outermost lists are stacks.
    candidates.sort(key=lambda item: item[0].count("."))
    outer: list[tuple[str, nn.ModuleList]] = []
    for name, module in candidates:
        if not any(name.startswith(kept + ".") for kept, _ in outer):
            outer.append((name, module))
    stacks: dict[str, list[tuple[str, nn.ModuleList]]] = {}
    for name, module in outer:
        parts = name.split(".")
        if any("encoder" in part for part in parts):
            stacks.setdefault("encoder", []).append((name, module))
        else:
            stacks.setdefault("decoder", []).append((name, module))
    if not stacks:
        raise InterventionError(
            f"no transformer block list found in {type(model).__name__}: looked for a ModuleList "
            f"named one of {list(BLOCK_LIST_NAMES)} (e.g. encoder.layer, model.layers, block)"
        )
    for stack, found in stacks.items():
        if len(found) > 1:
            raise InterventionError(
                f"{type(model).__name__} has {len(found)} candidate {stack} block lists "
                f"{[name for name, _ in found]}; polypeft needs exactly one per stack"
            )
    return {stack: found[0][1] for stack, found in stacks.items()}


def default_stack(model: nn.Module) -> str:
    """The encoder where the model has one (encoders, encoder-decoders), else the decoder."""
    return "encoder" if "encoder" in find_blocks(model) else "decoder"


def resolve_stacks(model: nn.Module, stack: Optional[str], where: str) -> list[str]:
    """Turn a `stack` argument (None, "encoder", "decoder", "both") into the stacks it names."""
    available = find_blocks(model)
    if stack is None:
        return [default_stack(model)]
    if stack == "both":
        if set(available) != set(STACKS):
            raise InterventionError(
                f"{where}: stack='both' needs an encoder-decoder model, but "
                f"{type(model).__name__} has only {sorted(available)}"
            )
        return list(STACKS)
    if stack not in available:
        raise InterventionError(
            f"{where}: stack={stack!r} is not in {type(model).__name__}; it has "
            f"{sorted(available)} (or pass 'both' for an encoder-decoder, None for the default)"
        )
    return [stack]


def model_identity(model: nn.Module) -> dict[str, object]:
    """What makes hidden states of this model comparable: architecture, shape and weights.

    The embedding fingerprint (4 significant digits of a small weight slice) tells two random
    initialisations of one config apart, yet survives a dtype change.
    """
    config = getattr(model, "config", None)
    fields = {name: getattr(config, name) for name in IDENTITY_FIELDS if hasattr(config, name)}
    config_hash = hashlib.sha256(
        json.dumps(fields, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    fingerprint = (
        f"{embedding.detach()[:8].float().abs().sum().item():.4g}" if embedding is not None else "none"
    )
    blocks = find_blocks(model)
    return {
        "model_class": type(model).__name__,
        "model_type": str(getattr(config, "model_type", "unknown")),
        "hidden_size": int(getattr(config, "hidden_size", getattr(config, "d_model", 0)) or 0),
        "stack_layers": {stack: len(module) for stack, module in sorted(blocks.items())},
        "config_hash": config_hash,
        "embedding_fingerprint": fingerprint,
    }


# The model class is recorded for the reader but not compared: a BertModel and the BertForMaskedLM
# around the same weights produce the same hidden states.
COMPARED_IDENTITY_KEYS = ("model_type", "hidden_size", "stack_layers", "config_hash", "embedding_fingerprint")


def check_identity(recorded: Mapping[str, object], model: nn.Module, what: str, where: str) -> None:
    """Refuse a model whose identity differs from the one `what` was computed on."""
    current = model_identity(model)
    differing = [key for key in COMPARED_IDENTITY_KEYS if recorded.get(key) != current.get(key)]
    if differing:
        raise InterventionError(
            f"{where}: {what} were computed on a different model (fields {differing} differ).\n"
            f"  recorded model: {json.dumps(dict(recorded), sort_keys=True)}\n"
            f"  this model:     {json.dumps(current, sort_keys=True)}\n"
            f"recompute them on this model"
        )


# ----------------------------------------------------------------------------------------------
# Hidden states per layer, pooled per sentence
# ----------------------------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by a capture hook once the deepest wanted layer is seen: the rest is not needed."""


def _hidden_of(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, hidden): mean over real tokens, or the last real token.

    "last" takes the rightmost position with mask 1, so it works with left and right padding.
    """
    mask = attention_mask.to(hidden.device)
    if pooling == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * (positions + 1)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise InterventionError(f"pooling={pooling!r} is not supported; use one of {list(POOLINGS)}")


def layer_states(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    stack: str,
    pooling: str,
) -> dict[int, torch.Tensor]:
    """Pooled hidden states of one batch at the given layers of one stack (graph kept if enabled).

    For the decoder of an encoder-decoder the text is fed to both sides (teacher forcing on itself),
    so a decoder language vector describes text in that language passing through the decoder.
    """
    blocks = find_blocks(model)[stack]
    check_layers(layers, len(blocks), "layer_states")
    attention_mask = batch["attention_mask"]
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    handles = []

    def keep(layer: int, hidden: torch.Tensor) -> None:
        captured[layer] = pool(hidden, attention_mask, pooling)
        if layer == deepest:
            raise _StopForward

    def pre_hook(module, args, kwargs):
        keep(0, args[0] if args else kwargs["hidden_states"])

    def make_post_hook(layer: int):
        return lambda module, args, output: keep(layer, _hidden_of(output))

    try:
        if 0 in layers:
            handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for layer in sorted(set(layers) - {0}):
            handles.append(blocks[layer - 1].register_forward_hook(make_post_hook(layer)))
        inputs = dict(batch)
        if stack == "decoder" and getattr(model.config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = inputs["input_ids"]
            inputs["decoder_attention_mask"] = attention_mask
        try:
            model(**inputs)
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(layers) - set(captured))
    if missing:
        raise InterventionError(f"layers {missing} of the {stack} were never reached in the forward pass")
    return captured


def check_layers(layers: Sequence[int], num_blocks: int, where: str) -> None:
    bad = [layer for layer in layers if not isinstance(layer, int) or not 0 <= layer <= num_blocks]
    if bad or not layers:
        raise InterventionError(
            f"{where}: layers {bad or list(layers)} are not valid; a stack with {num_blocks} blocks "
            f"has layers 0 (input of the first block) to {num_blocks} (output of the last)"
        )


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def tokenize(tokenizer, texts: Sequence[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    if getattr(tokenizer, "pad_token", None) is None:
        raise InterventionError(
            f"tokenizer {type(tokenizer).__name__} has no pad token; batches need one "
            f"(for causal LMs: tokenizer.pad_token = tokenizer.eos_token)"
        )
    # Right padding whatever the tokenizer's default: with left padding, models with absolute positions
    # (GPT-2) would see every real token at another position, and the statistics would depend on the batch.
    side = getattr(tokenizer, "padding_side", None)
    if side is not None:
        tokenizer.padding_side = "right"
    try:
        encoded = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
    finally:
        if side is not None:
            tokenizer.padding_side = side
    return {
        name: tensor.to(device)
        for name, tensor in encoded.items()
        if name in ("input_ids", "attention_mask", "token_type_ids")
    }


def iterate_pooled(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    stack: str,
    pooling: str,
    batch_size: int,
    max_length: int,
    progress: Optional[tqdm] = None,
) -> Iterator[dict[int, torch.Tensor]]:
    """Pooled states per batch of `texts` (no gradients, eval mode)."""
    device = model_device(model)
    with evaluation_mode(model):
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            batch = tokenize(tokenizer, chunk, max_length, device)
            yield layer_states(model, batch, layers, stack, pooling)
            if progress is not None:
                progress.update(len(chunk))


# ----------------------------------------------------------------------------------------------
# Language vectors
# ----------------------------------------------------------------------------------------------

@dataclass
class LanguageVectors:
    """Mean hidden state per stack, language and layer: `means[stack][language]` is (layers, hidden)."""

    means: dict[str, dict[str, torch.Tensor]]
    layers: list[int]
    pooling: str
    identity: dict[str, object]
    num_sentences: dict[str, int] = field(default_factory=dict)

    @property
    def stacks(self) -> list[str]:
        return sorted(self.means)

    @property
    def languages(self) -> list[str]:
        return sorted(next(iter(self.means.values())))

    def vector(self, language: str, layer: int, stack: Optional[str] = None) -> torch.Tensor:
        """mu_language(layer) of one stack (the only stack when there is one)."""
        stack = stack or (self.stacks[0] if len(self.stacks) == 1 else None)
        if stack not in self.means:
            raise InterventionError(f"stack {stack!r} has no language vectors; stacks present: {self.stacks}")
        if language not in self.means[stack]:
            raise InterventionError(
                f"no language vector for {language!r}; vectors exist for {self.languages}"
            )
        if layer not in self.layers:
            raise InterventionError(f"no language vector at layer {layer}; computed layers are {self.layers}")
        return self.means[stack][language][self.layers.index(layer)]

    def check_model(self, model: nn.Module, where: str = "language vectors") -> None:
        check_identity(self.identity, model, "these language vectors", where)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """One safetensors file; tensors `{stack}/{language}`, the rest as metadata. Atomic."""
        tensors = {
            f"{stack}/{language}": tensor.float().contiguous().cpu()
            for stack, by_language in self.means.items()
            for language, tensor in by_language.items()
        }
        metadata = {
            "format": FORMAT_NAME,
            "layers": json.dumps(self.layers),
            "pooling": self.pooling,
            "identity": json.dumps(self.identity, sort_keys=True),
            "num_sentences": json.dumps(self.num_sentences, sort_keys=True),
        }
        return atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> "LanguageVectors":
        """Read a file written by `save`; with `model`, refuse it unless it was computed on that model."""
        path = Path(path)
        if not path.is_file():
            raise InterventionError(f"language vector file {str(path)!r} does not exist")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                raise InterventionError(
                    f"{path}: not a polypeft language vector file (format {metadata.get('format')!r}, "
                    f"expected {FORMAT_NAME!r})"
                )
            means: dict[str, dict[str, torch.Tensor]] = {}
            for key in handle.keys():
                stack, language = key.split("/", 1)
                means.setdefault(stack, {})[language] = handle.get_tensor(key)
        vectors = cls(
            means=means,
            layers=json.loads(metadata["layers"]),
            pooling=metadata["pooling"],
            identity=json.loads(metadata["identity"]),
            num_sentences=json.loads(metadata.get("num_sentences", "{}")),
        )
        if model is not None:
            vectors.check_model(model, where=f"loading {path}")
        return vectors


def check_texts(texts_by_language: Mapping[str, Sequence[str]], where: str) -> None:
    if not texts_by_language:
        raise InterventionError(f"{where}: texts_by_language is empty; give at least one language")
    for language, texts in texts_by_language.items():
        if not isinstance(language, str) or not language or "/" in language:
            raise InterventionError(f"{where}: language key {language!r} must be a non-empty code without '/'")
        if isinstance(texts, str) or len(texts) == 0:
            raise InterventionError(
                f"{where}: texts_by_language[{language!r}] must be a non-empty list of sentences"
            )


def language_vectors(
    model: nn.Module,
    texts_by_language: Mapping[str, Sequence[str]],
    tokenizer,
    layers: Optional[Sequence[int]] = None,
    pooling: str = "mean",
    batch_size: int = 32,
    max_sentences: Optional[int] = None,
    stack: Optional[str] = None,
    max_length: int = 128,
    progress: bool = True,
) -> LanguageVectors:
    """Per-layer mean hidden state of each language (paper: 10k sentences per language).

    A sentence's state is the mean over its non-padding tokens ("mean") or its last one ("last");
    the language vector is the mean over sentences, so every sentence weighs the same.
    `layers=None` takes all layers 0..N; `stack` is None (default stack), "encoder", "decoder"
    or "both" for encoder-decoders.
    """
    if pooling not in POOLINGS:
        raise InterventionError(f"pooling={pooling!r} is not supported; use one of {list(POOLINGS)}")
    if batch_size < 1:
        raise InterventionError(f"batch_size={batch_size} must be at least 1")
    check_texts(texts_by_language, "language_vectors")
    stacks = resolve_stacks(model, stack, "language_vectors")
    blocks = find_blocks(model)
    texts = {
        language: list(sentences)[: max_sentences] if max_sentences else list(sentences)
        for language, sentences in texts_by_language.items()
    }
    total = sum(len(sentences) for sentences in texts.values()) * len(stacks)
    means: dict[str, dict[str, torch.Tensor]] = {}
    resolved_layers: Optional[list[int]] = None
    with tqdm(total=total, desc="language vectors", unit="sent", disable=not progress) as bar:
        for stack_name in stacks:
            num_blocks = len(blocks[stack_name])
            stack_layers = list(range(num_blocks + 1)) if layers is None else list(layers)
            check_layers(stack_layers, num_blocks, f"language_vectors ({stack_name})")
            if resolved_layers is not None and resolved_layers != stack_layers:
                raise InterventionError(
                    "stack='both' with layers=None needs encoder and decoder of equal depth; "
                    "pass explicit layers"
                )
            resolved_layers = stack_layers
            means[stack_name] = {}
            for language, sentences in texts.items():
                total_states = None
                for pooled in iterate_pooled(
                    model, tokenizer, sentences, stack_layers, stack_name, pooling, batch_size,
                    max_length, bar,
                ):
                    # Sums in float64: 10k sentences of fp16/bf16 states would lose digits otherwise.
                    stacked = torch.stack([pooled[layer] for layer in stack_layers]).double().sum(1)
                    total_states = stacked if total_states is None else total_states + stacked
                means[stack_name][language] = (total_states / len(sentences)).float().cpu()
    return LanguageVectors(
        means=means,
        layers=resolved_layers or [],
        pooling=pooling,
        identity=model_identity(model),
        num_sentences={language: len(sentences) for language, sentences in texts.items()},
    )


# ----------------------------------------------------------------------------------------------
# The LRP2 hooks
# ----------------------------------------------------------------------------------------------

LanguagesArg = Union[str, Sequence[str]]


class LRP2:
    """LIRP at layer i: h <- h - mu_l(i) + mu_pivot(i); LSRP at layer j > i: h <- h - mu_pivot(j) + mu_l(j).

    Hooks go on the blocks of `stack` ("encoder", "decoder" or "both"; default: the encoder if the
    model has one). The language of each example comes from `set_languages` (one code, or one per
    example so a batch may mix languages) or the `languages(...)` context manager. `lsrp_layer=None`
    is LIRP only, the variant for sentence embedders. Use as a context manager or call `remove()`:
    afterwards the model is exactly as it was.
    """

    def __init__(
        self,
        model: nn.Module,
        vectors: LanguageVectors,
        lirp_layer: int,
        lsrp_layer: Optional[int] = None,
        pivot: str = "en",
        stack: Optional[str] = None,
    ):
        vectors.check_model(model, where="LRP2")
        self.stacks = resolve_stacks(model, stack, "LRP2")
        self.lirp_layer = lirp_layer
        self.lsrp_layer = lsrp_layer
        self.pivot = pivot
        missing = [name for name in self.stacks if name not in vectors.means]
        if missing:
            raise InterventionError(
                f"LRP2: no language vectors for stack(s) {missing}; the vectors cover {vectors.stacks} "
                f"(compute them with language_vectors(..., stack=...))"
            )
        if pivot not in vectors.languages:
            raise InterventionError(
                f"LRP2: pivot {pivot!r} has no language vector; vectors exist for {vectors.languages}"
            )
        blocks = find_blocks(model)
        wanted = [lirp_layer] + ([] if lsrp_layer is None else [lsrp_layer])
        for name in self.stacks:
            check_layers(wanted, len(blocks[name]), f"LRP2 ({name})")
        if lsrp_layer is not None and lsrp_layer < lirp_layer:
            raise InterventionError(
                f"LRP2: lsrp_layer={lsrp_layer} comes before lirp_layer={lirp_layer}; LSRP must be at "
                f"the LIRP layer or after it (j >= i; j == i undoes LIRP at once)"
            )
        absent = [layer for layer in wanted if layer not in vectors.layers]
        if absent:
            raise InterventionError(
                f"LRP2: layers {absent} have no language vectors; computed layers are {vectors.layers}"
            )
        self.language_codes = vectors.languages
        self._language_ids = {code: index for index, code in enumerate(self.language_codes)}
        self._current: dict[str, Optional[torch.Tensor]] = {name: None for name in self.stacks}
        self._handles: list = []
        try:
            for name in self.stacks:
                self._attach_stack(vectors, blocks[name], name)
        except BaseException:
            self.remove()  # all or nothing: a failed construction leaves no hook behind
            raise

    def _attach_stack(self, vectors: LanguageVectors, blocks: nn.ModuleList, name: str) -> None:
        pivot_at = lambda layer: vectors.vector(self.pivot, layer, name)  # noqa: E731
        # Row l of a table is the shift for language l; the pivot's row is zero.
        to_pivot = torch.stack(
            [pivot_at(self.lirp_layer) - vectors.vector(code, self.lirp_layer, name) for code in self.language_codes]
        )
        self._attach(blocks, name, self.lirp_layer, to_pivot)
        if self.lsrp_layer is not None:
            from_pivot = torch.stack(
                [vectors.vector(code, self.lsrp_layer, name) - pivot_at(self.lsrp_layer) for code in self.language_codes]
            )
            self._attach(blocks, name, self.lsrp_layer, from_pivot)

    # -- languages -----------------------------------------------------------------------------

    def set_languages(self, languages: LanguagesArg, decoder_languages: Optional[LanguagesArg] = None) -> None:
        """One code for the batch or one per example; the decoder may get its own (else the same)."""
        for name in self.stacks:
            spec = decoder_languages if (name == "decoder" and decoder_languages is not None) else languages
            self._current[name] = self._ids(spec, f"LRP2.set_languages ({name})")

    @contextmanager
    def languages(
        self, languages: LanguagesArg, decoder_languages: Optional[LanguagesArg] = None
    ) -> Iterator["LRP2"]:
        """Set the languages for the block, then restore the previous ones."""
        previous = dict(self._current)
        self.set_languages(languages, decoder_languages)
        try:
            yield self
        finally:
            self._current = previous

    def _ids(self, spec: LanguagesArg, where: str) -> torch.Tensor:
        codes = [spec] if isinstance(spec, str) else list(spec)
        if not codes:
            raise InterventionError(f"{where}: empty language list")
        unknown = [code for code in codes if code not in self._language_ids]
        if unknown:
            raise InterventionError(
                f"{where}: unknown language code(s) {sorted(set(map(str, unknown)))}; the language "
                f"vectors cover {self.language_codes}"
            )
        return torch.tensor([self._language_ids[code] for code in codes], dtype=torch.long)

    # -- hooks ---------------------------------------------------------------------------------

    def _attach(self, blocks: nn.ModuleList, stack: str, layer: int, shifts: torch.Tensor) -> None:
        def shifted(hidden: torch.Tensor) -> torch.Tensor:
            ids = self._current[stack]
            if ids is None:
                raise InterventionError(
                    f"LRP2: no languages set for the {stack}; call set_languages(...) with one code "
                    f"or one per example (known: {self.language_codes})"
                )
            batch = hidden.shape[0]
            if ids.shape[0] != batch:
                if ids.shape[0] != 1 and batch % ids.shape[0]:
                    raise InterventionError(
                        f"LRP2: {ids.shape[0]} languages were set but the {stack} saw a batch of {batch}; "
                        f"give one code, one per example, or a divisor of the batch (beam search)"
                    )
                ids = ids.repeat_interleave(batch // ids.shape[0])
            shift = shifts.to(device=hidden.device, dtype=hidden.dtype)[ids.to(hidden.device)]
            return hidden + shift.unsqueeze(1)

        if layer == 0:
            def pre_hook(module, args, kwargs):
                if args:
                    return (shifted(args[0]),) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = shifted(kwargs["hidden_states"])
                return args, kwargs

            handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
        else:
            def post_hook(module, args, output):
                if isinstance(output, tuple):
                    return (shifted(output[0]),) + tuple(output[1:])
                return shifted(output)

            # prepend: run before transformers' own hidden-state recorders, so the reported
            # hidden_states[k] shows the shifted state.
            handle = blocks[layer - 1].register_forward_hook(post_hook, prepend=True)
        self._handles.append(handle)

    def remove(self) -> None:
        """Take every hook off; the model computes exactly what it computed before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "LRP2":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"LRP2(lirp_layer={self.lirp_layer}, lsrp_layer={self.lsrp_layer}, pivot={self.pivot!r}, "
            f"stacks={self.stacks}, active={self.active})"
        )


# ----------------------------------------------------------------------------------------------
# Layer search
# ----------------------------------------------------------------------------------------------

ScoreFn = Callable[[str, Optional[int], Optional[int]], float]


@dataclass
class LayerSearchResult:
    """Scores of every (language, lirp_layer, lsrp_layer) tried; lsrp_layer None is LIRP only."""

    rows: list[dict]
    baseline: dict[str, float]
    higher_is_better: bool = True

    @property
    def languages(self) -> list[str]:
        return sorted({row["language"] for row in self.rows})

    def best(self, language: str, lirp_only: bool = False) -> dict:
        """The best row of one language (optionally among LIRP-only rows), with its gain over no LRP2."""
        rows = [
            row for row in self.rows
            if row["language"] == language and (not lirp_only or row["lsrp_layer"] is None)
        ]
        if not rows:
            raise InterventionError(f"no search results for language {language!r}; searched {self.languages}")
        sign = 1.0 if self.higher_is_better else -1.0
        chosen = max(rows, key=lambda row: sign * row["score"])
        result = dict(chosen)
        if language in self.baseline:
            result["baseline"] = self.baseline[language]
            result["gain"] = chosen["score"] - self.baseline[language]
        return result

    def best_per_language(self, lirp_only: bool = False) -> dict[str, dict]:
        return {language: self.best(language, lirp_only) for language in self.languages}

    def to_dict(self) -> dict:
        return {
            "higher_is_better": self.higher_is_better,
            "baseline": self.baseline,
            "best": self.best_per_language(),
            "best_lirp_only": self.best_per_language(lirp_only=True)
            if any(row["lsrp_layer"] is None for row in self.rows) else {},
            "rows": self.rows,
        }

    def save_json(self, path: Union[str, os.PathLike]) -> Path:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        return atomic_write(path, lambda temporary: Path(temporary).write_text(text + "\n", encoding="utf-8"))

    def plot_heatmaps(self, directory: Union[str, os.PathLike], prefix: str = "lrp2_heatmap") -> list[Path]:
        """One PNG per language: rows LIRP layer i, columns LSRP layer j plus a LIRP-only column."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        directory = Path(directory)
        paths = []
        for language in self.languages:
            rows = [row for row in self.rows if row["language"] == language]
            lirp_layers = sorted({row["lirp_layer"] for row in rows})
            lsrp_layers = sorted({row["lsrp_layer"] for row in rows if row["lsrp_layer"] is not None})
            has_lirp_only = any(row["lsrp_layer"] is None for row in rows)
            columns: list[Optional[int]] = list(lsrp_layers) + ([None] if has_lirp_only else [])
            grid = torch.full((len(lirp_layers), len(columns)), math.nan)
            for row in rows:
                grid[lirp_layers.index(row["lirp_layer"]), columns.index(row["lsrp_layer"])] = row["score"]
            figure = Figure(figsize=(max(4.8, 1.6 + 0.6 * len(columns)), max(3.4, 1.4 + 0.45 * len(lirp_layers))))
            FigureCanvasAgg(figure)
            axes = figure.add_subplot()
            image = axes.imshow(grid.numpy(), cmap="viridis", aspect="auto")
            figure.colorbar(image, ax=axes)
            axes.set_xticks(range(len(columns)), [("none" if c is None else str(c)) for c in columns])
            axes.set_yticks(range(len(lirp_layers)), [str(layer) for layer in lirp_layers])
            axes.set_xlabel("LSRP layer j (none = LIRP only)")
            axes.set_ylabel("LIRP layer i")
            best = self.best(language)
            title = f"LRP2 {language}: best i={best['lirp_layer']}, j={best['lsrp_layer']}"
            if language in self.baseline:
                title += f"\nscore {best['score']:.3f} vs {self.baseline[language]:.3f} without"
            axes.set_title(title, fontsize=9)
            if grid.numel() <= 400:
                for r in range(grid.shape[0]):
                    for c in range(grid.shape[1]):
                        if not math.isnan(grid[r, c]):
                            axes.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=6, color="w")
            figure.tight_layout()
            path = directory / f"{prefix}_{language}.png"
            atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
            paths.append(path)
        return paths


def search_layers(
    score_fn: ScoreFn,
    languages: Sequence[str],
    candidate_layers: Sequence[int],
    candidate_lsrp_layers: Optional[Sequence[int]] = None,
    pairs: bool = True,
    lirp_only: bool = True,
    baseline: bool = True,
    higher_is_better: bool = True,
    progress: bool = True,
) -> LayerSearchResult:
    """Score `score_fn(language, i, j)` over the grid and keep the best per language.

    The grid is every (i, j) with i from `candidate_layers`, j from `candidate_lsrp_layers`
    (default the same) and j > i when `pairs`, plus (i, None) for LIRP only when `lirp_only`;
    `baseline` also scores (None, None), the model without LRP2. `lrp2_scorer` builds a score_fn.
    """
    if not languages:
        raise InterventionError("search_layers: no languages given")
    if not candidate_layers:
        raise InterventionError("search_layers: candidate_layers is empty")
    if not pairs and not lirp_only:
        raise InterventionError("search_layers: pairs=False and lirp_only=False leaves nothing to search")
    lsrp_candidates = list(candidate_lsrp_layers if candidate_lsrp_layers is not None else candidate_layers)
    grid: list[tuple[int, Optional[int]]] = []
    for i in candidate_layers:
        if lirp_only:
            grid.append((i, None))
        if pairs:
            grid.extend((i, j) for j in lsrp_candidates if j > i)
    if not grid:
        raise InterventionError(
            f"search_layers: no pair j > i between {list(candidate_layers)} and {lsrp_candidates}"
        )
    rows: list[dict] = []
    baselines: dict[str, float] = {}
    total = len(languages) * (len(grid) + (1 if baseline else 0))
    with tqdm(total=total, desc="LRP2 layer search", disable=not progress) as bar:
        for language in languages:
            if baseline:
                baselines[language] = float(score_fn(language, None, None))
                bar.update(1)
            for i, j in grid:
                rows.append({"language": language, "lirp_layer": i, "lsrp_layer": j, "score": float(score_fn(language, i, j))})
                bar.update(1)
    return LayerSearchResult(rows=rows, baseline=baselines, higher_is_better=higher_is_better)


def lrp2_scorer(
    model: nn.Module,
    vectors: LanguageVectors,
    evaluate: Callable[[str, Optional[LRP2]], float],
    pivot: str = "en",
    stack: Optional[str] = None,
) -> ScoreFn:
    """A score_fn that runs `evaluate(language, lrp2)` with LRP2 at (i, j) on (lrp2 None: without).

    The hooks start with `language` set for every example; an evaluation that also encodes pivot
    text (retrieval candidates) calls `lrp2.set_languages(pivot)` around those batches.
    """

    def score(language: str, lirp_layer: Optional[int], lsrp_layer: Optional[int]) -> float:
        if lirp_layer is None:
            return evaluate(language, None)
        with LRP2(model, vectors, lirp_layer, lsrp_layer, pivot=pivot, stack=stack) as lrp2:
            lrp2.set_languages(language)
            return evaluate(language, lrp2)

    return score

"""LRP2 (Xu et al. 2023): shift hidden states from a language to the pivot's (LIRP) and back (LSRP).

Per-layer language vectors (mean pooled states per language) and the parameter-free hooks they drive.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..core.fileio import write_safetensors
from .capture import (POOLINGS, InterventionError, check_identity, check_layers, check_texts, checked_max_length,
                      find_blocks, iterate_pooled, model_identity, resolve_stacks)

FORMAT_NAME = "polypeft.language_vectors"


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

    def with_mean_language(self, name: str = "mean") -> "LanguageVectors":
        """A copy with one more language `name`, the average of every language's vector (beyond the paper).

        As LRP2's pivot it moves every language, the old pivot included, toward the common mean: both sides shift."""
        if name in self.languages:
            raise InterventionError(f"with_mean_language: {name!r} is already a language here ({self.languages})")
        means = {stack: {**by_language, name: torch.stack(list(by_language.values())).mean(0)}
                 for stack, by_language in self.means.items()}
        counts = {**self.num_sentences, name: sum(self.num_sentences.values())}
        return LanguageVectors(means, list(self.layers), self.pooling, dict(self.identity), counts)

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
        return write_safetensors(path, tensors, metadata=metadata)

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


def language_vectors(
    model: nn.Module,
    texts_by_language: Mapping[str, Sequence[str]],
    tokenizer,
    layers: Optional[Sequence[int]] = None,
    pooling: str = "mean",
    batch_size: int = 32,
    max_sentences: Optional[int] = None,
    stack: Optional[str] = None,
    max_length: Optional[int] = None,
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
    max_length = checked_max_length(model, max_length, "language_vectors")
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

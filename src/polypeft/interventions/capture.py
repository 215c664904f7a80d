"""Hidden states of a model's block stacks, pooled per sentence, and the identity of the model they came from.

What LRP2's language vectors and LENS's probe are computed from; both refuse states of another model.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.anatomy import AnatomyError, blocks
from ..core.modes import evaluation_mode

# Layer convention, used by every function here, in `lrp2.py` and in `lens.py`: layer `k` of a stack
# with `N` blocks is the hidden state that enters block `k` (for `k < N`) and layer `N` is the output of
# the last block. That is `hidden_states[k]` of a transformers output, except layer `N` on models with a
# final norm after the blocks (Llama, Qwen, T5): transformers reports the normed state there, polypeft
# the state before the norm, so that language vectors and the hooks that use them see the same thing.

POOLINGS = ("mean", "last")
STACKS = ("encoder", "decoder")
# Config fields that decide what the hidden states of a model look like; their hash is part of
# the identity that language vectors carry.
IDENTITY_FIELDS = (
    "model_type", "hidden_size", "d_model", "num_hidden_layers", "num_layers", "encoder_layers",
    "decoder_layers", "num_decoder_layers", "num_attention_heads", "intermediate_size", "d_ff",
    "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size", "max_position_embeddings", "hidden_act",
    "activation_function", "layer_norm_eps", "rms_norm_eps", "type_vocab_size",
)


class InterventionError(ValueError):
    """A model, layer, language or vector file that an LRP2 or LENS intervention cannot use."""


def find_blocks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The transformer block lists of a model, keyed "encoder" and/or "decoder" (the anatomy table's)."""
    try:
        stacks = blocks(model)
    except AnatomyError as error:
        raise InterventionError(str(error)) from None
    return {side: stack.blocks for side, stack in stacks.items()}


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


# Learned-position models that keep the first positions for padding (RoBERTa's padding_idx + 1 offset).
POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "xlm-roberta-xl")


DEFAULT_MAX_LENGTH = 128  # tokens per text when the caller does not say, or the model's positions if fewer


def position_limit(model: nn.Module) -> Optional[int]:
    """How many positions a learned-position model has (None for relative or rotary positions: no table)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or getattr(config, "rope_theta", None) is not None:
        return None
    if getattr(config, "model_type", None) in POSITION_OFFSET_TYPES:
        limit -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return limit


def checked_max_length(model: nn.Module, max_length: Optional[int], where: str) -> int:
    """`max_length`, refused before any text is read when it runs past the model's positions (the embedding lookup
    would fail mid-run with an index error); None is 128 or the model's positions if fewer."""
    limit = position_limit(model)
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    if limit is not None and max_length > limit:
        raise InterventionError(f"{where}: max_length={max_length} is beyond the {limit} positions "
                                f"{type(model).__name__} has (its config's max_position_embeddings); give max_length "
                                f"<= {limit}")
    return max_length


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


"""The contract table: one row per routed method, with how to build its config and its parameter formulas.

A new method is one row here; tests/test_contract.py then runs every shared check on it and every tiny model.
What a method may do (language routes, merge, LoRA export, a source pass) is read from its declared traits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import polypeft as pp
from polypeft.methods.clsr import CLSRConfig
from polypeft.methods.flare.layer import FLAREConfig
from polypeft.methods.lora import LoRAConfig
from polypeft.methods.ls_ffn import LSFFNConfig
from polypeft.methods.switch import SwitchConfig
from tiny_models import ALL_KINDS, ENCODER_DECODER, FFN_LAYOUT, build, random_batch, randomize_added

LANGS = ["en", "de", "fr"]
KINDS = ALL_KINDS
HIDDEN, FFN, RANK = 32, 48, 4  # tiny_models' d_model and FFN width; the rank every low-rank row uses
HAS_BIAS = {"bart": True, "marian": True, "bert": True, "t5": False, "llama": False, "qwen2": False}
# attention + FFN sublayers (CLSR targets) and stacks (encoder, decoder) of each tiny model
SUBLAYERS = {"bert": 4, "bart": 10, "marian": 10, "t5": 10, "llama": 4, "qwen2": 4}
STACKS = {"bert": 1, "bart": 2, "marian": 2, "t5": 2, "llama": 1, "qwen2": 1}


def ffn_linears(kind: str) -> int:
    layers, per_layer = FFN_LAYOUT[kind]
    return layers * per_layer


def ffn_weights(kind: str) -> int:
    """The weights (and biases) of one layer's FFN linears: d -> FFN (one or two of them) and FFN -> d."""
    _, per_layer = FFN_LAYOUT[kind]
    bias = (per_layer - 1) * FFN + HIDDEN if HAS_BIAS[kind] else 0
    return per_layer * HIDDEN * FFN + bias


def low_rank(kind: str, routes: int = 1) -> int:
    """rank * (in + out) per route on every FFN linear: the paper's L * d * (r + c) for LMS."""
    return routes * ffn_linears(kind) * RANK * (HIDDEN + FFN)


def ls_ffn_copies(kind: str, copies: int) -> int:
    return copies * FFN_LAYOUT[kind][0] * ffn_weights(kind)


def switch_extra(kind: str) -> int:
    """Every 2nd layer of each stack: 3 experts = the base FFN + 2 copies, and a bias-free router."""
    return FFN_LAYOUT[kind][0] // 2 * (2 * ffn_weights(kind) + 3 * HIDDEN)


def clsr_language(kind: str) -> int:
    return STACKS[kind] * len(LANGS) * HIDDEN * HIDDEN


def clsr_extra(kind: str) -> int:
    """Per stack W_lang; per sublayer a shared projection and the gate MLP (hidden 8)."""
    return clsr_language(kind) + SUBLAYERS[kind] * ((HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * 8 + 8) + (8 + 1))


@dataclass(frozen=True)
class Row:
    make: Callable[..., pp.MethodConfig]
    training_extra: Callable[[str], int]  # parameters the method adds on a tiny model of this kind
    language_specific: Callable[[str], int] = lambda kind: 0
    starts_at_base: bool = True  # the wrapped model's output equals the base model's before training
    language_wise: bool = False  # the encoder reads src_lang, the decoder tgt_lang
    auxiliary_loss: bool = False  # a training forward leaves a loss term (load balance, gate budget)
    exact_unmerge: bool = False  # unmerge restores the base weight from a saved copy, bit for bit


TABLE = {
    "lms_pair": Row(lambda **kw: pp.LMSConfig(languages=LANGS, rank=RANK, synthesis="pair", **kw),
                    lambda kind: low_rank(kind, len(LANGS)), lambda kind: low_rank(kind, len(LANGS))),
    "lms_language": Row(lambda **kw: pp.LMSConfig(languages=LANGS, rank=RANK, synthesis="language", **kw),
                        lambda kind: low_rank(kind, len(LANGS)), lambda kind: low_rank(kind, len(LANGS)),
                        language_wise=True),
    "lora": Row(lambda **kw: LoRAConfig(languages=LANGS, rank=RANK, **kw), low_rank),
    # One copy per language replacing the base FFN (no shared route by default).
    "ls_ffn": Row(lambda **kw: LSFFNConfig(languages=LANGS, **kw), lambda kind: ls_ffn_copies(kind, len(LANGS) - 1),
                  lambda kind: ls_ffn_copies(kind, len(LANGS)), language_wise=True, exact_unmerge=True),
    "switch": Row(lambda **kw: SwitchConfig(languages=LANGS, num_experts=3, **kw), switch_extra,
                  starts_at_base=False, auxiliary_loss=True),
    "clsr": Row(lambda **kw: CLSRConfig(languages=LANGS, gate_hidden_size=8, **kw), clsr_extra, clsr_language,
                language_wise=True, auxiliary_loss=True),
    "flare": Row(lambda **kw: FLAREConfig(languages=LANGS, rank=RANK, **kw), low_rank),
}
METHODS = tuple(TABLE)


def make(method: str, kind: str, randomize: bool = True, **overrides) -> pp.PolyModel:
    poly = pp.wrap(build(kind), TABLE[method].make(**overrides))
    if randomize:
        randomize_added(poly)
    return poly


def seq2seq_batch(kind: str, batch_size: int = 4) -> dict[str, torch.Tensor]:
    batch = random_batch(kind, batch_size)
    batch["labels"] = batch.pop("decoder_input_ids")
    return batch


def training_batch(kind: str, batch_size: int = 4) -> dict[str, torch.Tensor]:
    return seq2seq_batch(kind, batch_size) if kind in ENCODER_DECODER else random_batch(kind, batch_size)


def traits(method: str) -> dict[str, bool]:
    """What a method declares it can do, read from its config and its layers on a tiny model."""
    poly = make(method, "bart", randomize=False)
    config, layers = poly.poly_config, list(poly.routed_layers.values())
    return {
        "language_routes": not config.language_agnostic,
        "mergeable": all(layer.cannot_merge_because is None for layer in layers),
        "low_rank": all(layer.lora_factors((0, 0)) is not None for layer in layers),
        "source_pass": config.needs_source_pass,
    }


TRAITS = {method: traits(method) for method in METHODS}


def methods_with(trait: str, value: bool = True) -> tuple[str, ...]:
    return tuple(method for method in METHODS if TRAITS[method][trait] == value)

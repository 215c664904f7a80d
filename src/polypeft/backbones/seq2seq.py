"""The small translation model polypeft builds itself, as a transformers MarianMTModel.

Being a real transformers model, injection, generate() and save_pretrained follow users' code paths.
"""
from __future__ import annotations

from dataclasses import dataclass

import transformers as tf

from ..core.config import ConfigError


@dataclass(frozen=True)
class Seq2SeqPreset:
    d_model: int
    ffn: int
    layers: int
    heads: int


PRESETS = {
    # For tests and the demo: trains on a laptop CPU in minutes.
    "tiny": Seq2SeqPreset(d_model=128, ffn=256, layers=2, heads=4),
    # The paper's IWSLT transformer_small.
    "small": Seq2SeqPreset(d_model=512, ffn=1024, layers=6, heads=4),
}


def build_translation_model(
    preset: str,
    vocab_size: int,
    pad_id: int,
    eos_id: int,
    decoder_start_id: int,
    dropout: float = 0.1,
    max_positions: int = 512,
) -> tf.MarianMTModel:
    """A randomly initialised encoder-decoder of the named preset, embeddings shared and tied."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    shape = PRESETS[preset]
    config = tf.MarianConfig(
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        d_model=shape.d_model,
        encoder_ffn_dim=shape.ffn,
        decoder_ffn_dim=shape.ffn,
        encoder_layers=shape.layers,
        decoder_layers=shape.layers,
        encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads,
        max_position_embeddings=max_positions,
        dropout=dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="relu",
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=decoder_start_id,
        decoder_start_token_id=decoder_start_id,
        forced_eos_token_id=eos_id,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )
    model = tf.MarianMTModel(config)
    # Marian's loss is a plain mean that ignores `num_items_in_batch`; without this, transformers' Trainer takes its
    # `**kwargs` for token-count normalisation and under gradient accumulation sums the micro-batch means instead
    # of averaging them: the loss and gradient come out `accumulation` times too large (bench/trainer_vs_loop.py).
    model.accepts_loss_kwargs = False
    return model

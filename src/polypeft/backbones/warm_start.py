"""A translation model warm-started from a pretrained multilingual encoder (e5-small), as transformers'
EncoderDecoderModel over two BERTs, its vocabulary pruned to the corpus.

From scratch on this CPU the translation models emitted generic English (bench/RESULTS.md §2.1); a pretrained
encoder already reads every source language, so only the decoder and cross-attention start from nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import transformers as tf

from ..core.config import ConfigError, NonNegativeInt, PositiveInt, TypedConfig
from ..data.pruned_vocab import PrunedTokenizer


@dataclass
class WarmStart(TypedConfig):
    """The pretrained encoder a translation recipe starts from (its `base:` block) and the decoder put on it."""

    # "e5-small" (the offline multilingual-e5-small) or a local directory holding a BertModel and its tokenizer.
    encoder: str = "e5-small"
    decoder_layers: PositiveInt = 3
    # "upper": the decoder's self-attention and FFN start as the encoder's top layers; "scratch": random.
    decoder_init: Literal["upper", "scratch"] = "upper"
    # The embeddings and this many lower encoder blocks stay as pretrained: no gradient, no backward through them.
    frozen_layers: NonNegativeInt = 0
    # What the decoder starts from: "bos" for every target, or "language", its own `<2xx>` row in the decoder's
    # vocabulary (trained with the decoder), which tells target languages apart when the encoder is frozen.
    decoder_start: Literal["bos", "language"] = "bos"

    def check_targets(self, targets: int) -> None:
        """Frozen embeddings keep each encoder tag at bos's row: several targets need the decoder's own start."""
        if self.frozen_layers and targets > 1 and self.decoder_start == "bos":
            raise ConfigError(f"base.frozen_layers={self.frozen_layers} freezes the embeddings, where each <2xx> tag "
                              f"starts as bos's row, so the {targets} target languages could not be told apart: set "
                              "base.decoder_start to language, directions to into_pivot, or frozen_layers 0")


def decoder_start_column(model_config, target_languages) -> Optional[torch.Tensor]:
    """Each example's first decoder input where the model starts per target language (None: from bos alone)."""
    starts = getattr(model_config, "decoder_start_by_language", None)
    if not starts:
        return None
    unknown = sorted(set(target_languages) - set(starts))
    if unknown:
        raise ConfigError(f"target languages {unknown} have no decoder start in this model; it starts "
                          f"{sorted(starts)}: translate into one of those")
    return torch.tensor([starts[lang] for lang in target_languages], dtype=torch.long)


def load_pretrained(settings: WarmStart):
    """The pretrained encoder and its tokenizer (e5-small converted and cached once, or a local directory)."""
    from .e5 import load_encoder

    model, tokenizer = load_encoder(settings.encoder)
    if model.config.model_type != "bert":
        raise ConfigError(f"base.encoder={settings.encoder!r} is a {model.config.model_type!r} model; the warm start "
                          "takes a BERT-style encoder (model_type 'bert', as e5-small)")
    layers = model.config.num_hidden_layers
    if settings.frozen_layers > layers:
        raise ConfigError(f"base.frozen_layers={settings.frozen_layers} but {settings.encoder!r} has {layers} layers")
    if settings.decoder_init == "upper" and settings.decoder_layers > layers:
        raise ConfigError(f"base.decoder_layers={settings.decoder_layers} with decoder_init 'upper' needs as many "
                          f"encoder layers; {settings.encoder!r} has {layers}: lower it or use decoder_init 'scratch'")
    return model, tokenizer


def build_warm_model(settings: WarmStart, tokenizer: PrunedTokenizer, dropout: float = 0.1,
                     pretrained: torch.nn.Module | None = None) -> tf.EncoderDecoderModel:
    """The encoder as pretrained over the pruned source ids, a BERT decoder with cross-attention over the
    target ids (input and output embeddings tied), lower layers frozen as `settings` says."""
    if pretrained is None:
        pretrained = load_pretrained(settings)[0]
    shape = pretrained.config
    common = dict(hidden_size=shape.hidden_size, num_attention_heads=shape.num_attention_heads,
                  intermediate_size=shape.intermediate_size, hidden_act=shape.hidden_act,
                  max_position_embeddings=shape.max_position_embeddings, type_vocab_size=shape.type_vocab_size,
                  layer_norm_eps=shape.layer_norm_eps, hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0,
                  pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    encoder = tf.BertModel(tf.BertConfig(vocab_size=tokenizer.source_vocab_size,
                                         num_hidden_layers=shape.num_hidden_layers, **common), add_pooling_layer=False)
    decoder = tf.BertLMHeadModel(tf.BertConfig(vocab_size=tokenizer.vocab_size, num_hidden_layers=settings.decoder_layers,
                                               is_decoder=True, add_cross_attention=True, tie_word_embeddings=True,
                                               **common))
    model = tf.EncoderDecoderModel(encoder=encoder, decoder=decoder)
    for key, value in (("decoder_start_token_id", tokenizer.decoder_start_id), ("pad_token_id", tokenizer.pad_id),
                       ("eos_token_id", tokenizer.eos_id), ("bos_token_id", tokenizer.bos_id)):
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    if tokenizer.decoder_starts:  # base.decoder_start "language": a start row per target, never generated
        model.config.decoder_start_by_language = dict(tokenizer.decoder_starts)
        model.generation_config.suppress_tokens = sorted(tokenizer.decoder_starts.values())
    model.config.tie_word_embeddings = False  # the encoder's and the decoder's vocabularies differ
    copy_pretrained(model, pretrained, tokenizer, settings)
    freeze_lower_layers(model, settings.frozen_layers)
    model.accepts_loss_kwargs = False  # the pipeline's own token-mean loss, as the Marian presets
    return model


@torch.no_grad()
def copy_pretrained(model: tf.EncoderDecoderModel, pretrained: torch.nn.Module, tokenizer: PrunedTokenizer,
                    settings: WarmStart) -> None:
    """Pretrained weights into the encoder (pruned rows; each `<2xx>` tag starts as bos's row) and the decoder
    (pruned rows, each per-language start as bos's row, positions, and with `decoder_init="upper"` the top layers'
    attention and FFN)."""
    state = pretrained.state_dict()
    words = state["embeddings.word_embeddings.weight"]
    source_rows = tokenizer.source.rows(words)
    tags = words[tokenizer.source.kept[tokenizer.bos_id]].expand(len(tokenizer.languages), -1)
    encoder_state = {**state, "embeddings.word_embeddings.weight": torch.cat([source_rows, tags])}
    model.encoder.load_state_dict({k: v for k, v in encoder_state.items() if not k.startswith("pooler.")}, strict=True)
    embeddings = model.decoder.bert.embeddings
    starts = words[tokenizer.target.kept[tokenizer.bos_id]].expand(len(tokenizer.decoder_starts), -1)
    embeddings.word_embeddings.weight.copy_(torch.cat([tokenizer.target.rows(words), starts]))
    for name in ("position_embeddings", "token_type_embeddings", "LayerNorm"):
        getattr(embeddings, name).load_state_dict(pretrained.embeddings.get_submodule(name).state_dict())
    if settings.decoder_init == "upper":
        top = pretrained.encoder.layer[-settings.decoder_layers:]
        for block, source in zip(model.decoder.bert.encoder.layer, top):
            for part in ("attention", "intermediate", "output"):
                block.get_submodule(part).load_state_dict(source.get_submodule(part).state_dict())
    model.decoder.tie_weights()


def freeze_lower_layers(model: tf.EncoderDecoderModel, count: int) -> None:
    """No gradient for the encoder's embeddings and its `count` lower blocks (0: everything trains)."""
    if count == 0:
        return
    for module in (model.encoder.embeddings, *model.encoder.encoder.layer[:count]):
        for parameter in module.parameters():
            parameter.requires_grad_(False)

"""Tiny models of each architecture family, built from configs, for the test matrix."""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 64


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `kind`, in float64 so equality checks are tight."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if kind == "bert":
        config = tf.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                               max_position_embeddings=64, **common)
        model = tf.BertModel(config)
    elif kind == "bart":
        config = tf.BartConfig(d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=2, decoder_attention_heads=2, max_position_embeddings=64,
                               decoder_start_token_id=2, forced_eos_token_id=None, **common)
        model = tf.BartForConditionalGeneration(config)
    elif kind == "marian":
        config = tf.MarianConfig(d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=2, decoder_layers=2,
                                 encoder_attention_heads=2, decoder_attention_heads=2, max_position_embeddings=64,
                                 decoder_start_token_id=1, decoder_vocab_size=VOCAB, **common)
        model = tf.MarianMTModel(config)
    elif kind == "t5":
        config = tf.T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, d_kv=16, num_layers=2, num_heads=2,
                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = tf.T5ForConditionalGeneration(config)
    elif kind == "llama":
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=64, **common)
        model = tf.LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = tf.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=64, **common)
        model = tf.Qwen2ForCausalLM(config)
    else:
        raise ValueError(kind)
    return model.double().eval()


# kind -> (number of layers holding FFNs, FFN linears per layer)
FFN_LAYOUT = {"bert": (2, 2), "bart": (4, 2), "marian": (4, 2), "t5": (4, 2), "llama": (2, 3), "qwen2": (2, 3)}
ENCODER_DECODER = ("bart", "marian", "t5")
ALL_KINDS = tuple(FFN_LAYOUT)


def random_batch(kind: str, batch_size: int, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids with no padding, so per-example and batched runs see identical inputs."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if kind in ENCODER_DECODER:
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (batch_size, 5), generator=generator)
    return batch


def output_of(model, batch, **routes) -> torch.Tensor:
    out = model(**batch, **routes)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize_added(poly, seed: int = 3, scale: float = 0.3) -> None:
    """Give every route non-zero factors so routes differ (F starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in poly.added_state_dict().items():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


def bert_tokenizer(words, model: str = "WordLevel"):
    """A fast word-level tokenizer over `words`, whose first are [PAD] [UNK]; BERT-style ([CLS] ... [SEP]) when
    the next two are [CLS] [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(getattr(models, model)({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]"}
    if list(words[2:4]) == ["[CLS]", "[SEP]"]:
        backend.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
        specials.update(cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)

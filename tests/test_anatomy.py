"""The anatomy table against tiny models of every architecture it names, built from their configs.

Each row: wrap finds exactly the FFN linears the table names, LRP2 finds the block lists, and a few
representative architectures route a mixed batch exactly as they route each example alone."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

import polypeft as pp
from polypeft.core.anatomy import (
    ANATOMY,
    DEFAULT_FFN_TARGETS,
    AnatomyError,
    attention_linears,
    block_of,
    blocks,
    closes_ffn,
    default_targets,
    embeddings_of,
    ffn_linears,
    side_of,
)
from polypeft.core.inject import find_targets, name_matches
from polypeft.interventions.capture import find_blocks, layer_states
from tiny_models import output_of, randomize_added

LANGS = ["en", "de", "fr"]
VOCAB = 64
IDS = dict(vocab_size=VOCAB, pad_token_id=1, bos_token_id=0, eos_token_id=2)
ENCODER_SIZES = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)
DECODER_SIZES = dict(ENCODER_SIZES, num_key_value_heads=2, head_dim=8)
SEQ2SEQ_SIZES = dict(d_model=16, encoder_ffn_dim=24, decoder_ffn_dim=24, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=2, decoder_attention_heads=2, decoder_start_token_id=2)
T5_SIZES = dict(d_model=16, d_ff=24, d_kv=8, num_layers=2, num_heads=2, decoder_start_token_id=0)

# model_type -> (config fields, auto class, {side: blocks}, FFN linears per block, attention linears
# per block of the first side): the counts are written out here, not read from the table.
ARCHITECTURES = {
    "bert": (ENCODER_SIZES, tf.AutoModel, {"encoder": 2}, 2, 4),
    "xlm-roberta": (ENCODER_SIZES, tf.AutoModel, {"encoder": 2}, 2, 4),
    "deberta-v2": (ENCODER_SIZES, tf.AutoModel, {"encoder": 2}, 2, 4),
    "distilbert": (dict(dim=16, hidden_dim=24, n_layers=2, n_heads=2), tf.AutoModel, {"encoder": 2}, 2, 4),
    "t5": (T5_SIZES, tf.AutoModelForSeq2SeqLM, {"encoder": 2, "decoder": 2}, 2, 4),
    "mt5": (T5_SIZES, tf.AutoModelForSeq2SeqLM, {"encoder": 2, "decoder": 2}, 3, 4),  # gated: wi_0, wi_1, wo
    "bart": (SEQ2SEQ_SIZES, tf.AutoModelForSeq2SeqLM, {"encoder": 2, "decoder": 2}, 2, 4),
    "mbart": (SEQ2SEQ_SIZES, tf.AutoModelForSeq2SeqLM, {"encoder": 2, "decoder": 2}, 2, 4),
    "marian": (dict(SEQ2SEQ_SIZES, decoder_vocab_size=VOCAB), tf.AutoModelForSeq2SeqLM,
               {"encoder": 2, "decoder": 2}, 2, 4),
    "m2m_100": (SEQ2SEQ_SIZES, tf.AutoModelForSeq2SeqLM, {"encoder": 2, "decoder": 2}, 2, 4),
    "llama": (DECODER_SIZES, tf.AutoModelForCausalLM, {"decoder": 2}, 3, 4),
    "qwen2": (DECODER_SIZES, tf.AutoModelForCausalLM, {"decoder": 2}, 3, 4),
    "qwen3": (DECODER_SIZES, tf.AutoModelForCausalLM, {"decoder": 2}, 3, 4),
    "mistral": (DECODER_SIZES, tf.AutoModelForCausalLM, {"decoder": 2}, 3, 4),
    "gemma": (DECODER_SIZES, tf.AutoModelForCausalLM, {"decoder": 2}, 3, 4),
    "gemma2": (DECODER_SIZES, tf.AutoModelForCausalLM, {"decoder": 2}, 3, 4),
    "gemma3_text": (DECODER_SIZES, tf.AutoModelForCausalLM, {"decoder": 2}, 3, 4),
    "phi3": (DECODER_SIZES, tf.AutoModelForCausalLM, {"decoder": 2}, 2, 2),  # fused gate_up_proj, qkv_proj
    "xglm": (dict(d_model=16, ffn_dim=24, num_layers=2, attention_heads=2), tf.AutoModelForCausalLM,
             {"decoder": 2}, 2, 4),
    "opt": (dict(ENCODER_SIZES, ffn_dim=24, word_embed_proj_dim=16), tf.AutoModelForCausalLM, {"decoder": 2}, 2, 4),
    "bloom": (dict(hidden_size=16, n_layer=2, n_head=2), tf.AutoModelForCausalLM, {"decoder": 2}, 2, 2),
    "gpt_neox": (ENCODER_SIZES, tf.AutoModelForCausalLM, {"decoder": 2}, 2, 2),
    "falcon": (dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2), tf.AutoModelForCausalLM,
               {"decoder": 2}, 2, 2),
    "gpt2": (dict(n_embd=16, n_layer=2, n_head=2, n_positions=32), tf.AutoModelForCausalLM, {"decoder": 2}, 2, 2),
}
WRAPPABLE = tuple(sorted(ARCHITECTURES))
MIXED_ROUTE_CASES = ("distilbert", "mt5", "m2m_100", "phi3", "gemma2", "bloom", "falcon", "gpt2")


def build(model_type: str) -> nn.Module:
    fields, auto_class, _, _, _ = ARCHITECTURES[model_type]
    torch.manual_seed(0)
    config = tf.AutoConfig.for_model(model_type, **fields, **IDS)
    return auto_class.from_config(config).double().eval()


def batch_for(model: nn.Module, batch_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (batch_size, 6), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (batch_size, 4), generator=generator)
    return batch


def table_ffn_names(model: nn.Module) -> set[str]:
    return {
        f"{stack.path}.{index}.{name}"
        for stack in blocks(model).values()
        for index, block in enumerate(stack.blocks)
        for name, _ in ffn_linears(model, block)
    }


def test_every_architecture_the_issues_name_has_a_row():
    assert set(ARCHITECTURES) <= set(ANATOMY)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_table_names_blocks_ffn_and_attention_of_each_architecture(model_type):
    model = build(model_type)
    _, _, sides, ffn_per_block, attention_per_block = ARCHITECTURES[model_type]
    assert {side: len(stack) for side, stack in find_blocks(model).items()} == sides
    first = next(iter(blocks(model).values())).blocks[0]
    assert len(ffn_linears(model, first)) == ffn_per_block
    assert len(attention_linears(model, first)) == attention_per_block
    names = [name for name, _ in ffn_linears(model, first)]
    assert closes_ffn(names[-1]) and not any(closes_ffn(name) for name in names[:-1]), names


@pytest.mark.parametrize("model_type", WRAPPABLE)
def test_wrap_finds_exactly_the_ffn_linears_the_table_names(model_type):
    model = build(model_type)
    expected = table_ffn_names(model)
    _, _, sides, ffn_per_block, _ = ARCHITECTURES[model_type]
    assert len(expected) == sum(sides.values()) * ffn_per_block
    poly = pp.wrap(model, pp.LMSConfig(languages=LANGS, rank=2))
    assert set(poly.routed_layers) == expected


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_sublayer_closes_in_one_linear_the_table_names(model_type):
    """CLSR's default targets come from the table: per block, one attention output per attention sublayer
    (self, and cross in a decoder of an encoder-decoder) and the FFN output."""
    model = build(model_type)
    found = [name for name, _ in find_targets(model, None, accept_conv1d=True, by_default="sublayer_outputs")]
    _, _, sides, _, _ = ARCHITECTURES[model_type]
    per_block = {side: 3 if side == "decoder" and "encoder" in sides else 2 for side in sides}
    assert len(found) == sum(count * per_block[side] for side, count in sides.items()), found
    assert all(closes_ffn(name) or "attn" in name or "attention" in name.lower() for name in found), found


def test_embeddings_come_from_the_table_and_other_models_are_told_which_rows_have_them():
    bert = build("bert")
    assert embeddings_of(bert) is bert.base_model.embeddings
    with pytest.raises(AnatomyError, match=r"does not say where its embeddings are; rows that do: \[.*'bert'"):
        embeddings_of(build("llama"))


def test_phi3_fused_gate_up_projection_is_targeted():
    poly = pp.wrap(build("phi3"), pp.LMSConfig(languages=LANGS, rank=2))
    assert {name.rsplit(".", 1)[1] for name in poly.routed_layers} == {"gate_up_proj", "down_proj"}
    gate_up = poly.routed_layers["model.layers.0.mlp.gate_up_proj"]
    assert gate_up.out_features == 2 * 24, "one fused linear of width 2 * intermediate"


def test_conv1d_ffn_is_wrapped_and_weight_copying_methods_refuse_it_by_name():
    model = build("gpt2")
    assert [name for name, _ in ffn_linears(model, model.transformer.h[0])] == ["mlp.c_fc", "mlp.c_proj"]
    poly = pp.wrap(model, pp.LMSConfig(languages=LANGS, rank=2))
    assert (poly.routed_layers["transformer.h.0.mlp.c_fc"].out_features,
            poly.routed_layers["transformer.h.0.mlp.c_fc"].in_features) == (64, 16)  # Conv1D weight is (16, 64)
    with pytest.raises(pp.TargetError, match=r"transformer\.h\.0\.mlp\.c_fc \(Conv1D\).*transposed.*nn\.Linear"):
        pp.wrap(build("gpt2"), pp.LSFFNConfig(languages=LANGS))


@pytest.mark.parametrize("model_type", MIXED_ROUTE_CASES)
def test_mixed_routes_equal_per_example_forwards(model_type):
    poly = pp.wrap(build(model_type), pp.LMSConfig(languages=LANGS, rank=2, synthesis="pair"))
    randomize_added(poly, scale=0.5)
    src, tgt = ["de", "fr", "en", "de"], ["en", "de", "fr", "fr"]
    batch = batch_for(poly.base_model, len(src))
    mixed = output_of(poly, batch, src_lang=src, tgt_lang=tgt)
    for row in range(len(src)):
        alone = output_of(poly, {key: value[row:row + 1] for key, value in batch.items()},
                          src_lang=src[row], tgt_lang=tgt[row])
        torch.testing.assert_close(mixed[row:row + 1], alone)
    swapped = output_of(poly, batch, src_lang=tgt, tgt_lang=src)
    assert not torch.allclose(mixed, swapped), "routes must change the output"


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "llama", "phi3", "bloom", "gpt2"])
def test_lrp2_block_hooks_see_the_states_transformers_reports(model_type):
    model = build(model_type)
    side = next(iter(find_blocks(model)))
    batch = batch_for(model, 2)
    reported = model(**batch, output_hidden_states=True).hidden_states
    captured = layer_states(model, batch, [0, 1], side, "mean")
    for layer in (0, 1):
        torch.testing.assert_close(captured[layer], reported[layer].mean(1))


def test_side_follows_the_stack_that_holds_the_layer():
    model = build("m2m_100")
    assert side_of(model, "model.encoder.layers.1.fc1") == "encoder"
    assert side_of(model, "model.decoder.layers.0.fc2") == "decoder"
    assert side_of(build("llama"), "model.layers.0.mlp.up_proj") == "decoder"
    assert side_of(build("bert"), "encoder.layer.0.output.dense") == "encoder"


def test_block_of_gives_stack_index_and_rest():
    model = build("t5")
    position = block_of("decoder.block.1.layer.2.DenseReluDense.wo", model)
    assert (position.blocks, position.index, position.count, position.side) == ("decoder.block", 1, 2, "decoder")
    assert position.rest == "layer.2.DenseReluDense.wo"
    assert block_of("lm_head", model) is None


def test_default_targets_choose_blocks_by_index():
    model = build("xlm-roberta")
    targets = default_targets(model, layers=[1])
    selected = {name for name, _ in model.named_modules() if name_matches(name, targets)}
    assert selected == {"encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"}


class CustomLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x):
        return x + self.fc2(self.fc1(x).relu())


class CustomModel(nn.Module):
    """A model with no `config`: not in the table, so the name guesses apply."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([CustomLayer(), CustomLayer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_model_outside_the_table_falls_back_to_the_name_guesses():
    model = CustomModel()
    assert default_targets(model) == DEFAULT_FFN_TARGETS == pp.DEFAULT_FFN_TARGETS
    poly = pp.wrap(model, pp.LMSConfig(languages=LANGS, rank=2))
    assert set(poly.routed_layers) == {f"layers.{i}.{name}" for i in (0, 1) for name in ("fc1", "fc2")}
    assert set(find_blocks(model)) == {"decoder"}
    with pytest.raises(AnatomyError, match=r"not in the anatomy table.*known model types"):
        default_targets(model, layers=[0])

"""Routed layers where users train: GPT-2's transposed Conv1D, linears inside MoE experts, and torch.compile.

Tiny models built from configs; each check fails if the feature breaks (wrong layout, silent mixing, recompiles)."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import polypeft as pp
from polypeft.methods.clsr import CLSRConfig
from polypeft.methods.ls_ffn import LSFFNConfig
from tiny_models import output_of, randomize_added

LANGS = ["en", "de", "fr"]
IDS = dict(vocab_size=64, pad_token_id=1, bos_token_id=0, eos_token_id=2)
SRC, TGT = ["de", "fr", "en", "de"], ["en", "de", "fr", "fr"]
MOE_SIZES = {
    "nllb-moe": dict(d_model=16, encoder_ffn_dim=24, decoder_ffn_dim=24, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=2, decoder_attention_heads=2, num_experts=2, encoder_sparse_step=2,
                     decoder_sparse_step=2, max_position_embeddings=64, decoder_start_token_id=2),
    "switch_transformers": dict(d_model=16, d_ff=24, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2,
                                num_experts=2, encoder_sparse_step=2, decoder_sparse_step=2, decoder_start_token_id=0),
}
# Expert linears each MoE model's table row must mark (and dense FFN linears it must not).
EXPERT_LINEAR = {"nllb-moe": "model.encoder.layers.1.ffn.experts.expert_0.fc1",
                 "switch_transformers": "encoder.block.1.layer.1.mlp.experts.expert_0.wi"}
DENSE_LINEAR = {"nllb-moe": "model.encoder.layers.0.ffn.fc1", "switch_transformers": "encoder.block.0.layer.1.mlp.wi"}


def build(model_type: str, **fields) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.AutoConfig.for_model(model_type, **fields, **IDS)
    auto = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
    return auto.from_config(config).double().eval()


def gpt2() -> torch.nn.Module:
    return build("gpt2", n_embd=16, n_layer=2, n_head=2, n_positions=32)


def batch_of(model: torch.nn.Module, batch_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 64, (batch_size, 6), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.randint(3, 64, (batch_size, 4), generator=generator)
    return batch


# ---- GPT-2 / mGPT: Conv1D stores its weight (in, out) ---------------------------------------------------
def routed_gpt2(config: pp.MethodConfig) -> pp.PolyModel:
    poly = pp.wrap(gpt2(), config)
    randomize_added(poly, scale=0.3)
    return poly


@pytest.mark.parametrize("synthesis", ["pair", "language"])
def test_gpt2_lms_mixed_routes_equal_per_example(synthesis):
    poly = routed_gpt2(pp.LMSConfig(languages=LANGS, rank=2, synthesis=synthesis))
    assert set(poly.routed_layers) == {f"transformer.h.{i}.mlp.{n}" for i in (0, 1) for n in ("c_fc", "c_proj")}
    batch = batch_of(poly.base_model, len(SRC))
    mixed = output_of(poly, batch, src_lang=SRC, tgt_lang=TGT)
    for row in range(len(SRC)):
        alone = output_of(poly, {k: v[row:row + 1] for k, v in batch.items()}, src_lang=SRC[row], tgt_lang=TGT[row])
        torch.testing.assert_close(mixed[row:row + 1], alone)
    assert not torch.allclose(mixed, output_of(poly, batch, src_lang=TGT, tgt_lang=SRC))


@pytest.mark.parametrize("config", [pp.LMSConfig(languages=LANGS, rank=2, synthesis="pair"),
                                    pp.LoRAConfig(languages=LANGS, rank=2)], ids=["lms", "lora"])
def test_gpt2_merge_equals_routed_output_and_unmerge_restores_the_weight(config):
    poly = routed_gpt2(config)
    batch = batch_of(poly.base_model, 2)
    routed = output_of(poly, batch, src_lang="de", tgt_lang="fr")
    weight = poly.base_model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    poly.merge(src="de", tgt="fr")
    assert not torch.allclose(poly.base_model.transformer.h[0].mlp.c_fc.weight, weight)
    torch.testing.assert_close(output_of(poly, batch, src_lang="de", tgt_lang="fr"), routed)
    poly.unmerge()
    torch.testing.assert_close(poly.base_model.transformer.h[0].mlp.c_fc.weight, weight)
    plain = poly.merge_and_unload(src="de", tgt="fr")
    assert type(plain.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    torch.testing.assert_close(plain(**batch).logits, routed)


@pytest.mark.parametrize("config", [pp.LMSConfig(languages=LANGS, rank=2, synthesis="pair"),
                                    pp.LoRAConfig(languages=LANGS, rank=2)], ids=["lms", "lora"])
def test_gpt2_save_and_load_are_exact(tmp_path, config):
    poly = routed_gpt2(config)
    batch = batch_of(poly.base_model, len(SRC))
    poly.save_pretrained(tmp_path)
    loaded = pp.PolyModel.from_pretrained(gpt2(), tmp_path)
    assert torch.equal(output_of(loaded, batch, src_lang=SRC, tgt_lang=TGT),
                       output_of(poly, batch, src_lang=SRC, tgt_lang=TGT))


def test_gpt2_lora_save_loads_in_peft_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    poly = routed_gpt2(pp.LoRAConfig(languages=LANGS, rank=2))
    batch = batch_of(poly.base_model, 2)
    poly.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(gpt2(), str(tmp_path))  # peft transposes for Conv1D itself
    torch.testing.assert_close(loaded(**batch).logits, poly(**batch).logits)


# ---- MoE experts: the router reorders token rows -----------------------------------------------------
@pytest.mark.parametrize("model_type", sorted(MOE_SIZES))
def test_moe_expert_linears_run_one_route_and_refuse_a_mixed_batch_by_name(model_type):
    poly = pp.wrap(build(model_type, **MOE_SIZES[model_type]), pp.LMSConfig(languages=LANGS, rank=2, synthesis="pair"))
    expert, dense = EXPERT_LINEAR[model_type], DENSE_LINEAR[model_type]
    assert poly.routed_layers[expert].in_moe_expert and not poly.routed_layers[dense].in_moe_expert
    randomize_added(poly, scale=0.5)
    batch = batch_of(poly.base_model, len(SRC))
    german = output_of(poly, batch, src_lang="de", tgt_lang="en")
    for name, layer in poly.routed_layers.items():  # only the experts' routes left: they must still count
        if not layer.in_moe_expert:
            layer.lms_F.data.zero_()
    assert not torch.allclose(output_of(poly, batch, src_lang="de", tgt_lang="en"),
                              output_of(poly, batch, src_lang="fr", tgt_lang="en"))
    assert torch.isfinite(german).all()
    with pytest.raises(pp.LanguageError, match=r"experts\.expert_\d\.\w+ sits inside an MoE expert.*reorders"):
        output_of(poly, batch, src_lang=SRC, tgt_lang=TGT)


def test_fused_expert_stacks_are_named_when_targeted():
    mixtral = build("mixtral", hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    with pytest.raises(pp.TargetError, match=r"model\.layers\.0\.mlp\.experts \(MixtralExperts\).*3-D.*gate_up_proj"):
        pp.wrap(mixtral, pp.LMSConfig(languages=LANGS, rank=2, target_modules=["experts", "o_proj"]))
    with pytest.raises(pp.TargetError, match=r"fused 3-D expert stacks \(model\.layers\.0\.mlp\.experts\)"):
        pp.wrap(mixtral, pp.LMSConfig(languages=LANGS, rank=2))  # the default FFN targets find no linear


# ---- torch.compile: one graph for every route mix ------------------------------------------------------
COMPILED_METHODS = {
    "lms": lambda: pp.LMSConfig(languages=LANGS, rank=2, synthesis="pair"),
    "ls_ffn": lambda: LSFFNConfig(languages=LANGS, shared_route=True),
    "clsr": lambda: CLSRConfig(languages=LANGS, gate_hidden_size=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(COMPILED_METHODS))
def test_compiled_model_serves_any_route_mix_without_recompiling(method):
    import torch._dynamo

    poly = pp.wrap(build("llama", hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=8), COMPILED_METHODS[method]())
    randomize_added(poly, scale=0.3)
    poly.eval()
    compilations = []

    def counting_backend(graph, example_inputs):
        compilations.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(poly, backend=counting_backend)
    batch = batch_of(poly.base_model, len(SRC))
    generator = torch.Generator().manual_seed(0)
    mixes = [(SRC, TGT), ("de", "fr")] + [
        (torch.randint(0, 3, (len(SRC),), generator=generator), torch.randint(0, 3, (len(SRC),), generator=generator))
        for _ in range(4)
    ]
    with torch._dynamo.config.patch(recompile_limit=2):
        first = len(compilations) if compiled(**batch, src_lang=SRC, tgt_lang=TGT) is not None else 0
        assert first > 0, "the backend never ran: nothing was compiled"
        for src, tgt in mixes:
            eager = output_of(poly, batch, src_lang=src, tgt_lang=tgt)
            torch.testing.assert_close(output_of(compiled, batch, src_lang=src, tgt_lang=tgt), eager)
    assert len(compilations) == first, f"recompiled for a new route mix: {len(compilations)} graphs after {first}"
    if method == "lms":
        operators = {str(node.target) for graph in compilations for node in graph.graph.nodes}
        assert any("bmm" in op for op in operators), "the routed layers' gathered-factor path is not in the graph"
    torch._dynamo.reset()

"""FLARE: LoRA layer, bottleneck fusion, source pass, recipe, save/load; tiny models on the CPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
)

import polypeft as pp
from polypeft.core.languages import LanguageError, LanguageRegistry
from polypeft.core.routed import LayerSite
from polypeft.core.routing import RouteState
from polypeft.experiments.flare_recipe import concatenate_inputs, flare_stage, on_target_positions, run_recipe
from polypeft.methods.flare.fusion import FUSIONS, FusionSource, align_by_position, build_fusion
from polypeft.methods.flare.layer import FLAREConfig, FLAREError, FLARELinear
from polypeft.methods.flare.source import block_position, model_sources, source_module_name

LAYERS = 3


def tiny_bert_config(num_labels: int = 3) -> BertConfig:
    return BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=32, num_labels=num_labels)


def tiny_bert(head=BertForSequenceClassification, num_labels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return head(tiny_bert_config(num_labels)).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=24, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def flare(base: nn.Module, **config) -> pp.PolyModel:
    return pp.wrap(base, FLAREConfig(**{"rank": 4, **config}))


def randomize_lora(model: pp.PolyModel, seed: int = 1) -> None:
    """B starts at zero; make it non-zero so the adapters change outputs and pass gradients."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.routed_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)


def batches(rows: int = 2, target_len: int = 7, source_len: int = 5):
    generator = torch.Generator().manual_seed(3)
    target = {"input_ids": torch.randint(1, 40, (rows, target_len), generator=generator),
              "attention_mask": torch.ones(rows, target_len, dtype=torch.long)}
    target["attention_mask"][-1, -2:] = 0
    source = {"input_ids": torch.randint(1, 40, (rows, source_len), generator=generator),
              "attention_mask": torch.ones(rows, source_len, dtype=torch.long)}
    source["attention_mask"][-1, -1:] = 0
    return target, source


# -- the layer --------------------------------------------------------------------------------------

def lora_layer(fusion: str | None = "add_relu", alignment: str | None = None) -> FLARELinear:
    """One FLARE layer on a 6 -> 5 linear, outside any model (its per-call source set by `fused`)."""
    torch.manual_seed(0)
    site = LayerSite(nn.Linear(6, 5), "probe", "encoder", RouteState(), LanguageRegistry([]))
    layer = FLARELinear(site, FLAREConfig(rank=3, alpha=6.0, fusion=fusion, alignment=alignment), None, None)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def fused(layer: FLARELinear, source: FusionSource):
    """The block in which `layer` fuses `source`, as the model's source pass sets it for a call."""
    return layer.route_state.use_layer_inputs({layer.layer_name: source})


def test_lora_layer_without_source_is_plain_lora():
    layer = lora_layer("add_relu")
    x = torch.randn(2, 4, 6)
    expected = x @ layer.base_layer.weight.t() + layer.base_layer.bias + 2.0 * (x @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(layer(x), expected)
    plain = lora_layer(None)
    torch.testing.assert_close(plain(x), expected)


def test_lora_init_is_kaiming_a_and_zero_b():
    site = LayerSite(nn.Linear(64, 8), "probe", "encoder", RouteState(), LanguageRegistry([]))
    layer = FLARELinear(site, FLAREConfig(rank=4, alpha=8), None, None)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / 64 ** 0.5  # kaiming_uniform with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 3


def test_lora_merge_and_unmerge_are_exact():
    layer = lora_layer(None)
    x = torch.randn(3, 6)
    before, weight = layer(x), layer.base_layer.weight.clone()
    layer.merge((0, 0))
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.base_layer(x), before, atol=1e-6, rtol=0)
    with pytest.raises(LanguageError, match="already holds merged route"):
        layer.merge((0, 0))
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-7, rtol=0)
    torch.testing.assert_close(layer(x), before)


def test_fusion_changes_the_output_and_reaches_both_inputs():
    layer = lora_layer("add_relu")
    x_target, x_source = torch.randn(2, 4, 6, requires_grad=True), torch.randn(2, 3, 6, requires_grad=True)
    plain = layer(x_target)
    with fused(layer, FusionSource(x_source)):
        fused_output = layer(x_target)
    source_bottleneck = align_by_position(x_source @ layer.lora_A.t(), None, None, 4)
    expected = layer.base_layer(x_target) + 2.0 * (
        (torch.relu(source_bottleneck) + torch.relu(x_target @ layer.lora_A.t())) @ layer.lora_B.t())
    torch.testing.assert_close(fused_output, expected)
    assert not torch.allclose(fused_output, plain)
    fused_output.sum().backward()
    assert x_source.grad.abs().sum() > 0 and layer.lora_A.grad.abs().sum() > 0
    torch.testing.assert_close(layer(x_target), plain)  # the block leaves plain LoRA behind


def test_a_merged_model_refuses_a_source_batch():
    model = flare(tiny_bert(), fusion="add")
    model.merge()
    target, source = batches()
    with pytest.raises(LanguageError, match="merged into the base weights, so no source can be fused"):
        model(**target, source_batch=source)
    model.unmerge()
    model(**target, source_batch=source)


# -- fusion functions and alignment ---------------------------------------------------------------

def test_align_by_position_respects_padding_on_both_sides():
    source = torch.arange(1, 5, dtype=torch.float).view(1, 4, 1).repeat(2, 1, 1)  # values 1..4
    source_mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right-padded, left-padded
    target_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    aligned = align_by_position(source, source_mask, target_mask, 6).squeeze(-1)
    # Row 0: real source 1,2,3 meet target positions 2,3,4; the 4th real target has no partner.
    assert aligned[0].tolist() == [0, 0, 1, 2, 3, 0]
    # Row 1: real source 2,3,4; only two real target tokens, so 4 is dropped.
    assert aligned[1].tolist() == [2, 3, 0, 0, 0, 0]


def test_align_by_position_pads_and_truncates_without_masks():
    source = torch.randn(1, 3, 2)
    longer = align_by_position(source, None, None, 5)
    torch.testing.assert_close(longer[:, :3], source)
    assert torch.count_nonzero(longer[:, 3:]) == 0
    torch.testing.assert_close(align_by_position(source, None, None, 2), source[:, :2])


FUSION_CASES = [(k, a) for k in FUSIONS for a in ("position", "attention") if (k, a) != ("cross_attention", "position")]


@pytest.mark.parametrize("kind,alignment", FUSION_CASES)
def test_each_fusion_has_target_shape_and_passes_gradients(kind, alignment):
    torch.manual_seed(0)
    fusion = build_fusion(kind, 4, alignment)
    source, target = torch.randn(2, 5, 4, requires_grad=True), torch.randn(2, 7, 4, requires_grad=True)
    source_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    target_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    fused = fusion(source, target, source_mask, target_mask)
    assert fused.shape == (2, 7, 4)
    fused.square().sum().backward()
    assert source.grad.abs().sum() > 0 and target.grad.abs().sum() > 0
    # Padded source positions never leak into the result.
    assert source.grad[1, 3:].abs().sum() == 0
    for name, parameter in fusion.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_positional_fusions_compute_their_formula():
    source, target = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    torch.testing.assert_close(build_fusion("add", 4)(source, target), source + target)
    torch.testing.assert_close(build_fusion("mul", 4)(source, target), source * target)
    torch.testing.assert_close(build_fusion("add_relu", 4)(source, target), source.relu() + target.relu())


def test_cross_attention_fusion_has_few_parameters():
    fusion = build_fusion("cross_attention", 8)
    assert sum(p.numel() for p in fusion.parameters()) == 3 * 8 * 8


# -- layer index, offsets, source pass ------------------------------------------------------------

def test_block_position_and_offsets_are_clipped():
    model = tiny_bert()
    name = "bert.encoder.layer.0.intermediate.dense"
    position = block_position(model, name)
    assert (position.blocks, position.index, position.count) == ("bert.encoder.layer", 0, LAYERS)
    assert source_module_name(model, name, 1) == "bert.encoder.layer.1.intermediate.dense"
    assert source_module_name(model, name, 0) == name
    assert source_module_name(model, name, 10) == f"bert.encoder.layer.{LAYERS - 1}.intermediate.dense"
    assert block_position(model, "classifier") is None
    assert source_module_name(model, "classifier", 1) == "classifier"


def record_inputs(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Inputs of named modules during one plain forward of `model`."""
    seen, handles = {}, []
    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: seen.__setitem__(name, args[0].detach().clone())))
    return seen, handles


@pytest.mark.parametrize("offset", [0, 1, 2, 7])
def test_source_is_the_adapters_off_input_of_the_block_offset_ahead(offset):
    plain = tiny_bert()
    _, source = batches()
    names = [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(LAYERS)]
    seen, handles = record_inputs(plain, names)
    with torch.no_grad():
        plain.bert(**source)
    for handle in handles:
        handle.remove()
    model = flare(tiny_bert(), source_layer_offset=offset)
    randomize_lora(model)  # a source pass with adapters on would now differ
    captured = model_sources(model, source)
    for i, name in enumerate(names):
        expected = seen[names[min(i + offset, LAYERS - 1)]]
        torch.testing.assert_close(captured[name], expected)


def test_llama_source_offset_uses_its_layer_list():
    model = flare(tiny_llama())
    target, source = batches()
    model(**target, source_batch=source)
    assert model.routed_layers["model.layers.0.mlp.down_proj"].source_name == "model.layers.1.mlp.down_proj"
    last = f"model.layers.{LAYERS - 1}.mlp.up_proj"
    assert model.routed_layers[last].source_name == last


def test_source_pass_runs_without_gradients_dropout_or_adapters():
    model = flare(tiny_bert())
    layer = model.routed_layers["bert.encoder.layer.1.intermediate.dense"]
    calls = []
    layer.register_forward_pre_hook(
        lambda module, args: calls.append((torch.is_grad_enabled(), module.route_state.bypassed, module.training)))
    target, source = batches()
    model.train()
    output = model(**target, source_batch=source)
    assert calls == [(False, True, False), (True, False, True)]  # the frozen source pass first, then the target
    assert all(m.training for m in model.modules()), "train mode is back after the source pass"
    assert not model.route_state.bypassed and not model.route_state.layer_inputs
    assert output.logits.requires_grad


def test_fused_forward_trains_the_adapters_only():
    model = flare(tiny_bert())
    randomize_lora(model)
    target, source = batches()
    plain = model(**target).logits
    fused_logits = model(**target, source_batch=source).logits
    assert not torch.allclose(plain, fused_logits)
    fused_logits.sum().backward()
    for layer in model.routed_layers.values():
        assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.base_model.named_parameters() if "lora_" not in n)


def test_fusion_disabled_model_is_plain_lora():
    model = flare(tiny_bert(), fusion=None)
    randomize_lora(model)
    target, source = batches()
    x = torch.randn(2, 7, 16)
    layer = model.routed_layers["bert.encoder.layer.0.intermediate.dense"]
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t())
    with pytest.raises(FLAREError, match="plain LoRA"):
        model(**target, source_batch=source)


def test_only_a_method_with_a_source_pass_takes_a_source_batch():
    model = pp.wrap(tiny_bert(), pp.LoRAConfig(rank=4))
    target, source = batches()
    with pytest.raises(pp.ConfigError, match="method 'lora' has no source pass"):
        model(**target, source_batch=source)


def test_mismatched_source_and_target_batch_sizes_are_refused():
    model = flare(tiny_bert())
    target, _ = batches(rows=3)
    _, source = batches(rows=2)
    with pytest.raises(FLAREError, match="source_batch has 2 rows but the target batch has 3"):
        model(**target, source_batch=source)


@pytest.mark.parametrize("head,num_labels", [(BertForSequenceClassification, 3), (BertForTokenClassification, 3),
                                             (BertForQuestionAnswering, 2)])
def test_flare_runs_with_encoder_task_heads(head, num_labels):
    model = flare(tiny_bert(head, num_labels), fusion="cross_attention")
    target, source = batches()
    output = model(**target, source_batch=source)
    first = output.logits if hasattr(output, "logits") and output.logits is not None else output.start_logits
    assert first.shape[0] == 2 and first.requires_grad


def test_flare_on_decoder_only_model_trains():
    model = flare(tiny_llama(), fusion="add_relu")
    target, source = batches()
    loss = model(**target, labels=target["input_ids"], source_batch=source).loss
    loss.backward()
    assert all(l.lora_B.grad is not None for l in model.routed_layers.values())


# -- FLARE-MT -------------------------------------------------------------------------------------

def tiny_mt_encoder() -> nn.Module:
    torch.manual_seed(0)
    config = MarianConfig(vocab_size=40, d_model=12, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=20, decoder_ffn_dim=20, pad_token_id=0,
                          decoder_start_token_id=0, max_position_embeddings=32)
    return MarianMTModel(config).get_encoder().eval()


def test_flare_mt_projects_the_frozen_encoder_output():
    encoder = tiny_mt_encoder()
    model = pp.wrap(tiny_bert(), FLAREConfig(rank=4, source="mt_encoder"), source_encoder=encoder)
    assert model.poly_config.mt_hidden_size == 12
    projections = [l.source_projection for l in model.routed_layers.values() if l.source_projection is not None]
    assert sorted(p.out_features for p in projections) == [16, 24]  # hidden and FFN input widths, one map each
    randomize_lora(model)
    target, source = batches()
    calls = []
    encoder.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    model(**target, source_batch=source).logits.sum().backward()
    assert calls == [False]
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None for projection in projections for p in projection.parameters())
    assert not any(n.startswith("source_encoder") for n in model.state_dict())


def test_flare_mt_needs_an_encoder():
    with pytest.raises(FLAREError, match="source_encoder"):
        pp.wrap(tiny_bert(), FLAREConfig(rank=4, source="mt_encoder"))


# -- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,message", [
    ({"fusion": "concat"}, r"fusion='concat' must be one of \['add', 'mul', 'add_relu', 'cross_attention'\] or null"),
    ({"rank": 0}, "rank=0 must be a positive int"),
    ({"source": "teacher"}, "source='teacher' is not allowed"),
    ({"source_layer_offset": 1.5}, "source_layer_offset=1.5 must be an int"),
    ({"fusion": "cross_attention", "alignment": "position"}, "aligns by attention"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"target_modules": []}, "empty list"),
    ({"shared_route": True}, "shared_route=True has no meaning"),
])
def test_config_refuses_bad_values_by_name(changes, message):
    with pytest.raises(FLAREError, match=message):
        FLAREConfig(**changes)


def test_config_alignment_defaults_follow_the_fusion():
    assert FLAREConfig().alignment == "position"
    assert FLAREConfig(fusion="cross_attention").alignment == "attention"
    assert pp.config_from_dict(FLAREConfig(rank=2).to_dict()) == FLAREConfig(rank=2)


# -- save / load ----------------------------------------------------------------------------------

def test_save_load_round_trip_restores_only_added_weights(tmp_path):
    model = flare(tiny_bert(), fusion="cross_attention", modules_to_save=["classifier"])
    randomize_lora(model)
    with torch.no_grad():
        model.base_model.classifier.weight.add_(1.0)
    target, source = batches()
    expected = model(**target, source_batch=source).logits
    model.save_pretrained(str(tmp_path))
    loaded = pp.PolyModel.from_pretrained(tiny_bert(), str(tmp_path))
    torch.testing.assert_close(loaded(**target, source_batch=source).logits, expected, rtol=0, atol=0)
    assert loaded.poly_config == model.poly_config
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "polypeft_model.safetensors"))
    assert keys and all(k.endswith(("lora_A", "lora_B")) or ".fusion." in k or k.startswith("classifier.")
                        for k in keys)


def test_flare_mt_save_loads_with_its_encoder(tmp_path):
    model = pp.wrap(tiny_bert(), FLAREConfig(rank=4, source="mt_encoder"), source_encoder=tiny_mt_encoder())
    randomize_lora(model)
    target, source = batches()
    expected = model(**target, source_batch=source).logits
    model.save_pretrained(tmp_path)
    loaded = pp.PolyModel.from_pretrained(tiny_bert(), tmp_path, source_encoder=tiny_mt_encoder())
    torch.testing.assert_close(loaded(**target, source_batch=source).logits, expected, rtol=0, atol=0)


def test_load_on_a_different_model_says_what_differs(tmp_path):
    flare(tiny_bert()).save_pretrained(str(tmp_path))
    other = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=24))
    with pytest.raises(pp.ConfigError, match="bert.encoder.layer.2"):
        pp.PolyModel.from_pretrained(other, str(tmp_path))


# -- recipe and baselines -------------------------------------------------------------------------

def test_concatenated_inputs_move_labels_with_their_tokens():
    source = {"input_ids": torch.tensor([[5, 6, 0], [7, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    target = {"input_ids": torch.tensor([[11, 12, 13], [0, 14, 15]]),
              "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]), "labels": torch.tensor([[1, 2, 3], [-100, 4, 5]])}
    joined = concatenate_inputs(source, target)
    assert joined.batch["input_ids"].tolist() == [[5, 6, 11, 12, 13], [7, 8, 9, 14, 15]]
    assert joined.batch["attention_mask"].tolist() == [[1] * 5, [1] * 5]
    assert joined.batch["labels"].tolist() == [[-100, -100, 1, 2, 3], [-100, -100, -100, 4, 5]]
    values = torch.arange(10, dtype=torch.float).view(2, 5)
    back = on_target_positions(values, joined.target_positions)
    assert back[0].tolist() == [2, 3, 4] and back[1, 1:].tolist() == [8, 9] and back[1, 0] < -1e30
    qa = {**{k: v for k, v in target.items() if k != "labels"},
          "start_positions": torch.tensor([0, 1]), "end_positions": torch.tensor([2, 2])}
    joined_qa = concatenate_inputs(source, qa)
    assert joined_qa.batch["start_positions"].tolist() == [2, 3]
    assert joined_qa.batch["end_positions"].tolist() == [4, 4]


def test_stage1_merge_is_exact_and_leaves_a_plain_model():
    lora = flare(tiny_bert(), fusion=None)
    randomize_lora(lora)
    target, _ = batches()
    before = lora(**target).logits
    merged = lora.merge_and_unload()
    assert not any(isinstance(m, FLARELinear) for m in merged.modules())
    torch.testing.assert_close(merged(**target).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("recipe", ["zero_shot", "translate_train", "input_fusion", "flare", "flare_mt"])
def test_every_recipe_trains_and_predicts(recipe):
    target, source = batches()
    target["labels"] = torch.tensor([0, 2])
    english = {**source, "labels": torch.tensor([0, 2])}
    steps = flare_stage(steps=2, lr=1e-2, progress=False)
    trained = run_recipe(tiny_bert(), recipe, [english], [(target, source)], FLAREConfig(rank=4),
                         stage1=steps, stage2=steps, mt_encoder=tiny_mt_encoder() if recipe == "flare_mt" else None)
    untouched = tiny_bert()(**target).logits
    logits = trained(target, source).logits
    assert logits.shape == (2, 3) and not torch.allclose(logits, untouched)
    has_lora = any(isinstance(m, FLARELinear) for m in trained.model.modules())
    assert has_lora == (recipe != "zero_shot")
    if recipe in ("flare", "flare_mt"):
        assert not torch.allclose(trained(target, source).logits, trained.model(**target).logits)


# -- command line ---------------------------------------------------------------------------------

def write_tiny_text_model(folder) -> None:
    """A saved tiny BERT classifier and a word-level tokenizer, loadable with from_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + "good bad bon mauvais film day jour the le a".split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    tiny_bert(num_labels=2).save_pretrained(folder)


def cli_config(tmp_path) -> dict:
    """A tiny text classifier, English and French JSONL files, and the YAML recipe over them."""
    import json

    write_tiny_text_model(tmp_path / "base")
    english = [{"text": f"the {w} film", "label": int(w == "good")} for w in ("good", "bad")] * 2
    target = [{"text": f"le {w} film", "source_text": f"the {e} film", "label": int(e == "good")}
              for w, e in (("bon", "good"), ("mauvais", "bad"))] * 2
    for name, rows in (("en.jsonl", english), ("fr.jsonl", target)):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"model": {"name_or_path": str(tmp_path / "base"), "num_labels": 2}, "recipe": "flare",
            "data": {"english_train": str(tmp_path / "en.jsonl"), "target_train": str(tmp_path / "fr.jsonl"),
                     "eval": str(tmp_path / "fr.jsonl"), "batch_size": 2},
            "flare": {"rank": 2, "fusion": "add_relu"}, "stage1": {"steps": 2, "progress": False},
            "stage2": {"steps": 2, "progress": False}, "output_dir": str(tmp_path / "run")}


def run_cli(tmp_path, config: dict, *commands: str) -> None:
    import argparse

    import yaml

    from polypeft.cli.flare import add_cli

    (tmp_path / "flare.yaml").write_text(yaml.safe_dump(config))
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    for command in commands:
        args = parser.parse_args(["flare", command, str(tmp_path / "flare.yaml")])
        args.func(args)


def test_cli_trains_saves_and_evaluates_a_recipe(tmp_path):
    import json

    config = cli_config(tmp_path)
    run_cli(tmp_path, config, "train", "eval")
    metrics = json.loads((tmp_path / "run" / "metrics_gold.json").read_text())  # FLARE read the gold English
    assert metrics["recipe"] == "flare" and metrics["examples"] == 4 and 0 <= metrics["accuracy"] <= 1
    assert (tmp_path / "run" / "adapter" / "polypeft_model.safetensors").exists()
    from transformers import AutoModelForSequenceClassification

    _, loading = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "stage1_merged",
                                                                     output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], "stage 1's weights under their own names"
    with pytest.raises(FLAREError, match="recipe='flarez' is not allowed"):
        run_cli(tmp_path, {**config, "recipe": "flarez"}, "train")


@pytest.mark.slow
def test_cli_flare_mt_reads_a_polypeft_translation_run(tmp_path):
    import json

    from polypeft.tasks.translation.run import train_run
    from toy_mmt import toy_data, toy_recipe

    mt_run = train_run(toy_recipe(tmp_path / "mt", {"name": "lms", "rank": 2}), data=toy_data(tmp_path))
    config = {**cli_config(tmp_path), "recipe": "flare_mt", "mt_model": str(mt_run)}
    with pytest.raises(FLAREError, match="target_lang"):
        run_cli(tmp_path, config, "train")
    run_cli(tmp_path, {**config, "target_lang": "fr"}, "train", "eval")
    metrics = json.loads((tmp_path / "run" / "metrics_gold.json").read_text())
    assert metrics["recipe"] == "flare_mt" and metrics["examples"] == 4
    adapter = tmp_path / "run" / "adapter" / "polypeft_model.safetensors"
    from safetensors.torch import load_file

    assert any(".source_projection." in key for key in load_file(str(adapter)))


def test_incremental_decoding_with_positional_alignment_is_refused_clearly():
    layer = lora_layer("add_relu")
    source = FusionSource(torch.randn(1, 4, 6), target_mask=torch.ones(1, 5, dtype=torch.long))
    with fused(layer, source), pytest.raises(FLAREError, match="positional alignment needs the whole target"):
        layer(torch.randn(1, 1, 6))
    attention = lora_layer("add", alignment="attention")
    with fused(attention, source):
        assert attention(torch.randn(1, 1, 6)).shape == (1, 1, 5)


def test_training_without_batches_is_refused():
    with pytest.raises(FLAREError, match="no batches"):
        run_recipe(tiny_bert(), "zero_shot", [], [], FLAREConfig(rank=2), stage1=flare_stage(steps=1, progress=False))


def test_the_example_recipe_in_configs_is_valid():
    from pathlib import Path

    from polypeft.cli.flare_recipe import FlareRecipe
    from polypeft.core.yaml_files import recipe_from_yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "flare_example.yaml"
    config = recipe_from_yaml(FlareRecipe, str(path))  # the data files are examples: paths are not checked
    assert config.flare.fusion == "add_relu"
    assert config.stage2.steps == 300 and config.stage2.lr == 0.001
    assert (config.stage2.schedule, config.stage2.warmup) == ("constant", 0), "unnamed keys keep the stage's defaults"


def test_a_stage_block_of_an_older_file_still_reads():
    from polypeft.cli.flare_recipe import FlareRecipe
    from polypeft.core.config import recipe_from_dict

    old = recipe_from_dict(FlareRecipe, {"stage1": {"learning_rate": 0.01, "max_grad_norm": 0.5}, "data": {},
                                         "model": {"name_or_path": "x", "num_labels": 2}, "output_dir": "out"})
    assert (old.stage1.lr, old.stage1.clip_norm, old.stage1.schedule) == (0.01, 0.5, "constant")


def test_a_key_given_under_its_old_and_new_name_is_refused():
    from polypeft.cli.flare_recipe import FlareRecipe
    from polypeft.core.config import recipe_from_dict

    with pytest.raises(pp.ConfigError, match="'learning_rate' and 'lr' are both given"):
        recipe_from_dict(FlareRecipe, {"stage1": {"lr": 0.1, "learning_rate": 0.2}, "data": {},
                                        "model": {"name_or_path": "x", "num_labels": 2}, "output_dir": "out"})

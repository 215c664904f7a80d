"""Routes on the bases users bring: bf16/fp16 (factors kept in float32), bitsandbytes 8-bit and 4-bit
(QLoRA-style: wrap, train, save, load; merge as peft merges: dequantize, add, quantize again), and layers whose
weights are not loaded."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import polypeft as pp
from tiny_models import VOCAB, build, randomize_added

LANGS = ["en", "de"]
BATCH = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])}


def test_factors_stay_float32_on_a_bf16_base_and_start_at_it():
    base = build("llama").to(torch.bfloat16)
    reference = base(**BATCH).logits
    poly = pp.wrap(base, pp.LMSConfig(languages=LANGS, rank=4, freeze_base=True))
    assert {p.dtype for p in poly.added_state_dict().values()} == {torch.float32}
    out = poly(**BATCH, lang="de").logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for n, p in poly.named_parameters() if "lms_F" in n)


def quantizable_llama() -> torch.nn.Module:
    """A tiny Llama whose linears bitsandbytes 4-bit takes on every CPU: on one with AVX-512 BF16 it packs weights
    in blocks of 64 inputs by 32 outputs, so the shared tiny models' 32 x 48 linears fail there."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB, pad_token_id=1,
                            bos_token_id=0, eos_token_id=2)
    return tf.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    quantizable_llama().save_pretrained(directory)
    return directory


def quantized(directory, bits: int):
    pytest.importorskip("bitsandbytes")
    quantization = (tf.BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
                    tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    return tf.AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, device_map="cpu")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bases_wrap_train_save_and_load(saved_llama, bits, tmp_path):
    poly = pp.wrap(quantized(saved_llama, bits), pp.LMSConfig(languages=LANGS, rank=4, freeze_base=True))
    layer = poly.routed_layers["model.layers.0.mlp.up_proj"]
    assert layer.lms_F.shape == (2, 4, 64) and layer.lms_V.shape == (2, 128, 4)  # from the layer's sizes
    optimizer = torch.optim.Adam([p for p in poly.parameters() if p.requires_grad], lr=2e-2)
    labels = BATCH["input_ids"]
    losses = []
    for _ in range(8):
        loss = poly(**BATCH, labels=labels, lang=["de", "en"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    poly.save_pretrained(tmp_path)
    restored = pp.PolyModel.from_pretrained(quantized(saved_llama, bits), tmp_path)
    with torch.no_grad():  # both inference forwards: on an AVX-512 BF16 CPU bitsandbytes computes these repacked
        torch.testing.assert_close(restored(**BATCH, lang="de").logits, poly(**BATCH, lang="de").logits)


# Largest |logit| change a merge into the quantized weight makes, as a share of the largest logit, on this tiny
# Llama with routes of scale 0.1: measured 1.0 % (8-bit) and 7.9 % (4-bit; 40 % when bitsandbytes' repacked 4-bit
# layout was misread), the same as peft's merge on that base.
MERGE_ROUNDING = {8: 0.02, 4: 0.15}


@pytest.mark.parametrize("bits", [8, 4])
def test_merge_and_unload_on_a_quantized_base_is_peft_s_merge(saved_llama, bits, tmp_path):
    peft = pytest.importorskip("peft")
    poly = pp.wrap(quantized(saved_llama, bits), pp.LMSConfig(languages=LANGS, rank=4))
    randomize_added(poly, scale=0.1)
    poly.save_pretrained(tmp_path / "routes")
    poly.export_lora(tmp_path / "lora", lang="de")
    with torch.no_grad():  # before any forward: ours and peft's merge read the weight as loaded
        ours = pp.PolyModel.from_pretrained(quantized(saved_llama, bits), tmp_path / "routes").merge_and_unload(
            route="de")(**BATCH).logits
        theirs = peft.PeftModel.from_pretrained(quantized(saved_llama, bits), tmp_path / "lora").merge_and_unload()(
            **BATCH).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    layer = poly.routed_layers["model.layers.0.mlp.up_proj"]
    with torch.no_grad():  # after inference forwards, which on an AVX-512 BF16 CPU repack a 4-bit weight in place
        routed = poly(**BATCH, lang="de").logits
        packed = layer.base_layer.weight
        poly.merge(route="de")
        assert type(layer.base_layer.weight) is type(packed) and layer.base_layer.weight is not packed  # quantized again
        merged = poly(**BATCH, lang="de").logits
        poly.unmerge()
        assert layer.base_layer.weight is packed  # the original packed weight back: no second rounding
        assert torch.equal(poly(**BATCH, lang="de").logits, routed)
        assert (merged - routed).abs().max() <= MERGE_ROUNDING[bits] * routed.abs().max()
        assert (merged - routed).abs().max() > 0  # it did round: the bound above is what users are told
        after_inference = poly.merge_and_unload(route="de")(**BATCH).logits
    # the repacked layout keeps its scales in bfloat16, so a merge after inference rounds them once more
    torch.testing.assert_close(after_inference, ours, rtol=0, atol=0.01 * float(ours.abs().max()))


def test_methods_that_copy_the_weight_refuse_a_quantized_base(saved_llama):
    with pytest.raises(pp.ConfigError, match=r"copies the weight of model\.layers\.0\.mlp\.\w+_proj, which is quantized.*low-rank"):
        pp.wrap(quantized(saved_llama, 8), pp.LSFFNConfig(languages=LANGS))


def test_a_layer_whose_weight_is_not_loaded_is_named():
    with torch.device("meta"):
        base = build_meta()
    with pytest.raises(pp.ConfigError, match=r"model\.layers\.0\.mlp\.\w+_proj has its weight on the meta device"):
        pp.wrap(base, pp.LMSConfig(languages=LANGS, rank=4))


def build_meta():
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=2, vocab_size=64)
    return tf.LlamaForCausalLM(config)


def test_a_save_from_a_4bit_base_loads_onto_the_full_precision_base(saved_llama, tmp_path):
    """The saved base identity records each layer's (out, in), not the packed 4-bit weight's shape."""
    poly = pp.wrap(quantized(saved_llama, 4), pp.LMSConfig(languages=LANGS, rank=4, freeze_base=True))
    poly.save_pretrained(tmp_path)
    restored = pp.PolyModel.from_pretrained(quantizable_llama(), tmp_path)
    assert set(restored.added_state_dict()) == set(poly.added_state_dict())


def repack_for_cpu_inference(module: torch.nn.Module) -> None:
    """Repack the module's 4-bit weight by hand (pure torch, so on any CPU), as bitsandbytes' first inference
    forward does on a CPU with AVX-512 BF16; other modules and weights repacked already are left alone."""
    import bitsandbytes as bnb

    weight = getattr(module, "weight", None)
    if type(weight).__name__ == "Params4bit" and not getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_4bit_weight_repacked_for_cpu_inference_is_read_back(saved_llama, double_quant):
    """bitsandbytes' AVX-512 BF16 repacking, applied by hand (pure torch, so on any CPU): the weight polypeft reads
    from it is the one it was, within the bfloat16 scales the repacking keeps, and the layer is left as it was."""
    bnb = pytest.importorskip("bitsandbytes")
    from polypeft.core.quantized import dequantized

    if not hasattr(bnb.functional, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes does not repack 4-bit weights for CPU inference")
    quantization = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                         bnb_4bit_use_double_quant=double_quant)
    model = tf.AutoModelForCausalLM.from_pretrained(saved_llama, quantization_config=quantization, device_map="cpu")
    layer = model.model.layers[0].mlp.up_proj
    before = dequantized(layer)
    weight = layer.weight
    repack_for_cpu_inference(layer)
    packed = weight.data.clone()
    after = dequantized(layer)
    torch.testing.assert_close(after, before, rtol=0, atol=0.01 * float(before.abs().max()))
    assert weight.quant_state.packing_format_for_cpu and torch.equal(weight.data, packed), "the layer is untouched"


def test_saving_a_repacked_4bit_base_leaves_it_computing_as_before(saved_llama, tmp_path):
    """bitsandbytes' own save undoes its CPU repacking in part, in place; polypeft's writers put the standard layout
    back first, so the model computes after a save as before it (training forwards, which do not repack)."""
    bnb = pytest.importorskip("bitsandbytes")
    from polypeft.core.fileio import write_model_weights

    if not hasattr(bnb.functional, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes does not repack 4-bit weights for CPU inference")
    model = quantized(saved_llama, 4)
    before = model(**BATCH).logits.detach()  # a training-style forward: grad on, standard layout
    for module in model.modules():
        repack_for_cpu_inference(module)
    write_model_weights(tmp_path / "model.safetensors", model)
    after = model(**BATCH).logits.detach()
    torch.testing.assert_close(after, before, rtol=0, atol=0.01 * float(before.abs().max()))

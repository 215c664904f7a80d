"""What one method does beyond the shared contract: Switch's experts and load balance, CLSR's gates and budget,
LS-FFN's shared route and exact merge, LoRA's factors, and each config's refusals."""
from __future__ import annotations

import pytest
import torch

import polypeft as pp
from polypeft.methods.clsr import CLSRConfig
from polypeft.methods.lora import LoRAConfig
from polypeft.methods.ls_ffn import LSFFNConfig
from polypeft.methods.switch import DenseLinear, ExpertLinear, SwitchConfig
from method_table import HIDDEN, KINDS, LANGS, SUBLAYERS, TABLE, make, seq2seq_batch
from tiny_models import FFN_LAYOUT, build, output_of, random_batch


def test_switch_without_init_noise_is_the_gated_base_ffn():
    base = build("bart")
    poly = pp.wrap(base, TABLE["switch"].make(expert_init_std=0.0))
    layer = poly.base_model.model.encoder.layers[1]
    reference_layer = build("bart").model.encoder.layers[1]
    x = torch.randn(2, 5, HIDDEN, dtype=torch.float64)
    switched = layer.fc2(layer.activation_fn(layer.fc1(x)))
    dense = reference_layer.fc2(reference_layer.activation_fn(reference_layer.fc1(x)))
    gate = layer.fc1.router(x).softmax(-1).max(-1).values
    torch.testing.assert_close(switched, gate.unsqueeze(-1) * dense)
    assert not torch.allclose(switched, dense), "the gate must scale the expert output"


def test_lora_trains_only_its_factors_by_default():
    poly = make("lora", "bart", randomize=False)
    trainable = {n for n, p in poly.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


@pytest.mark.parametrize("kind", KINDS)
def test_ls_ffn_shared_route_is_the_base_model(kind):
    batch = random_batch(kind, 2)
    reference = output_of(build(kind), batch)
    poly = make("ls_ffn", kind, shared_route=True)
    torch.testing.assert_close(output_of(poly, batch, lang="shared"), reference)
    assert not torch.allclose(output_of(poly, batch, lang="de"), reference)


# ---- auxiliary losses ------------------------------------------------------------------------------
def test_switch_load_balance_loss_is_weighted_e_sum_f_p_and_has_gradients():
    poly = make("switch", "bart", load_balance_weight=0.5)
    routers = [layer.router for layer in poly.routed_layers.values() if getattr(layer, "router", None) is not None]
    assert len(routers) == 2  # layer 2 of the encoder and of the decoder
    with torch.no_grad():
        for router in routers:  # uniform router: P_i = 1/E; argmax ties all go to expert 0, so f = (1, 0, 0)
            router.weight.zero_()
    poly.train()
    poly(**seq2seq_batch("bart"), src_lang="de", tgt_lang="en")
    auxiliary = poly.auxiliary_loss()
    torch.testing.assert_close(auxiliary, torch.tensor(0.5 * 1.0 * len(routers), dtype=torch.float64))
    auxiliary.backward()
    assert all(router.weight.grad.abs().sum() > 0 for router in routers)
    assert poly.auxiliary_loss() == 0.0, "the loss is consumed by the first call"


def test_switch_load_balance_is_positive_for_a_random_router():
    poly = make("switch", "t5").train()
    poly(**seq2seq_batch("t5"), src_lang="de", tgt_lang="en")
    auxiliary = poly.auxiliary_loss()
    assert auxiliary > 0
    auxiliary.backward()
    poly.eval()
    poly(**seq2seq_batch("t5"), src_lang="de", tgt_lang="en")
    assert poly.auxiliary_loss() == 0.0, "no balance loss is collected at inference"


def test_switch_capacity_drops_tokens_beyond_it():
    poly = make("switch", "bart", capacity_factor=0.75)  # 8 tokens, 3 experts: capacity ceil(2) = 2
    fc1, fc2 = poly.base_model.model.encoder.layers[1].fc1, poly.base_model.model.encoder.layers[1].fc2
    with torch.no_grad():
        fc1.router.weight.zero_()  # every token picks expert 0
    rows = torch.randn(8, HIDDEN, dtype=torch.float64)
    output = fc2(torch.relu(fc1(rows)))
    assert (output[:2].abs().sum(-1) > 0).all() and (output[2:] == 0).all()


@pytest.mark.parametrize("kind", ["bart", "bert", "llama"])
@pytest.mark.parametrize("every", [1, 2])
def test_switch_pairs_ffn_linears_by_layer_and_switches_every_nth(kind, every):
    poly = make("switch", kind, every=every)
    layers, per_layer = FFN_LAYOUT[kind]
    experts = {n: l for n, l in poly.routed_layers.items() if isinstance(l, ExpertLinear)}
    dense = {n: l for n, l in poly.routed_layers.items() if isinstance(l, DenseLinear)}
    assert len(experts) == layers * per_layer // every and len(experts) + len(dense) == layers * per_layer
    if every == 2:  # 1-based layers 2, 4, ...: the 0-indexed layer 1 of each stack, never layer 0
        assert all(".0." in name for name in dense) and all(".1." in name for name in experts)
    routers = [layer for layer in experts.values() if layer.router is not None]
    assert len(routers) == layers // every, "one router per switched FFN"
    groups = {id(layer.ffn_state) for layer in experts.values()}
    assert len(groups) == layers // every, "the linears of one FFN share one state"
    batch = random_batch(kind, 2)
    output_of(poly, batch, lang="de")  # runs, with the router-owning linear first in each FFN


def test_clsr_budget_is_mean_gate_minus_p_over_all_sublayers_and_reported_once():
    poly = make("clsr", "bart", budget=0.3, budget_weight=2.0, gate_noise_std=0.0)
    layers = list(poly.routed_layers.values())
    with torch.no_grad():
        for layer in layers:
            layer.gate_output.weight.zero_()
            layer.gate_output.bias.fill_(1.0)  # g = sigmoid(1) for every token
    poly.train()
    batch = seq2seq_batch("bart")
    poly(**batch, src_lang="de", tgt_lang="en")
    count_one_forward = layers[0].budget.gate_count
    poly(**batch, src_lang="de", tgt_lang="en")  # a second forward restarts the sums
    assert layers[0].budget.gate_count == count_one_forward
    auxiliary = poly.auxiliary_loss()
    expected = 2.0 * abs(torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)) - 0.3)
    torch.testing.assert_close(auxiliary, expected)
    auxiliary.backward()
    assert all(layer.gate_output.bias.grad.abs() > 0 for layer in layers), "every sublayer's gate gets gradients"
    assert poly.auxiliary_loss() == 0.0


def test_clsr_gates_are_hard_at_inference_and_soft_in_training():
    poly = make("clsr", "bart")
    layer = next(iter(poly.routed_layers.values()))
    z = torch.randn(4, 6, HIDDEN, dtype=torch.float64)
    hard = layer.eval().gate(z)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and 0 < hard.mean() < 1
    soft = layer.train().gate(z)
    assert ((soft > 0) & (soft < 1)).all()


@pytest.mark.parametrize("sharing", ["per_stack", "per_sublayer"])
def test_clsr_language_weights_are_shared_per_stack_or_owned_per_sublayer(sharing):
    poly = make("clsr", "bart", language_weights=sharing)
    owners = [layer for layer in poly.routed_layers.values() if layer.language_weight is not None]
    assert len(owners) == (2 if sharing == "per_stack" else SUBLAYERS["bart"])
    assert poly.parameter_counts().language_specific == len(owners) * len(LANGS) * HIDDEN * HIDDEN
    if sharing == "per_stack":
        decoder = [l for n, l in poly.routed_layers.items() if ".decoder." in n]
        assert all(layer.language_owner is decoder[0] for layer in decoder)
        output_of(poly, random_batch("bart", 2), src_lang="de", tgt_lang="en").sum().backward()
        assert decoder[0].language_weight.grad is not None


def test_ls_ffn_merge_folds_the_language_weight_and_bias_exactly():
    poly = make("ls_ffn", "bart")
    poly.merge(src="de", tgt="fr")
    encoder_fc1 = poly.routed_layers["model.encoder.layers.0.fc1"]
    decoder_fc1 = poly.routed_layers["model.decoder.layers.0.fc1"]
    assert torch.equal(encoder_fc1.base_layer.weight, encoder_fc1.language_weight[LANGS.index("de")])
    assert torch.equal(decoder_fc1.base_layer.bias, decoder_fc1.language_bias[LANGS.index("fr")])


def test_ls_ffn_shared_route_adds_no_parameters():
    counts = make("ls_ffn", "bart", shared_route=True).parameter_counts()
    assert counts.shared_route == 0 and counts.inference_extra_shared_route == 0
    assert counts.inference_extra_language_routes == counts.training_extra


# ---- configuration errors --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make_config, message",
    [
        (lambda: LoRAConfig(languages=LANGS, rank=0), r"LoRAConfig.rank=0 must be a positive int"),
        (lambda: LoRAConfig(languages=LANGS, shared_route=True), r"shared_route=True has no meaning"),
        (lambda: SwitchConfig(languages=LANGS, num_experts=0), r"SwitchConfig.num_experts=0"),
        (lambda: SwitchConfig(languages=LANGS, every=-1), r"SwitchConfig.every=-1"),
        (lambda: SwitchConfig(languages=LANGS, capacity_factor=0.0), r"capacity_factor=0.0"),
        (lambda: CLSRConfig(languages=LANGS, budget=1.5), r"CLSRConfig.budget=1.5 must be a number in \[0, 1\]"),
        (lambda: CLSRConfig(languages=LANGS, language_weights="global"),
         r"language_weights='global' is not allowed; choose one of \['per_stack', 'per_sublayer'\]"),
        (lambda: LSFFNConfig(languages=[]), r"languages is empty"),
    ],
)
def test_bad_configs_are_refused_with_the_value_and_what_is_allowed(make_config, message):
    with pytest.raises(pp.ConfigError, match=message):
        make_config()


def test_lora_rank_larger_than_the_layer_is_refused():
    with pytest.raises(pp.ConfigError, match=r"rank 64 is larger than min\(out, in\) = 32"):
        pp.wrap(build("bart"), LoRAConfig(languages=LANGS, rank=64))

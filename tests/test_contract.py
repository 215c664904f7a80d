"""The contract table: every routed method (LMS both syntheses, LoRA, LS FFN, Switch, CLSR) x tiny models.

A new method is one row in CONFIGS and one formula below; the shared checks then run on it."""
from __future__ import annotations

import pytest
import torch

import polypeft as pp
from polypeft.methods.clsr import CLSRConfig
from polypeft.methods.lora import LoRAConfig
from polypeft.methods.ls_ffn import LSFFNConfig
from polypeft.methods.switch import DenseLinear, ExpertLinear, SwitchConfig
from tiny_models import ENCODER_DECODER, FFN_LAYOUT, build, output_of, random_batch, randomize_added

LANGS = ["en", "de", "fr"]
KINDS = ("bart", "marian", "t5", "bert")
HIDDEN, FFN = 32, 48  # tiny_models' d_model and FFN width
HAS_BIAS = {"bart": True, "marian": True, "bert": True, "t5": False, "llama": False}
# attention + FFN sublayers (CLSR targets) and stacks (encoder, decoder) of each tiny model
SUBLAYERS = {"bert": 4, "bart": 10, "marian": 10, "t5": 10, "llama": 4}
STACKS = {"bert": 1, "bart": 2, "marian": 2, "t5": 2, "llama": 1}

CONFIGS = {
    "lms_pair": lambda **kw: pp.LMSConfig(languages=LANGS, rank=4, synthesis="pair", **kw),
    "lms_language": lambda **kw: pp.LMSConfig(languages=LANGS, rank=4, synthesis="language", **kw),
    "lora": lambda **kw: LoRAConfig(languages=LANGS, rank=4, **kw),
    "ls_ffn": lambda **kw: LSFFNConfig(languages=LANGS, **kw),
    "switch": lambda **kw: SwitchConfig(languages=LANGS, num_experts=3, **kw),
    "clsr": lambda **kw: CLSRConfig(languages=LANGS, gate_hidden_size=8, **kw),
}
METHODS = tuple(CONFIGS)
LANGUAGE_ROUTED = ("lms_pair", "lms_language", "ls_ffn", "clsr")
LANGUAGE_WISE = ("lms_language", "ls_ffn", "clsr")  # encoder reads src, decoder tgt
MERGEABLE = ("lms_pair", "lms_language", "lora", "ls_ffn")


def expected_training_extra(method: str, kind: str) -> int:
    """The added parameters, from the methods' definitions (d = 32, FFN = 48, biases where the model has them)."""
    layers, _ = FFN_LAYOUT[kind]
    bias = HAS_BIAS[kind]
    ffn_weights = 2 * HIDDEN * FFN + (HIDDEN + FFN if bias else 0)  # fc1 + fc2 of one layer
    if method.startswith("lms"):  # the paper's 2 * L * N * d * (r + c), rank 4
        return 2 * len(LANGS) * layers * 4 * (HIDDEN + FFN)
    if method == "lora":
        return layers * 4 * 2 * (HIDDEN + FFN)
    if method == "ls_ffn":  # one copy per language, replacing the base FFN (no shared route)
        return (len(LANGS) - 1) * layers * ffn_weights
    if method == "switch":  # every 2nd layer of each stack: 3 experts = the base FFN + 2 copies, a bias-free router
        switched = layers // 2
        return switched * (2 * ffn_weights + 3 * HIDDEN)
    if method == "clsr":  # per stack W_lang; per sublayer shared projection and gate MLP (hidden 8)
        per_sublayer = (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * 8 + 8) + (8 + 1)
        return STACKS[kind] * len(LANGS) * HIDDEN * HIDDEN + SUBLAYERS[kind] * per_sublayer
    raise ValueError(method)


def expected_language_specific(method: str, kind: str) -> int:
    layers, _ = FFN_LAYOUT[kind]
    if method == "ls_ffn":
        return len(LANGS) * layers * (2 * HIDDEN * FFN + (HIDDEN + FFN if HAS_BIAS[kind] else 0))
    if method == "clsr":
        return STACKS[kind] * len(LANGS) * HIDDEN * HIDDEN
    if method.startswith("lms"):
        return expected_training_extra(method, kind)
    return 0  # lora and switch have no language parameters


def make(method: str, kind: str, randomize: bool = True, **overrides):
    poly = pp.wrap(build(kind), CONFIGS[method](**overrides))
    if randomize:
        randomize_added(poly)
    return poly


def seq2seq_batch(kind: str, batch_size: int = 4) -> dict[str, torch.Tensor]:
    batch = random_batch(kind, batch_size)
    batch["labels"] = batch.pop("decoder_input_ids")
    return batch


# ---- wrap, counts, starting point -----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_wrap_with_defaults_and_parameter_counts_match_formulas(method, kind):
    poly = make(method, kind, randomize=False)
    counts = poly.parameter_counts()
    assert counts.training_extra == expected_training_extra(method, kind)
    assert counts.language_specific == expected_language_specific(method, kind)
    assert counts.base == sum(p.numel() for p in build(kind).parameters())
    layer_sum = sum(
        layer.route_parameter_count(len(LANGS)) + layer.language_agnostic_parameter_count()
        - layer.replaced_base_parameter_count()
        for layer in poly.routed_layers.values()
    )
    assert layer_sum == counts.training_extra, "layers' own counts must add up to their parameters"


@pytest.mark.parametrize("kind", ["bart", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient(method, kind):
    """An idle trainable weight is miscounted as useful and stalls DDP, which waits for every gradient."""
    poly = make(method, kind)
    poly.train()
    batch = seq2seq_batch(kind) if kind in ENCODER_DECODER else random_batch(kind, 4)
    out = poly(**batch, src_lang=["de", "fr", "en", "de"], tgt_lang=["en", "en", "fr", "fr"])
    loss = out.loss if out.get("loss") is not None else out.logits.pow(2).mean()
    (loss + poly.auxiliary_loss()).backward()
    idle = [name for name, p in poly.named_parameters() if p.requires_grad and p.grad is None]
    assert not idle, f"{method}: trainable parameters with no gradient: {idle[:4]}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["lms_pair", "lms_language", "lora", "ls_ffn", "clsr"])
def test_methods_that_start_at_the_base_model_do(method, kind):
    batch = random_batch(kind, 3)
    reference = output_of(build(kind), batch)
    poly = make(method, kind, randomize=False)
    torch.testing.assert_close(output_of(poly, batch, src_lang="de", tgt_lang=["fr", "en", "de"]), reference)
    if method == "clsr":  # identity projections: even noisy training gates leave the output unchanged
        for layer in poly.routed_layers.values():  # the model's own dropout stays off
            layer.train()
        torch.testing.assert_close(output_of(poly, batch, src_lang="de", tgt_lang="fr"), reference)


def test_switch_without_init_noise_is_the_gated_base_ffn():
    base = build("bart")
    poly = pp.wrap(base, CONFIGS["switch"](expert_init_std=0.0))
    layer = poly.base_model.model.encoder.layers[1]
    reference_layer = build("bart").model.encoder.layers[1]
    x = torch.randn(2, 5, HIDDEN, dtype=torch.float64)
    switched = layer.fc2(layer.activation_fn(layer.fc1(x)))
    dense = reference_layer.fc2(reference_layer.activation_fn(reference_layer.fc1(x)))
    gate = layer.fc1.router(x).softmax(-1).max(-1).values
    torch.testing.assert_close(switched, gate.unsqueeze(-1) * dense)
    assert not torch.allclose(switched, dense), "the gate must scale the expert output"


# ---- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ENCODER_DECODER)
@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_lower_the_loss_including_auxiliary_terms(method, kind):
    torch.manual_seed(0)
    poly = make(method, kind, randomize=False, freeze_base=False)  # the papers' setting: trained from scratch
    poly.eval()
    for layer in poly.routed_layers.values():  # training-mode routed layers, no dropout noise elsewhere
        layer.train()
    batch = seq2seq_batch(kind)
    trainable = [p for p in poly.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        output = poly(**batch, src_lang=["de", "fr", "de", "en"], tgt_lang="en")
        auxiliary = poly.auxiliary_loss()
        if method in ("switch", "clsr"):
            assert torch.is_tensor(auxiliary) and auxiliary.requires_grad
        loss = output.loss + auxiliary
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses


def test_lora_trains_only_its_factors_by_default():
    poly = make("lora", "bart", randomize=False)
    trainable = {n for n, p in poly.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


# ---- routing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", LANGUAGE_ROUTED)
@pytest.mark.parametrize("pattern", ["two_runs", "every_example_differs"])
def test_mixed_batch_equals_per_example_runs(method, kind, pattern):
    poly = make(method, kind, shared_route=True).eval()
    if pattern == "two_runs":  # few runs: the segment path
        src, tgt = ["de", "de", "de", "fr", "fr", "fr"], ["en", "en", "en", "de", "de", "de"]
    else:  # more runs than segments allowed: the grouped path
        src, tgt = ["de", "fr", "en", "shared", "fr", "de"], ["en", "de", "fr", "shared", "en", "fr"]
    batch = random_batch(kind, len(src))
    mixed = output_of(poly, batch, src_lang=src, tgt_lang=tgt)
    for i in range(len(src)):
        single = {k: v[i : i + 1] for k, v in batch.items()}
        torch.testing.assert_close(mixed[i : i + 1], output_of(poly, single, src_lang=src[i], tgt_lang=tgt[i]))
    assert not torch.allclose(mixed, output_of(poly, batch, src_lang="en", tgt_lang="en")), "routes had no effect"


@pytest.mark.parametrize("kind", ["bart", "t5"])
@pytest.mark.parametrize("method", LANGUAGE_WISE)
def test_encoder_reads_the_source_and_decoder_the_target(method, kind):
    poly = make(method, kind).eval()
    batch = random_batch(kind, 2)

    def run(src, tgt):
        return poly(**batch, src_lang=src, tgt_lang=tgt)

    torch.testing.assert_close(run("de", "fr").encoder_last_hidden_state, run("de", "en").encoder_last_hidden_state)
    assert not torch.allclose(run("de", "fr").encoder_last_hidden_state, run("fr", "fr").encoder_last_hidden_state)
    assert not torch.allclose(run("de", "fr").logits, run("de", "en").logits)


@pytest.mark.parametrize("kind", KINDS)
def test_ls_ffn_shared_route_is_the_base_model(kind):
    batch = random_batch(kind, 2)
    reference = output_of(build(kind), batch)
    poly = make("ls_ffn", kind, shared_route=True)
    torch.testing.assert_close(output_of(poly, batch, lang="shared"), reference)
    assert not torch.allclose(output_of(poly, batch, lang="de"), reference)


@pytest.mark.parametrize("method", ["lora", "switch"])
def test_language_agnostic_methods_ignore_routes_and_run_without_them(method):
    poly = make(method, "bart").eval()
    batch = random_batch("bart", 2)
    with_de = output_of(poly, batch, src_lang="de", tgt_lang="en")
    torch.testing.assert_close(output_of(poly, batch, src_lang="fr", tgt_lang="de"), with_de)
    torch.testing.assert_close(output_of(poly.base_model, batch), with_de)  # no routes set at all
    assert not torch.allclose(with_de, output_of(build("bart"), batch)), "the method must change the model"


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


# ---- save, load, merge -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bart", "t5", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_give_identical_outputs(method, kind, tmp_path):
    poly = make(method, kind).eval()
    batch = random_batch(kind, 3)
    routes = dict(src_lang=["de", "fr", "en"], tgt_lang=["en", "de", "fr"])
    expected = output_of(poly, batch, **routes)
    poly.save_pretrained(tmp_path)
    restored = pp.PolyModel.from_pretrained(build(kind), tmp_path).eval()
    assert type(restored.poly_config) is type(poly.poly_config)
    torch.testing.assert_close(output_of(restored, batch, **routes), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bart", "t5", "bert"])
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_unmerge_and_unload(method, kind):
    poly = make(method, kind)
    batch = random_batch(kind, 2)
    route = dict(src_lang="de", tgt_lang="fr")
    expected = output_of(poly, batch, **route)
    originals = {n: l.base_layer.weight.detach().clone() for n, l in poly.routed_layers.items()}
    poly.merge(src="de", tgt="fr")
    torch.testing.assert_close(output_of(poly, batch, **route), expected)
    poly.unmerge()
    for name, layer in poly.routed_layers.items():
        if method == "ls_ffn":  # restored from a saved copy: bit-exact
            assert torch.equal(layer.base_layer.weight, originals[name])
        else:
            torch.testing.assert_close(layer.base_layer.weight, originals[name])
    plain = poly.merge_and_unload(src="de", tgt="fr")
    assert not any(isinstance(m, pp.PolyModel) or hasattr(m, "base_layer") for m in plain.modules())
    torch.testing.assert_close(output_of(plain, batch), expected)


def test_ls_ffn_merge_folds_the_language_weight_and_bias_exactly():
    poly = make("ls_ffn", "bart")
    poly.merge(src="de", tgt="fr")
    encoder_fc1 = poly.routed_layers["model.encoder.layers.0.fc1"]
    decoder_fc1 = poly.routed_layers["model.decoder.layers.0.fc1"]
    assert torch.equal(encoder_fc1.base_layer.weight, encoder_fc1.language_weight[LANGS.index("de")])
    assert torch.equal(decoder_fc1.base_layer.bias, decoder_fc1.language_bias[LANGS.index("fr")])


@pytest.mark.parametrize("method", ["switch", "clsr"])
def test_methods_without_a_weight_form_refuse_to_merge(method):
    poly = make(method, "bart")
    with pytest.raises(pp.LanguageError, match="cannot|no route"):
        poly.merge(src="de", tgt="fr")


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
        (lambda: CLSRConfig(languages=LANGS, budget=1.5), r"CLSRConfig.budget=1.5 must lie in \[0, 1\]"),
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


def test_configs_round_trip_through_json_form():
    for method, make_config in CONFIGS.items():
        config = make_config()
        assert pp.config_from_dict(config.to_dict()) == config, method


@pytest.mark.parametrize("method", ["lms_pair", "lms_language", "ls_ffn", "clsr", "switch"])
def test_beam_search_with_mixed_routes_equals_per_example(method):
    poly = make(method, "bart").eval()
    src, tgt = ["de", "fr", "en"], ["en", "en", "fr"]
    batch = random_batch("bart", len(src))
    batch.pop("decoder_input_ids")
    settings = dict(num_beams=3, max_new_tokens=6, do_sample=False)
    mixed = poly.generate(**batch, src_lang=src, tgt_lang=tgt, **settings)
    for i in range(len(src)):
        alone = poly.generate(**{k: v[i : i + 1] for k, v in batch.items()}, src_lang=src[i], tgt_lang=tgt[i], **settings)
        assert torch.equal(mixed[i, : alone.shape[1]], alone[0]), i


@pytest.mark.parametrize("method", METHODS)
def test_by_default_only_the_added_weights_train_and_the_base_stays_as_it_was(method):
    poly = make(method, "bart", randomize=False)
    added = {id(p) for p in poly.route_parameters()}
    trainable = [p for p in poly.parameters() if p.requires_grad]
    assert trainable and all(id(p) in added for p in trainable)
    frozen_before = {name: p.detach().clone() for name, p in poly.named_parameters() if id(p) not in added}
    optimizer = torch.optim.Adam(trainable, lr=5e-2)
    batch = seq2seq_batch("bart")
    losses = []
    for _ in range(6):
        loss = poly(**batch, src_lang=["de", "fr", "de", "en"], tgt_lang="en").loss + poly.auxiliary_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    for name, parameter in poly.named_parameters():
        if name in frozen_before:
            assert torch.equal(parameter, frozen_before[name]), name

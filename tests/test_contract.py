"""The shared contract: every method of the table (tests/method_table.py) on every tiny model.

A new method is one row in that table; these checks then run on it. What a method may do (route by language,
merge, export as LoRA, run a source pass) is read from its declared traits, never from a list of names here.
"""
from __future__ import annotations

import pytest
import torch

import polypeft as pp
from method_table import (KINDS, LANGS, METHODS, TABLE, TRAITS, make, methods_with, seq2seq_batch, training_batch)
from polypeft.methods.registry import registered_methods
from tiny_models import ENCODER_DECODER, build, output_of, random_batch


def test_the_table_covers_every_registered_method():
    covered = {TABLE[method].make().method for method in METHODS}
    assert covered == set(registered_methods()), "every registered method needs a row in tests/method_table.py"


def test_traits_agree_with_what_the_layers_do():
    for method, traits in TRAITS.items():
        poly = make(method, "bart")
        if not traits["mergeable"]:
            with pytest.raises(pp.LanguageError, match="no route folds into one weight"):
                poly.merge(src="de", tgt="fr")
        if not traits["low_rank"]:
            with pytest.raises(pp.ExportError, match="hold no low-rank update"):
                poly.export_lora("unused", lang="de")


# ---- wrap, counts, starting point -----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_wrap_with_defaults_and_parameter_counts_match_formulas(method, kind):
    poly = make(method, kind, randomize=False)
    counts = poly.parameter_counts()
    assert counts.training_extra == TABLE[method].training_extra(kind)
    assert counts.language_specific == TABLE[method].language_specific(kind)
    assert counts.base == sum(p.numel() for p in build(kind).parameters())
    layer_sum = sum(
        layer.route_parameter_count(len(LANGS)) + layer.language_agnostic_parameter_count()
        - layer.replaced_base_parameter_count()
        for layer in poly.routed_layers.values()
    )
    assert layer_sum == counts.training_extra, "layers' own counts must add up to their parameters"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient(method, kind):
    """An idle trainable weight is miscounted as useful and stalls DDP, which waits for every gradient."""
    poly = make(method, kind)
    poly.train()
    out = poly(**training_batch(kind), src_lang=["de", "fr", "en", "de"], tgt_lang=["en", "en", "fr", "fr"])
    if out.get("loss") is not None:
        loss = out.loss
    else:  # no labels (a decoder-only model) or no head (BERT): any function of the whole output
        loss = (out.logits if out.get("logits") is not None else out.last_hidden_state).pow(2).mean()
    (loss + poly.auxiliary_loss()).backward()
    idle = [name for name, p in poly.named_parameters() if p.requires_grad and p.grad is None]
    assert not idle, f"{method}: trainable parameters with no gradient: {idle[:4]}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", [m for m in METHODS if TABLE[m].starts_at_base])
def test_methods_that_start_at_the_base_model_do(method, kind):
    batch = random_batch(kind, 3)
    reference = output_of(build(kind), batch)
    poly = make(method, kind, randomize=False)
    torch.testing.assert_close(output_of(poly, batch, src_lang="de", tgt_lang=["fr", "en", "de"]), reference)
    for layer in poly.routed_layers.values():  # training-mode layers (CLSR's noisy gates), the model's dropout off
        layer.train()
    torch.testing.assert_close(output_of(poly, batch, src_lang="de", tgt_lang="fr"), reference)


# ---- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "bert"])  # the models with a language-model loss
@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_lower_the_loss_including_auxiliary_terms(method, kind):
    torch.manual_seed(0)
    poly = make(method, kind, randomize=False, freeze_base=False)  # the papers' setting: trained from scratch
    poly.eval()
    for layer in poly.routed_layers.values():  # training-mode routed layers, no dropout noise elsewhere
        layer.train()
    batch = training_batch(kind)
    if kind not in ENCODER_DECODER:
        batch["labels"] = batch["input_ids"]
    trainable = [p for p in poly.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        output = poly(**batch, src_lang=["de", "fr", "de", "en"], tgt_lang="en")
        auxiliary = poly.auxiliary_loss()
        if TABLE[method].auxiliary_loss:
            assert torch.is_tensor(auxiliary) and auxiliary.requires_grad
        loss = output.loss + auxiliary
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses


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


# ---- routing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", methods_with("language_routes"))
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
@pytest.mark.parametrize("method", [m for m in METHODS if TABLE[m].language_wise])
def test_encoder_reads_the_source_and_decoder_the_target(method, kind):
    poly = make(method, kind).eval()
    batch = random_batch(kind, 2)

    def run(src, tgt):
        return poly(**batch, src_lang=src, tgt_lang=tgt)

    torch.testing.assert_close(run("de", "fr").encoder_last_hidden_state, run("de", "en").encoder_last_hidden_state)
    assert not torch.allclose(run("de", "fr").encoder_last_hidden_state, run("fr", "fr").encoder_last_hidden_state)
    assert not torch.allclose(run("de", "fr").logits, run("de", "en").logits)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", methods_with("language_routes", False))
def test_language_agnostic_methods_ignore_routes_and_run_without_them(method, kind):
    poly = make(method, kind).eval()
    batch = random_batch(kind, 2)
    with_de = output_of(poly, batch, src_lang="de", tgt_lang="en")
    torch.testing.assert_close(output_of(poly, batch, src_lang="fr", tgt_lang="de"), with_de)
    torch.testing.assert_close(output_of(poly.base_model, batch), with_de)  # no routes set at all
    assert not torch.allclose(with_de, output_of(build(kind), batch)), "the method must change the model"


# ---- save, load, merge -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", methods_with("mergeable"))
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
        if TABLE[method].exact_unmerge:
            assert torch.equal(layer.base_layer.weight, originals[name])
        else:
            torch.testing.assert_close(layer.base_layer.weight, originals[name])
    plain = poly.merge_and_unload(src="de", tgt="fr")
    assert not any(isinstance(m, pp.PolyModel) or hasattr(m, "base_layer") for m in plain.modules())
    torch.testing.assert_close(output_of(plain, batch), expected)


@pytest.mark.parametrize("method", methods_with("mergeable", False))
def test_methods_without_a_weight_form_refuse_to_merge(method):
    poly = make(method, "bart")
    with pytest.raises(pp.LanguageError, match="no route folds into one weight"):
        poly.merge(src="de", tgt="fr")


def test_configs_round_trip_through_json_form():
    for method, row in TABLE.items():
        config = row.make()
        assert pp.config_from_dict(config.to_dict()) == config, method


@pytest.mark.parametrize("method", METHODS)
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


# ---- source pass ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", methods_with("source_pass"))
def test_a_source_pass_changes_the_output_and_saves_exactly(method, kind, tmp_path):
    poly = make(method, kind).eval()
    batch, source = random_batch(kind, 3), random_batch(kind, 3, length=5, seed=7)
    plain = output_of(poly, batch)
    fused = output_of(poly, batch, source_batch=source)
    assert not torch.allclose(plain, fused), "the source pass had no effect"
    torch.testing.assert_close(output_of(poly, batch), plain)  # nothing of the source stays behind
    poly.save_pretrained(tmp_path)
    restored = pp.PolyModel.from_pretrained(build(kind), tmp_path).eval()
    torch.testing.assert_close(output_of(restored, batch, source_batch=source), fused, rtol=0, atol=0)

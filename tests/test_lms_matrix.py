"""The LMS test matrix: tiny models x synthesis x routing mode, each check a row of asserts."""
from __future__ import annotations

import pytest
import torch

import polypeft as pp
from polypeft.core.languages import RouteGroups
from tiny_models import ALL_KINDS, ENCODER_DECODER, FFN_LAYOUT, build, output_of, random_batch, randomize_added

LANGS = ["en", "de", "fr"]
SYNTHESES = ("pair", "language")


def make(kind: str, synthesis: str = "pair", shared: bool = True, rank: int = 4):
    base = build(kind)
    poly = pp.wrap(base, pp.LMSConfig(languages=LANGS, rank=rank, synthesis=synthesis, shared_route=shared))
    randomize_added(poly)
    return poly


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_defaults_find_every_ffn_linear_and_count_matches_formula(kind):
    base = build(kind)
    reference = output_of(base, random_batch(kind, 2))
    poly = pp.wrap(base, pp.LMSConfig(languages=LANGS, rank=4))
    layers, per_layer = FFN_LAYOUT[kind]
    assert len(poly.routed_layers) == layers * per_layer
    expected = sum(len(LANGS) * 4 * (l.out_features + l.in_features) for l in poly.routed_layers.values())
    assert poly.num_language_parameters() == expected
    if per_layer == 2:  # both FFN linears: the paper's 2 * L * N * d * (r + c)
        layer = next(iter(poly.routed_layers.values()))
        assert expected == 2 * len(LANGS) * layers * 4 * (layer.out_features + layer.in_features)
    # F starts at zero: the wrapped model is exactly the base model.
    torch.testing.assert_close(output_of(poly, random_batch(kind, 2), src_lang="de", tgt_lang="fr"), reference)


def test_parameter_breakdown_with_shared_route():
    poly = make("bart", shared=True)
    counts = poly.parameter_counts()
    per_route = counts.language_specific // len(LANGS)
    assert counts.shared_route == per_route
    assert counts.training_extra == per_route * (len(LANGS) + 1)
    assert counts.inference_extra_shared_route == per_route
    assert counts.inference_extra_language_routes == counts.language_specific
    assert counts.base == sum(p.numel() for p in build("bart").parameters())


MIXED_PATTERNS = {
    # few runs of equal routes: the segment path
    "two_runs": (["de", "de", "de", "fr", "fr", "fr"], ["en", "en", "en", "de", "de", "de"]),
    # more runs than segments allowed, every example its own route
    "every_example_differs": (["de", "fr", "en", "shared", "fr", "de"], ["en", "de", "fr", "shared", "en", "fr"]),
    # routes repeated out of order (as beam search repeats them): groups of unequal size
    "interleaved_groups": (["de", "fr", "de", "en", "fr", "de", "shared"], ["en", "de", "en", "fr", "de", "en", "shared"]),
}


@pytest.fixture(params=["per_example", "per_group"])
def mixed_path(request, monkeypatch):
    """Force the mixed-batch strategy LMS picks by its cost model, so both are always checked."""
    choice = request.param == "per_group"
    monkeypatch.setattr(RouteGroups, "padded_cheaper_than_per_example", lambda self, tokens, rank: choice)
    return request.param


@pytest.mark.slow
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("synthesis", SYNTHESES)
@pytest.mark.parametrize("pattern", sorted(MIXED_PATTERNS))
def test_mixed_batch_equals_per_example_runs(kind, synthesis, pattern, mixed_path):
    poly = make(kind, synthesis)
    src, tgt = MIXED_PATTERNS[pattern]
    batch = random_batch(kind, len(src))
    mixed = output_of(poly, batch, src_lang=src, tgt_lang=tgt)
    for i in range(len(src)):
        single = {k: v[i : i + 1] for k, v in batch.items()}
        torch.testing.assert_close(mixed[i : i + 1], output_of(poly, single, src_lang=src[i], tgt_lang=tgt[i]))
    # and the routes matter: another route gives another output
    other = output_of(poly, batch, src_lang="en", tgt_lang="en")
    assert not torch.allclose(mixed, other)


def test_route_groups_lay_out_examples_by_the_ids_a_layer_reads():
    routes = pp.LanguageRegistry(LANGS).routes(["de", "fr", "de", "en", "de"], ["en", "en", "fr", "en", "en"])
    pair = routes.groups("pair")  # (de,en) at 0 and 4, (fr,en) at 1, (de,fr) at 2, (en,en) at 3
    assert pair.sizes == (2, 1, 1, 1) and pair.group_size == 2
    assert pair.order.tolist() == [0, 4, 1, 2, 3]
    assert pair.slots.tolist() == [0, 4, 1, 1, 2, 2, 3, 3]  # short groups padded with their first member
    assert pair.position.tolist() == [0, 2, 4, 6, 1]
    assert (pair.src_ids, pair.tgt_ids) == ((1, 2, 1, 0), (0, 0, 2, 0))
    by_source = routes.groups("src")
    assert by_source.sizes == (3, 1, 1) and by_source.src_ids == (1, 2, 0)
    assert routes.groups("tgt").sizes == (4, 1)
    assert routes.groups("pair") is pair  # built once per forward, not once per layer
    expanded = routes.expanded_to(15)
    assert expanded is routes.expanded_to(15)
    assert expanded.groups("src").sizes == (9, 3, 3)


def test_grouped_path_is_chosen_for_decoding_and_not_for_long_sequences():
    # beam search: 4 examples x 5 beams, one new token per row
    routes = pp.LanguageRegistry(LANGS).routes(["de", "fr", "de", "en"], "en").expanded_to(20)
    groups = routes.groups("pair")
    assert groups.padded_cheaper_than_per_example(tokens_per_example=1, rank=16)
    assert not groups.padded_cheaper_than_per_example(tokens_per_example=64, rank=16)


@pytest.mark.parametrize("kind", ENCODER_DECODER)
def test_language_wise_uses_source_in_encoder_and_target_in_decoder(kind):
    poly = make(kind, "language")
    batch = random_batch(kind, 2)

    def encoder_states(src, tgt):
        return poly(**batch, src_lang=src, tgt_lang=tgt).encoder_last_hidden_state

    torch.testing.assert_close(encoder_states("de", "fr"), encoder_states("de", "en"))
    assert not torch.allclose(encoder_states("de", "fr"), encoder_states("fr", "fr"))
    # the decoder reads tgt: changing only tgt changes the logits
    assert not torch.allclose(poly(**batch, src_lang="de", tgt_lang="fr").logits,
                              poly(**batch, src_lang="de", tgt_lang="en").logits)


@pytest.mark.parametrize("kind", ["bart", "llama"])
@pytest.mark.parametrize("pattern", ["two_runs", "every_example_differs", "interleaved_groups"])
def test_routes_absent_from_batch_get_no_gradient(kind, pattern, mixed_path):
    poly = make(kind, "pair")
    src, tgt = {
        "two_runs": (["de", "de"], ["en", "en"]),
        "every_example_differs": (["de", "en", "de"], ["en", "de", "de"]),
        "interleaved_groups": (["de", "en", "de", "en", "de"], ["en", "de", "en", "de", "de"]),
    }[pattern]
    output_of(poly, random_batch(kind, len(src)), src_lang=src, tgt_lang=tgt).pow(2).mean().backward()
    ids = {c: i for i, c in enumerate(LANGS + ["shared"])}
    used_v = {ids[s] for s in src}
    used_f = {ids[t] for t in tgt}
    for layer in poly.routed_layers.values():
        for route in range(len(ids)):
            v_grad = layer.lms_V.grad[route].abs().sum()
            f_grad = layer.lms_F.grad[route].abs().sum()
            assert (v_grad > 0) == (route in used_v), (layer.layer_name, route)
            assert (f_grad > 0) == (route in used_f), (layer.layer_name, route)


@pytest.mark.parametrize("kind", ["bart", "marian", "t5", "llama"])
def test_beam_search_with_mixed_routes_equals_per_example(kind):
    poly = make(kind, "pair", rank=4)
    src, tgt = ["de", "fr", "en"], ["en", "en", "fr"]
    batch = random_batch(kind, len(src))
    batch.pop("decoder_input_ids", None)
    settings = dict(num_beams=3, max_new_tokens=6, do_sample=False, early_stopping=True)
    mixed = poly.generate(**batch, src_lang=src, tgt_lang=tgt, **settings)
    homogeneous = poly.generate(**batch, src_lang="en", tgt_lang="en", **settings)
    assert not torch.equal(mixed, homogeneous), "routes had no effect on generation"
    for i in range(len(src)):
        single = {k: v[i : i + 1] for k, v in batch.items()}
        alone = poly.generate(**single, src_lang=src[i], tgt_lang=tgt[i], **settings)
        length = alone.shape[1]
        assert torch.equal(mixed[i, :length], alone[0]), i
        assert (mixed[i, length:] == poly.config.pad_token_id).all()

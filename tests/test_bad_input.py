"""Every bad input named in the core issue gets a clear error at the point of entry."""
from __future__ import annotations

import json

import pytest
import torch

import polypeft as pp
from tiny_models import build, random_batch

LANGS = ["en", "de", "fr"]


@pytest.fixture
def poly():
    return pp.wrap(build("bart"), pp.LMSConfig(languages=LANGS, rank=4, shared_route=True))


def test_unknown_language_code_names_it_and_lists_known(poly):
    batch = random_batch("bart", 2)
    with pytest.raises(pp.LanguageError, match=r"tgt_lang\[1\]: unknown language code 'xx'.*\['en', 'de', 'fr', 'shared'\]"):
        poly(**batch, src_lang="en", tgt_lang=["de", "xx"])
    with pytest.raises(pp.LanguageError, match=r"src_lang: unknown language code 'EN'"):
        poly(**batch, src_lang="EN", tgt_lang="de")


def test_route_list_of_wrong_length(poly):
    with pytest.raises(pp.LanguageError, match=r"src_lang has 3 codes but the batch has 2 examples"):
        poly(**random_batch("bart", 2), src_lang=["en", "de", "fr"], tgt_lang="en")


def test_route_ids_out_of_range_and_wrong_shape(poly):
    batch = random_batch("bart", 2)
    with pytest.raises(pp.LanguageError, match=r"src_lang\[1\]: route id 7 is out of range; ids must lie in \[0, 3\]"):
        poly(**batch, src_lang=torch.tensor([0, 7]), tgt_lang="en")
    with pytest.raises(pp.LanguageError, match=r"route tensor of shape \(2, 1\) does not fit a batch of 2"):
        poly(**batch, src_lang=torch.tensor([[0], [1]]), tgt_lang="en")
    with pytest.raises(pp.LanguageError, match=r"integer tensor"):
        poly(**batch, src_lang=torch.tensor([0.0, 1.0]), tgt_lang="en")


def test_shared_route_must_exist_and_be_used_on_both_sides():
    no_shared = pp.wrap(build("bart"), pp.LMSConfig(languages=LANGS, rank=4))
    with pytest.raises(pp.LanguageError, match=r"unknown language code 'shared'"):
        no_shared(**random_batch("bart", 1), src_lang="shared")
    with_shared = pp.wrap(build("bart"), pp.LMSConfig(languages=LANGS, rank=4, shared_route=True))
    with pytest.raises(pp.LanguageError, match=r"shared route must be used on both sides"):
        with_shared(**random_batch("bart", 1), src_lang="shared", tgt_lang="de")


def test_missing_routes_are_named(poly):
    with pytest.raises(pp.LanguageError, match="no route given"):
        poly(**random_batch("bart", 1))
    with pytest.raises(pp.LanguageError, match=r"ran without routes: call the PolyModel with src_lang="):
        poly.base_model(**random_batch("bart", 1))


def test_target_pattern_that_matches_nothing_lists_linears():
    with pytest.raises(pp.TargetError, match=r"target_modules=\['ffn_in'\] matches no nn.Linear in BartForConditionalGeneration.*fc1"):
        pp.wrap(build("bart"), pp.LMSConfig(languages=LANGS, target_modules=["ffn_in"]))
    with pytest.raises(pp.TargetError, match=r"matched but not nn.Linear"):
        pp.wrap(build("bart"), pp.LMSConfig(languages=LANGS, target_modules=["layers.0"]))


def test_rank_larger_than_the_layer_allows():
    with pytest.raises(ValueError, match=r"LMS rank 40 is larger than min\(out, in\) = 32 of model.encoder.layers.0.fc1 \(48 x 32\)"):
        pp.wrap(build("bart"), pp.LMSConfig(languages=LANGS, rank=40))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(languages=[]), "languages is empty"),
        (dict(languages=["en", "en"]), r"lists \['en'\] more than once"),
        (dict(languages=["en", "shared"]), "reserved for the FD route"),
        (dict(languages=["en"], synthesis="pairwise"), r"synthesis='pairwise' is not allowed; choose one of \['pair', 'language'\]"),
        (dict(languages=["en"], rank=0), r"rank=0 must be a positive int"),
        (dict(languages=["en"], target_modules=[]), "empty list"),
    ],
)
def test_config_is_validated_on_construction(kwargs, message):
    with pytest.raises(pp.ConfigError, match=message):
        pp.LMSConfig(**kwargs)


def test_config_file_with_unknown_keys(tmp_path):
    path = tmp_path / "lms.json"
    path.write_text(json.dumps({"method": "lms", "languages": ["en"], "rank": 4, "dropout": 0.1}))
    with pytest.raises(pp.ConfigError, match=r"lms.json: unknown keys \['dropout'\] for method 'lms'"):
        pp.load_config_file(str(path))
    path.write_text(json.dumps({"method": "lmz", "languages": ["en"]}))
    with pytest.raises(pp.ConfigError, match=r"unknown method 'lmz'"):
        pp.load_config_file(str(path))
    path.write_text(json.dumps({"method": "lms", "languages": ["en"], "rank": 2}))
    assert pp.load_config_file(str(path)) == pp.LMSConfig(languages=["en"], rank=2)


def test_beam_batch_that_is_not_a_multiple_of_the_routes(poly):
    with pytest.raises(pp.LanguageError, match=r"routes were given for 2 examples but a routed layer saw a batch of 3"):
        with poly.routes(src_lang=["en", "de"], tgt_lang="fr"):
            poly.base_model(**random_batch("bart", 3))

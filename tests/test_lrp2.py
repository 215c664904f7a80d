"""LRP2 on tiny random BERT, BART and Llama models: vectors, hooks, removal, mixed batches, search."""
from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartModel,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from polypeft.interventions.capture import InterventionError, find_blocks
from polypeft.interventions.lrp2 import LRP2, LanguageVectors, language_vectors
from polypeft.interventions.search import lrp2_scorer, search_layers

WORDS = "the a house cat dog la le maison chat chien der die das haus katze hund".split()
TEXTS = {
    "en": ["the cat", "a dog the house", "the house"],
    "fr": ["la maison le chat", "le chien", "la maison"],
    "de": ["das haus", "die katze der hund", "der hund"],
}


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )
    return BertModel(config).eval()


def tiny_bart() -> BartModel:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=32, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
    )
    return BartModel(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def encode(tokenizer, texts):
    return tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)


def test_a_failed_construction_leaves_no_hook_behind(tiny_tokenizer):
    model, tokenizer = tiny_bart(), tiny_tokenizer
    vectors = language_vectors(model, TEXTS, tokenizer, stack="both", progress=False)
    del vectors.means["decoder"]["fr"]  # the encoder's hooks attach first, then the decoder's table fails
    batch = tokenizer(["la maison le chat"], return_tensors="pt")
    batch.pop("token_type_ids", None)
    before = model(**batch).last_hidden_state
    with pytest.raises(InterventionError, match="no language vector for 'fr'"):
        LRP2(model, vectors, lirp_layer=1, stack="both")
    assert all(not block._forward_hooks and not block._forward_pre_hooks
               for blocks in find_blocks(model).values() for block in blocks)
    assert torch.equal(model(**batch).last_hidden_state, before)


def test_last_token_vectors_of_an_absolute_position_model_do_not_depend_on_padding(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()
    tokenizer = tiny_tokenizer
    tokenizer.padding_side = "left"  # the usual setting for causal LMs
    texts = {"en": TEXTS["en"], "fr": TEXTS["fr"]}  # sentences of different lengths: padded in a batch
    batched = language_vectors(model, texts, tokenizer, pooling="last", batch_size=3, progress=False)
    alone = language_vectors(model, texts, tokenizer, pooling="last", batch_size=1, progress=False)
    for language in texts:
        torch.testing.assert_close(batched.means["decoder"][language], alone.means["decoder"][language])
    assert tokenizer.padding_side == "left", "the tokenizer's own setting is restored"


def test_block_lists_found_generically():
    assert set(find_blocks(tiny_bert())) == {"encoder"}
    assert set(find_blocks(tiny_bart())) == {"encoder", "decoder"}
    assert set(find_blocks(tiny_llama())) == {"decoder"}
    assert len(find_blocks(tiny_llama())["decoder"]) == 3


def test_language_vectors_equal_hand_computed_mean(tokenizer):
    model = tiny_bert()
    vectors = language_vectors(model, TEXTS, tokenizer, pooling="mean", batch_size=2, progress=False)
    assert vectors.layers == [0, 1, 2, 3]
    for language, texts in TEXTS.items():
        batch = encode(tokenizer, texts)
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].unsqueeze(-1).float()
        for layer in range(4):
            per_sentence = (hidden[layer] * mask).sum(1) / mask.sum(1)
            expected = per_sentence.mean(0)
            torch.testing.assert_close(vectors.vector(language, layer), expected, atol=1e-5, rtol=1e-5)


def test_last_token_pooling_uses_last_real_token(tokenizer):
    model = tiny_llama()
    vectors = language_vectors(model, {"en": TEXTS["en"]}, tokenizer, layers=[1], pooling="last", progress=False)
    batch = encode(tokenizer, TEXTS["en"])
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[1]
    last = batch["attention_mask"].sum(1) - 1
    expected = hidden[torch.arange(3), last].mean(0)
    torch.testing.assert_close(vectors.vector("en", 1), expected, atol=1e-5, rtol=1e-5)


def test_hooks_shift_the_reported_hidden_state(tokenizer):
    model = tiny_bert()
    vectors = language_vectors(model, TEXTS, tokenizer, progress=False)
    batch = encode(tokenizer, TEXTS["de"])
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states
        with LRP2(model, vectors, lirp_layer=1, pivot="en") as lrp2:
            lrp2.set_languages("de")
            shifted = model(**batch, output_hidden_states=True).hidden_states
    expected = plain[1] - vectors.vector("de", 1) + vectors.vector("en", 1)
    torch.testing.assert_close(shifted[1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shifted[0], plain[0])
    assert not torch.allclose(shifted[3], plain[3], atol=1e-4)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_removed_hooks_leave_outputs_bit_identical(tokenizer, build):
    model = build()
    vectors = language_vectors(model, TEXTS, tokenizer, progress=False)
    batch = encode(tokenizer, TEXTS["fr"])
    with torch.no_grad():
        before = model(**batch).last_hidden_state if isinstance(model, BertModel) else model(**batch).logits
        lrp2 = LRP2(model, vectors, lirp_layer=0, lsrp_layer=2)
        lrp2.set_languages("fr")
        during = model(**batch).last_hidden_state if isinstance(model, BertModel) else model(**batch).logits
        lrp2.remove()
        after = model(**batch).last_hidden_state if isinstance(model, BertModel) else model(**batch).logits
    assert not torch.equal(before, during)
    assert torch.equal(before, after)
    assert not lrp2.active


def test_lirp_then_lsrp_at_the_same_layer_is_the_identity(tokenizer):
    model = tiny_bert()
    vectors = language_vectors(model, TEXTS, tokenizer, progress=False)
    batch = encode(tokenizer, TEXTS["de"])
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
        for layer in (0, 2, 3):
            with LRP2(model, vectors, lirp_layer=layer, lsrp_layer=layer) as lrp2, lrp2.languages("de"):
                round_trip = model(**batch).last_hidden_state
            torch.testing.assert_close(round_trip, plain, atol=1e-5, rtol=1e-5)
        with LRP2(model, vectors, lirp_layer=1) as lrp2, lrp2.languages("de"):
            lirp_only = model(**batch).last_hidden_state
    assert not torch.allclose(lirp_only, plain, atol=1e-3)


def test_pivot_language_is_left_unchanged(tokenizer):
    model = tiny_bert()
    vectors = language_vectors(model, TEXTS, tokenizer, progress=False)
    batch = encode(tokenizer, TEXTS["en"])
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
        with LRP2(model, vectors, lirp_layer=1, lsrp_layer=2) as lrp2, lrp2.languages("en"):
            shifted = model(**batch).last_hidden_state
    torch.testing.assert_close(shifted, plain)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_mixed_language_batch_equals_per_language_runs(tokenizer, build):
    model = build()
    vectors = language_vectors(model, TEXTS, tokenizer, progress=False)
    texts = ["the house", "la maison", "das haus", "le chien"]
    languages = ["en", "fr", "de", "fr"]
    batch = encode(tokenizer, texts)
    output = (lambda out: out.last_hidden_state) if isinstance(model, BertModel) else (lambda out: out.logits)
    with torch.no_grad(), LRP2(model, vectors, lirp_layer=1, lsrp_layer=2) as lrp2:
        with lrp2.languages(languages):
            mixed = output(model(**batch))
        for row, language in enumerate(languages):
            with lrp2.languages(language):
                alone = output(model(**batch))
            torch.testing.assert_close(mixed[row], alone[row], atol=1e-5, rtol=1e-5)


def test_encoder_decoder_stacks(tokenizer):
    model = tiny_bart()
    vectors = language_vectors(model, TEXTS, tokenizer, stack="both", progress=False)
    assert vectors.stacks == ["decoder", "encoder"]
    batch = encode(tokenizer, TEXTS["fr"])
    inputs = dict(batch, decoder_input_ids=batch["input_ids"])
    with torch.no_grad():
        plain = model(**inputs)
        with LRP2(model, vectors, lirp_layer=1, stack="encoder") as lrp2, lrp2.languages("fr"):
            encoder_only = model(**inputs)
        with LRP2(model, vectors, lirp_layer=1, stack="both") as lrp2, lrp2.languages("fr", decoder_languages="de"):
            both = model(**inputs)
        after = model(**inputs)
    assert not torch.allclose(encoder_only.encoder_last_hidden_state, plain.encoder_last_hidden_state, atol=1e-4)
    assert not torch.allclose(both.last_hidden_state, encoder_only.last_hidden_state, atol=1e-4)
    assert torch.equal(after.last_hidden_state, plain.last_hidden_state)
    encoder_vectors = language_vectors(model, TEXTS, tokenizer, progress=False)
    with pytest.raises(InterventionError, match="no language vectors for stack"):
        LRP2(model, encoder_vectors, lirp_layer=1, stack="decoder")


def test_save_load_round_trip_and_refusal_of_another_model(tokenizer, tmp_path):
    model = tiny_bert(seed=0)
    vectors = language_vectors(model, TEXTS, tokenizer, layers=[1, 2], progress=False)
    path = vectors.save(tmp_path / "vectors.safetensors")
    loaded = LanguageVectors.load(path, model=model)
    assert loaded.layers == [1, 2] and loaded.languages == ["de", "en", "fr"]
    torch.testing.assert_close(loaded.vector("fr", 2), vectors.vector("fr", 2))
    assert not list(tmp_path.glob(".*tmp"))

    other_weights = tiny_bert(seed=1)
    with pytest.raises(InterventionError) as refused:
        LanguageVectors.load(path, model=other_weights)
    message = str(refused.value)
    assert "embedding_fingerprint" in message and "recorded model" in message and "this model" in message
    with pytest.raises(InterventionError, match="different model"):
        LRP2(tiny_llama(), vectors, lirp_layer=1)


def test_bad_arguments_are_named(tokenizer):
    model = tiny_bert()
    vectors = language_vectors(model, TEXTS, tokenizer, layers=[1, 2], progress=False)
    with pytest.raises(InterventionError, match="lsrp_layer=1 comes before lirp_layer=2"):
        LRP2(model, vectors, lirp_layer=2, lsrp_layer=1)
    with pytest.raises(InterventionError, match=r"layers \[3\] have no language vectors"):
        LRP2(model, vectors, lirp_layer=1, lsrp_layer=3)
    with pytest.raises(InterventionError, match="pivot 'xx'"):
        LRP2(model, vectors, lirp_layer=1, pivot="xx")
    with LRP2(model, vectors, lirp_layer=1) as lrp2:
        with pytest.raises(InterventionError, match=r"unknown language code\(s\) \['it'\]"):
            lrp2.set_languages(["en", "it"])
        with pytest.raises(InterventionError, match="no languages set"):
            model(**encode(tokenizer, TEXTS["en"]))
        lrp2.set_languages(["en", "fr"])
        with pytest.raises(InterventionError, match="2 languages were set but the encoder saw a batch of 3"):
            model(**encode(tokenizer, TEXTS["en"]))


def test_layer_search_picks_the_known_best_pair(tmp_path):
    best = {"fr": (1, 3), "de": (2, None)}

    def score(language, i, j):
        if i is None:
            return 0.0
        return 1.0 if (i, j) == best[language] else 0.5 - 0.01 * i

    result = search_layers(score, ["fr", "de"], candidate_layers=[0, 1, 2, 3], progress=False)
    assert (result.best("fr")["lirp_layer"], result.best("fr")["lsrp_layer"]) == (1, 3)
    assert (result.best("de")["lirp_layer"], result.best("de")["lsrp_layer"]) == (2, None)
    assert result.best("fr")["gain"] == pytest.approx(1.0)
    assert all(row["lsrp_layer"] is None or row["lsrp_layer"] > row["lirp_layer"] for row in result.rows)
    # 4 LIRP-only rows and 6 pairs with j > i, per language
    assert len([row for row in result.rows if row["language"] == "fr"]) == 10
    saved = json.loads(result.save_json(tmp_path / "search.json").read_text())
    assert saved["best"]["fr"]["lsrp_layer"] == 3 and saved["baseline"]["de"] == 0.0
    pngs = result.plot_heatmaps(tmp_path, prefix="lrp2_heatmap")
    assert [p.name for p in pngs] == ["lrp2_heatmap_de.png", "lrp2_heatmap_fr.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_scorer_runs_evaluation_with_the_hooks_on(tokenizer):
    model = tiny_bert()
    vectors = language_vectors(model, TEXTS, tokenizer, progress=False)
    batch = encode(tokenizer, TEXTS["fr"])

    def evaluate(language, lrp2):
        with torch.no_grad():
            return float(model(**batch).last_hidden_state[0, 0, 0])

    score = lrp2_scorer(model, vectors, evaluate)
    plain = score("fr", None, None)
    assert score("fr", 1, None) != plain
    assert score("fr", 1, 1) == pytest.approx(plain, abs=1e-5)
    assert score("fr", None, None) == plain


def test_cli_commands_run_from_yaml(tokenizer, tmp_path):
    import argparse

    import yaml

    from polypeft.cli.lrp2_lens import add_cli

    tiny_bert().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    files = {}
    for language, texts in TEXTS.items():
        files[language] = str(tmp_path / f"text.{language}")
        (tmp_path / f"text.{language}").write_text("\n".join(texts) + "\n")
    config = {
        "model": str(tmp_path / "model"), "languages": ["fr", "de"], "pivot": "en",
        "output_dir": str(tmp_path / "run"), "texts": {"files": files}, "valid": {"files": files},
        "search": {"candidate_layers": [1, 2, 3]}, "lens": {"top_k_layers": 1, "steps": 2, "batch_size": 2,
                                                     "push_strength": {"fr": -1, "de": 0.5}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    for command in (["lrp2", "vectors"], ["lrp2", "search"], ["lens", "probe"], ["lens", "train"]):
        arguments = parser.parse_args([*command, str(tmp_path / "config.yaml")])
        assert arguments.func(arguments) == 0
    search = json.loads((tmp_path / "run" / "lrp2_search.json").read_text())
    assert set(search["best"]) == {"fr", "de"}
    # three validation rows cannot tell a layer from noise: the CLI search refuses LRP2 and says why
    assert search["best"]["fr"]["decision"] == "no LRP2" and "too small" in search["best"]["fr"]["reason"]
    assert search["rule"]["name"] == search["best"]["fr"]["rule"] == "maxt"  # the library's default rule
    # search.rule reaches the search, from the YAML file or from --set (the stored vectors are reused)
    arguments = parser.parse_args(["lrp2", "search", str(tmp_path / "config.yaml"), "--set", "search={rule: maxt}"])
    assert arguments.func(arguments) == 0
    search = json.loads((tmp_path / "run" / "lrp2_search.json").read_text())
    assert search["rule"]["name"] == search["best"]["de"]["rule"] == "maxt" and "too small" in search["best"]["de"]["reason"]
    assert (tmp_path / "run" / "lrp2_heatmap_fr.png").is_file()
    assert (tmp_path / "run" / "probe" / "lens_probe.safetensors").is_file()
    assert (tmp_path / "run" / "lens_layers.safetensors").is_file()
    trained = json.loads((tmp_path / "run" / "lens_train.json").read_text())
    assert trained["settings"]["push_strength"] == {"fr": -1.0, "de": 0.5}
    config["lens"]["push_strength"] = "far"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    arguments = parser.parse_args(["lens", "train", str(tmp_path / "config.yaml")])
    with pytest.raises(InterventionError, match="lens.push_strength='far' must be a mapping of strings to numbers or a number"):
        arguments.func(arguments)


def test_the_example_config_is_valid_yaml_with_every_section():
    import yaml

    from polypeft.cli.lrp2_lens import EXAMPLE_CONFIG, InterventionRecipe
    from polypeft.core.config import build

    config = yaml.safe_load(EXAMPLE_CONFIG)
    assert {"model", "languages", "pivot", "texts", "valid", "search", "lens"} <= set(config)
    # the layer-search books are kept out of the language-vector texts
    assert set(config["valid"]["bible"]["books"]) <= set(config["texts"]["bible"]["exclude_books"])
    lens = build(InterventionRecipe, config).lens  # the old flat `steps`/`lr` keys read into its training block
    assert (lens.push_strength, lens.training.steps, lens.training.schedule) == (1.0, 100, "constant")


def test_the_recipe_offers_every_choice_rule():
    from typing import get_args, get_type_hints

    from polypeft.cli.lrp2_lens import SearchSettings
    from polypeft.interventions.choice import DEFAULT_RULE, RULES

    assert get_args(get_type_hints(SearchSettings)["rule"]) == RULES and SearchSettings().rule == DEFAULT_RULE

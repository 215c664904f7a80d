"""Save integrity (language order, base class, damaged files, spent and merged models) and PEFT's conveniences."""
from __future__ import annotations

import json

import pytest
import torch

import polypeft as pp
from tiny_models import build, output_of, random_batch, randomize_added

LANGS = ["en", "de", "fr"]


def make(kind: str, synthesis: str = "pair") -> pp.PolyModel:
    poly = pp.wrap(build(kind), pp.LMSConfig(languages=LANGS, rank=4, synthesis=synthesis, shared_route=True))
    randomize_added(poly)
    return poly.eval()


# ---- save integrity -------------------------------------------------------------------------------
def test_a_reordered_language_list_is_refused(tmp_path):
    make("bart").save_pretrained(tmp_path)
    path = tmp_path / "polypeft_config.json"
    saved = json.loads(path.read_text())
    saved["config"]["languages"] = ["de", "en", "fr"]
    path.write_text(json.dumps(saved))
    with pytest.raises(pp.LanguageError, match=r"languages \['en', 'de', 'fr', 'shared'\] in that order.*\['de', 'en'"):
        pp.PolyModel.from_pretrained(build("bart"), tmp_path)


def test_a_bart_save_refuses_a_marian_base(tmp_path):
    make("bart").save_pretrained(tmp_path)
    with pytest.raises(pp.ConfigError, match="saved for a BartForConditionalGeneration.*into a MarianMTModel"):
        pp.PolyModel.from_pretrained(build("marian"), tmp_path)


def test_damaged_or_missing_weights_name_the_file(tmp_path):
    make("bert").save_pretrained(tmp_path)
    weights = tmp_path / "polypeft_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(pp.ConfigError, match=rf"{weights}: not a readable safetensors file"):
        pp.PolyModel.from_pretrained(build("bert"), tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{weights} not found"):
        pp.PolyModel.from_pretrained(build("bert"), tmp_path)


def test_a_model_spent_by_merge_and_unload_refuses_forward_save_and_export(tmp_path):
    poly = make("bart")
    batch = random_batch("bart", 2)
    plain = poly.merge_and_unload(route="shared")
    for action in (lambda: poly(**batch, src_lang="de"), lambda: poly.save_pretrained(tmp_path)):
        with pytest.raises(pp.LanguageError, match="spent by merge_and_unload"):
            action()
    with pytest.raises(pp.ExportError, match="spent"):
        poly.export_lora(tmp_path, route="shared")
    assert not any(tmp_path.iterdir())
    output_of(plain, batch)  # the returned model still runs


@pytest.mark.parametrize("synthesis", ["pair", "language"])
def test_unmerge_stays_exact_when_factors_change_while_merged(synthesis):
    poly = make("llama", synthesis)
    originals = {n: layer.base_layer.weight.clone() for n, layer in poly.routed_layers.items()}
    poly.merge(src="de", tgt="fr")
    randomize_added(poly, seed=11)  # e.g. a training step or a load while the route is merged
    changed = {k: v.clone() for k, v in poly.added_state_dict().items()}
    poly.unmerge()
    for name, layer in poly.routed_layers.items():
        torch.testing.assert_close(layer.base_layer.weight, originals[name], rtol=0, atol=1e-12)
    for key, value in poly.added_state_dict().items():
        assert torch.equal(value, changed[key])  # the new factors are kept


# ---- PEFT's conveniences ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bart", "llama"])
def test_disable_adapter_gives_the_base_outputs_on_the_same_object(kind):
    poly = make(kind)
    batch = random_batch(kind, 2)
    routed = output_of(poly, batch, src_lang="de", tgt_lang="fr")
    base = output_of(build(kind), batch)
    with poly.disable_adapter():
        torch.testing.assert_close(output_of(poly, batch), base, rtol=0, atol=0)
        torch.testing.assert_close(output_of(poly, batch, src_lang="de", tgt_lang="fr"), base, rtol=0, atol=0)
    torch.testing.assert_close(output_of(poly, batch, src_lang="de", tgt_lang="fr"), routed, rtol=0, atol=0)
    poly.merge(route="shared")
    with pytest.raises(pp.LanguageError, match="unmerge"):
        with poly.disable_adapter():
            pass


def test_unload_gives_back_the_original_base_model():
    poly = make("bart")
    batch = random_batch("bart", 2)
    poly.merge(route="shared")
    plain = poly.unload()
    assert plain is poly.base_model and not any(hasattr(m, "lms_V") for m in plain.modules())
    torch.testing.assert_close(output_of(plain, batch), output_of(build("bart"), batch), rtol=0, atol=1e-12)
    with pytest.raises(pp.LanguageError, match="spent"):
        poly(**batch, src_lang="de")


def test_trainable_parameter_counts_and_base_model(capsys):
    poly = pp.wrap(build("llama"), pp.LMSConfig(languages=LANGS, rank=4, freeze_base=True))
    added = sum(p.numel() for p in poly.added_state_dict().values())
    total = sum(p.numel() for p in build("llama").parameters()) + added
    assert poly.get_nb_trainable_parameters() == (added, total)
    poly.print_trainable_parameters()
    assert f"trainable params: {added:,d} || all params: {total:,d}" in capsys.readouterr().out
    assert poly.get_base_model() is poly.base_model


@pytest.mark.parametrize("call", ["set_adapter", "load_adapter", "add_adapter"])
def test_adapter_calls_polypeft_does_not_support_never_reach_the_base_model(call, monkeypatch):
    poly = make("llama")
    reached = []
    monkeypatch.setattr(type(poly.base_model), call, lambda self, *a, **k: reached.append(call), raising=False)
    with pytest.raises(pp.UnsupportedCallError, match=rf"PolyModel.{call}\(\) is not supported: .*(src_lang|from_pretrained|config)"):
        getattr(poly, call)("de")
    assert reached == []

"""PEFT-format export per route, serving a mixed batch through peft, Hub ids and the model card."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import polypeft as pp
from polypeft.methods.clsr import CLSRConfig
from polypeft.methods.lora import LoRAConfig
from polypeft.methods.ls_ffn import LSFFNConfig
from polypeft.methods.switch import SwitchConfig
from hub_cache import lay_out_hub_cache
from tiny_models import build, output_of, random_batch, randomize_added

peft = pytest.importorskip("peft")

LANGS = ["en", "de", "fr"]


def make(kind: str, synthesis: str = "language", shared_route: bool = True, seed: int = 0) -> pp.PolyModel:
    poly = pp.wrap(build(kind, seed), pp.LMSConfig(languages=LANGS, rank=4, synthesis=synthesis,
                                                   shared_route=shared_route))
    randomize_added(poly)
    return poly.eval()


def peft_output(folder, kind: str, batch) -> torch.Tensor:
    return output_of(peft.PeftModel.from_pretrained(build(kind), str(folder)).eval(), batch)


# ---- one route -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "bart"])
@pytest.mark.parametrize("synthesis", ["language", "pair"])
@pytest.mark.parametrize("route", [dict(src_lang="de", tgt_lang="fr"), dict(lang="fr"), dict(route="shared")])
def test_an_exported_route_gives_the_routed_outputs_in_peft(kind, synthesis, route, tmp_path):
    poly = make(kind, synthesis)
    batch = random_batch(kind, 2)
    expected = output_of(poly, batch, **({"lang": route["route"]} if "route" in route else route))
    assert (expected - output_of(build(kind), batch)).abs().max() > 1e-2  # the route changes the outputs
    poly.export_lora(tmp_path, **route)
    torch.testing.assert_close(peft_output(tmp_path, kind, batch), expected, rtol=0, atol=1e-4)


def test_the_adapter_files_use_peft_names_and_lms_factors(tmp_path):
    poly = make("bart", "pair")
    poly.export_lora(tmp_path, src_lang="de", tgt_lang="fr")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "SEQ_2_SEQ_LM", 4, 4)
    assert config["target_modules"] == ["fc1", "fc2"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    layer = poly.routed_layers["model.decoder.layers.1.fc2"]
    de, fr = LANGS.index("de"), LANGS.index("fr")
    assert torch.equal(tensors["base_model.model.model.decoder.layers.1.fc2.lora_A.weight"], layer.lms_F[fr])
    assert torch.equal(tensors["base_model.model.model.decoder.layers.1.fc2.lora_B.weight"], layer.lms_V[de])
    assert len(tensors) == 2 * len(poly.routed_layers)
    llama = make("llama")
    llama.export_lora(tmp_path / "llama", lang="de")
    config = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["target_modules"] == ["down_proj", "gate_proj", "up_proj"]


def test_export_needs_exactly_one_route(tmp_path):
    poly = make("llama")
    with pytest.raises(pp.LanguageError, match="known codes are"):
        poly.export_lora(tmp_path)
    with pytest.raises(pp.LanguageError, match="not lang and src_lang/tgt_lang"):
        poly.export_lora(tmp_path, lang="de", src_lang="fr")
    with pytest.raises(pp.LanguageError, match="unknown language code 'xx'"):
        poly.export_lora(tmp_path, lang="xx")


@pytest.mark.parametrize("config", [
    LSFFNConfig(languages=LANGS), SwitchConfig(languages=LANGS, num_experts=3), CLSRConfig(languages=LANGS, gate_hidden_size=8),
], ids=lambda c: c.method)
def test_methods_that_are_not_low_rank_refuse_to_export(config, tmp_path):
    poly = pp.wrap(build("bart"), config)
    with pytest.raises(pp.ExportError, match=rf"method '{config.method}' cannot be exported.*full"):
        poly.export_lora(tmp_path, lang="de")
    with pytest.raises(pp.ExportError, match="merge_and_unload"):
        poly.export_lora_routes(tmp_path)
    assert not any(tmp_path.iterdir())


# ---- every route, served together -------------------------------------------------------------------
def test_every_language_route_serves_a_mixed_batch_through_peft_adapter_names(tmp_path):
    poly = make("llama", "language")
    index = json.loads(poly.export_lora_routes(tmp_path).read_text())
    names = [entry["name"] for entry in index["routes"]]
    assert names == ["en", "de", "fr", "shared"]
    command = index["commands"]["vllm"]
    assert "--enable-lora --lora-modules" in command and "--max-lora-rank 8 --max-loras 4" in command
    assert all(f"{name}={tmp_path.resolve() / name}" in command for name in names)
    assert "--model-id" in index["commands"]["lorax"] and "adapter_source" in index["commands"]["lorax_request"]
    model = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(tmp_path / name), adapter_name=name)
    langs = ["de", "fr", "shared", "en", "de"]
    batch = random_batch("llama", len(langs))
    expected = output_of(poly, batch, lang=langs)
    served = model.eval()(**batch, adapter_names=langs).logits
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-4)


def test_pair_wise_routes_are_every_pair_or_the_pairs_asked(tmp_path):
    poly = make("bart", "pair")
    index = json.loads(poly.export_lora_routes(tmp_path / "all").read_text())
    assert len(index["routes"]) == len(LANGS) ** 2 + 1 and index["routes"][1]["name"] == "en-de"
    index = json.loads(poly.export_lora_routes(tmp_path / "some", pairs=[("de", "en"), ("fr", "en")]).read_text())
    assert [e["name"] for e in index["routes"]] == ["de-en", "fr-en", "shared"]
    assert sorted(p.name for p in (tmp_path / "some").iterdir()) == ["de-en", "fr-en", "routes.json", "shared"]
    batch = random_batch("bart", 2)
    expected = output_of(poly, batch, src_lang="fr", tgt_lang="en")
    torch.testing.assert_close(peft_output(tmp_path / "some" / "fr-en", "bart", batch), expected, rtol=0, atol=1e-4)


# ---- the LoRA baseline is saved as PEFT's own adapter ------------------------------------------------
def test_the_lora_baseline_saves_in_peft_format(tmp_path):
    poly = pp.wrap(build("llama"), LoRAConfig(languages=LANGS, rank=4, alpha=8.0))
    randomize_added(poly)
    batch = random_batch("llama", 2)
    expected = output_of(poly, batch)
    poly.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                     "polypeft_config.json", "README.md"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 8.0
    torch.testing.assert_close(peft_output(tmp_path, "llama", batch), expected, rtol=0, atol=1e-4)
    restored = pp.PolyModel.from_pretrained(build("llama"), tmp_path)
    torch.testing.assert_close(output_of(restored, batch), expected, rtol=0, atol=0)


# ---- Hub ids ------------------------------------------------------------------------------------------
def test_from_pretrained_and_load_config_take_a_hub_id_and_revision(tmp_path, offline_hub):
    first, second = make("llama", seed=0), make("llama", seed=0)
    randomize_added(second, seed=9)
    first.save_pretrained(tmp_path / "v0")
    second.save_pretrained(tmp_path / "v1")
    lay_out_hub_cache(offline_hub, "org/name", {"main": ("a" * 40, tmp_path / "v0"), "v1": ("b" * 40, tmp_path / "v1")})
    batch = random_batch("llama", 2)
    for revision, model in ((None, first), ("v1", second)):
        loaded = pp.PolyModel.from_pretrained(build("llama"), "org/name", revision=revision)
        torch.testing.assert_close(output_of(loaded, batch, lang="de"), output_of(model, batch, lang="de"), rtol=0, atol=0)
    assert pp.load_config("org/name") == first.poly_config
    assert pp.load_config(tmp_path / "v1" / "polypeft_config.json") == first.poly_config
    with pytest.raises(FileNotFoundError, match="no polypeft save at 'org/missing'"):
        pp.load_config("org/missing")


def test_push_to_hub_uploads_only_the_adapter_files_and_the_card(monkeypatch):
    from huggingface_hub import HfApi

    uploads = []

    def upload_folder(self, repo_id, folder_path, allow_patterns, **options):
        from pathlib import Path

        files = {p.name: p.stat().st_size for p in Path(folder_path).iterdir()}
        uploads.append(dict(repo_id=repo_id, files=files, allow_patterns=allow_patterns,
                            card=(Path(folder_path) / "README.md").read_text(), **options))
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **options: repo_id)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    poly = make("bart")
    assert poly.push_to_hub("org/name", results={"bleu": 12.5}) == "commit"
    upload = uploads[0]
    assert upload["repo_id"] == "org/name"
    assert set(upload["files"]) == set(upload["allow_patterns"]) == {"polypeft_config.json", "polypeft_model.safetensors",
                                                                     "README.md"}
    base_bytes = sum(p.numel() * p.element_size() for p in build("bart").parameters())
    assert upload["files"]["polypeft_model.safetensors"] < base_bytes / 2
    assert "| bleu | 12.5 |" in upload["card"]


# ---- model card -----------------------------------------------------------------------------------------
def test_the_save_folder_has_a_model_card(tmp_path):
    poly = make("bart", "pair")
    poly.save_pretrained(tmp_path, results={"chrf": 41.2, "per_direction": {"de-en": 40.0}})
    card = (tmp_path / "README.md").read_text()
    counts = poly.parameter_counts()
    for text in ("library_name: polypeft", "- lms", "method: `lms`", "BartForConditionalGeneration",
                 "languages: en, de, fr", "['en', 'de', 'fr', 'shared']", "Pair-wise",
                 f"| language_specific | {counts.language_specific:,} |", "| chrf | 41.2 |", '"de-en": 40.0'):
        assert text in card, text


@pytest.mark.parametrize("code", ["..", "."])
def test_a_language_code_cannot_name_a_folder_outside_the_export(code, tmp_path):
    poly = pp.wrap(build("llama"), pp.LMSConfig(languages=["en", code], rank=4, synthesis="language"))
    with pytest.raises(pp.ExportError, match="not a safe folder name"):
        poly.export_lora_routes(tmp_path / "routes")
    assert not (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "routes").exists()

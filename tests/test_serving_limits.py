"""What vLLM and LoRAX will serve of an export is said when it is written: ranks, encoder-decoder and encoder
models, modules_to_save (a trained head goes beside the adapters), DoRA, and the layers LoRAX ignores."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import polypeft as pp
from polypeft.model.serving import lorax_report, vllm_report
from tiny_models import build, randomize_added

peft = pytest.importorskip("peft")

LANGS = ["en", "de", "fr"]


def routes(kind: str = "llama", **config) -> pp.PolyModel:
    poly = pp.wrap(build(kind), pp.LMSConfig(languages=LANGS, rank=4, synthesis="language", **config))
    randomize_added(poly)
    return poly.eval()


def exported(poly, folder, **options) -> tuple[dict, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = json.loads(poly.export_lora_routes(folder, **options).read_text())
    return index, [w for w in caught if issubclass(w.category, pp.ServingWarning)]


def test_a_llama_export_is_served_by_both_and_says_the_vllm_rank(tmp_path):
    index, said = exported(routes(), tmp_path / "routes")
    assert not said
    vllm, lorax = index["servers"]["vllm"], index["servers"]["lorax"]
    assert vllm["serves"] and lorax["serves"] and not lorax["ignored_layers"]
    assert vllm["notes"] == ["rank 4 is served with --max-lora-rank 8 (vLLM allows [1, 8, 16, 32, 64, 128, 256, 320, 512])"]
    assert "--max-lora-rank 8" in index["commands"]["vllm"]


@pytest.mark.parametrize("kind, why", [("bart", "bart is an encoder-decoder model"),
                                       ("bert", r"bert \(BertModel\) is an encoder")])
def test_models_vllm_does_not_serve_are_named_at_export(kind, why, tmp_path):
    index, said = exported(routes(kind), tmp_path / "routes")
    assert not index["servers"]["vllm"]["serves"] and not index["servers"]["lorax"]["serves"]
    assert len(said) == 1
    import re

    assert re.search(rf"vllm: will not serve these adapters: {why}", str(said[0].message))
    assert "lorax: will not serve these adapters: LoRAX lists no LoRA target modules" in str(said[0].message)
    with pytest.raises(pp.ExportError, match=rf"vllm will not serve these routes: {why}"):
        routes(kind).export_lora_routes(tmp_path / "for-vllm", server="vllm")
    assert not (tmp_path / "for-vllm").exists()


def test_vllm_s_rank_and_dora_limits():
    llama = build("llama")
    assert vllm_report(llama, {"r": 512})["serves"]
    too_wide = vllm_report(llama, {"r": 600})
    assert not too_wide["serves"] and "rank 600 is above vLLM's largest --max-lora-rank 512" in too_wide["refused"]
    assert vllm_report(llama, {"r": 8, "use_dora": True})["refused"] == ["the adapters are DoRA, which vLLM does not serve"]
    assert vllm_report(llama, {"r": 8})["notes"] == []
    assert "is no transformers model" in vllm_report(torch.nn.Sequential(torch.nn.Linear(2, 2)), {"r": 8})["refused"][0]


def test_lorax_ignores_layers_outside_its_list():
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.experts.0.w1"]
    report = lorax_report(build("llama"), {"r": 8}, names)
    assert report["serves"] and report["ignored_layers"] == ["model.layers.0.mlp.experts.0.w1"]
    assert "LoRAX ignores 1 of the 2 routed layers" in report["notes"][0]
    assert not lorax_report(build("llama"), {"r": 8}, names[1:])["serves"]


def classifier(seed: int = 0):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, vocab_size=64, num_labels=3, pad_token_id=1)
    return tf.LlamaForSequenceClassification(config).float().eval()


def test_a_trained_head_is_written_beside_the_adapters_and_serves_from_the_base(tmp_path):
    poly = pp.wrap(classifier(), pp.LMSConfig(languages=LANGS, rank=4, synthesis="language", modules_to_save=["score"]))
    randomize_added(poly)
    poly.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    expected = poly(input_ids=ids, lang="de").logits
    index, said = exported(poly, tmp_path / "peft")
    assert "vllm: will not serve these adapters: the adapters carry modules_to_save ['score']" in str(said[0].message)
    assert "LoRAX does not load modules_to_save" in str(said[0].message)
    head = load_file(str(tmp_path / "peft" / "modules_to_save.safetensors"))
    assert set(head) == {"score.weight"} and torch.equal(head["score.weight"], poly.base_model.score.weight)
    assert index["modules_to_save"]["modules"] == ["score"] and "load this file into the base" in index["modules_to_save"]["note"]
    assert json.loads((tmp_path / "peft" / "de" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]

    index, said = exported(poly, tmp_path / "vllm", server="vllm")
    assert index["servers"]["vllm"]["serves"] and not said
    config = json.loads((tmp_path / "vllm" / "de" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    assert not any("score" in key for key in load_file(str(tmp_path / "vllm" / "de" / "adapter_model.safetensors")))
    # the note's recipe: the head into the base, then the head-less adapter, gives polypeft's outputs
    adapter = peft.LoraConfig.from_pretrained(str(tmp_path / "vllm" / "de"))
    adapter.task_type = None  # peft would add its own classifier copy for SEQ_CLS; a server reads the LoRA alone

    def served(with_head: bool) -> torch.Tensor:
        base = classifier()  # the base as it was before training: its own head
        if with_head:
            base.load_state_dict(load_file(str(tmp_path / "vllm" / "modules_to_save.safetensors")), strict=False)
        return peft.PeftModel.from_pretrained(base, str(tmp_path / "vllm" / "de"), config=adapter).eval()(
            input_ids=ids).logits

    torch.testing.assert_close(served(with_head=True), expected, rtol=0, atol=1e-5)
    assert (served(with_head=False) - expected).abs().max() > 1e-2  # without the file the head would be lost


def test_an_unknown_server_is_refused_by_name(tmp_path):
    with pytest.raises(pp.ExportError, match=r"server='tgi' is not known; choose None \(PEFT adapters\) or one of \['vllm', 'lorax'\]"):
        routes().export_lora_routes(tmp_path, server="tgi")

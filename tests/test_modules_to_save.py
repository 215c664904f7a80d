"""A frozen base by default, task heads trained and saved through `modules_to_save` (polypeft's files and PEFT's),
added weights in float32 or the base dtype, and tied weights a plain transformers.Trainer can save and reload."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file
from transformers import Seq2SeqTrainingArguments, Trainer

import polypeft as pp
from polypeft.tasks.hf_trainer import DataCollatorWithRoutes
from test_hf_trainer import LANGS, seq2seq_dataset
from tiny_models import VOCAB, build

torch.set_num_threads(1)


def classifier(head_seed: int = 0) -> tf.BertForSequenceClassification:
    """The same pretrained body each time; a head drawn with `head_seed`, as loading it for a new task does."""
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=1)
    model = tf.BertForSequenceClassification(config).eval()
    torch.manual_seed(head_seed)
    model.classifier.reset_parameters()
    return model


def train_a_little(poly, steps: int = 4) -> None:
    optimizer = torch.optim.Adam([p for p in poly.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.randint(3, VOCAB, (6, 7), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = poly(input_ids=ids, labels=torch.tensor([0, 1, 2, 0, 1, 2]), lang=["de", "fr", "en"] * 2).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def logits(poly, seed: int = 5) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return poly(input_ids=ids, lang=["de", "fr", "en"]).logits


def test_a_frozen_task_head_is_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"task head 'classifier' is frozen .* modules_to_save=\['classifier'\]"):
        pp.wrap(classifier(), pp.LMSConfig(languages=LANGS, rank=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.wrap(classifier(), pp.LMSConfig(languages=LANGS, rank=4, modules_to_save=["classifier"]))


def test_modules_to_save_train_and_reload_with_the_routes(tmp_path):
    poly = pp.wrap(classifier(), pp.LMSConfig(languages=LANGS, rank=4, modules_to_save=["classifier"]))
    trainable = {name for name, p in poly.named_parameters() if p.requires_grad}
    assert {"base_model.classifier.weight", "base_model.classifier.bias"} <= trainable
    assert all("lms_" in name or ".classifier." in name for name in trainable), sorted(trainable)
    head_before = poly.base_model.classifier.weight.detach().clone()
    train_a_little(poly)
    assert not torch.equal(head_before, poly.base_model.classifier.weight), "the head did not train"
    poly.save_pretrained(tmp_path / "save")
    reloaded = pp.PolyModel.from_pretrained(classifier(head_seed=1), tmp_path / "save")  # another random head
    torch.testing.assert_close(logits(reloaded), logits(poly))


def test_lora_with_a_head_saves_peft_files_that_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    poly = pp.wrap(classifier(), pp.LoRAConfig(languages=LANGS, rank=4, modules_to_save=["classifier"]))
    train_a_little(poly)
    poly.save_pretrained(tmp_path / "lora")
    adapter = tmp_path / "lora"
    assert (adapter / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(classifier(head_seed=1), str(adapter)).eval()
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, logits(poly))
    ours = pp.PolyModel.from_pretrained(classifier(head_seed=1), adapter)
    torch.testing.assert_close(logits(ours), logits(poly))


def test_modules_to_save_names_are_checked():
    with pytest.raises(pp.ConfigError, match=r"no module .* is named 'head'.*'classifier'"):
        pp.wrap(classifier(), pp.LMSConfig(languages=LANGS, rank=4, modules_to_save=["head"]))
    with pytest.raises(pp.ConfigError, match=r"'bert.encoder' holds or sits in routed layers"):
        pp.wrap(classifier(), pp.LMSConfig(languages=LANGS, rank=4, modules_to_save=["encoder"]))
    with pytest.raises(pp.ConfigError, match=r"'bert.encoder.layer.0.output.dense.base_layer' holds or sits in routed layers"):
        pp.wrap(classifier(), pp.LMSConfig(languages=LANGS, rank=4, modules_to_save=["layer.0.output.dense.base_layer"]))


def test_a_polypeft_save_refuses_another_config(tmp_path):
    poly = pp.wrap(classifier(), pp.LMSConfig(languages=LANGS, rank=4, modules_to_save=["classifier"]))
    poly.save_pretrained(tmp_path / "save")
    with pytest.raises(pp.ConfigError, match="config= differs from the one saved"):
        pp.PolyModel.from_pretrained(classifier(), tmp_path / "save", config=pp.LMSConfig(languages=LANGS, rank=8))


@pytest.mark.parametrize("keep", [False, True])
def test_added_weights_are_float32_on_a_bf16_base_unless_asked_to_keep_its_dtype(keep):
    poly = pp.wrap(build("llama").to(torch.bfloat16), pp.LMSConfig(languages=LANGS, rank=4, keep_base_dtype=keep))
    dtypes = {p.dtype for p in poly.route_parameters()}
    assert dtypes == {torch.bfloat16 if keep else torch.float32}
    out = poly(input_ids=torch.tensor([[5, 6, 7]]), lang="de").logits
    assert out.dtype == torch.bfloat16


def test_tied_weights_appear_once_in_the_state_dict_and_load_back_strictly(tmp_path):
    poly = pp.wrap(build("bart").float(), pp.LMSConfig(languages=LANGS, rank=4))
    state = poly.state_dict()
    tied = [name for name in ("base_model.model.encoder.embed_tokens.weight", "base_model.lm_head.weight",
                              "base_model.model.decoder.embed_tokens.weight") if name in state]
    assert "base_model.model.shared.weight" in state and tied == [], tied
    save_file(state, str(tmp_path / "state.safetensors"))  # safetensors refuses shared tensors
    fresh = pp.wrap(build("bart", seed=4).float(), pp.LMSConfig(languages=LANGS, rank=4))
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.base_model.lm_head.weight, state["base_model.model.shared.weight"])
    assert fresh.base_model.lm_head.weight is fresh.base_model.model.shared.weight


@pytest.mark.slow
def test_a_plain_trainer_saves_a_tied_model_and_its_checkpoint_loads_with_the_config(tmp_path):
    config = pp.LMSConfig(languages=LANGS, rank=4, synthesis="language")
    poly = pp.wrap(build("bart").float(), config)
    arguments = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                                         learning_rate=5e-2, save_steps=4, report_to=[], use_cpu=True)
    trainer = Trainer(model=poly, args=arguments, train_dataset=seq2seq_dataset(),
                      data_collator=DataCollatorWithRoutes(poly))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file()
    with pytest.raises(pp.ConfigError, match="pass config="):
        pp.PolyModel.from_pretrained(build("bart", seed=4).float(), checkpoint)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "decoder_input_ids": torch.tensor([[2, 9, 10]])}
    resumed = pp.wrap(build("bart", seed=4).float(), config)
    arguments.max_steps = 6
    again = Trainer(model=resumed, args=arguments, train_dataset=seq2seq_dataset(),
                    data_collator=DataCollatorWithRoutes(resumed))
    assert again.train(resume_from_checkpoint=str(checkpoint)).global_step == 6
    assert torch.equal(resumed.base_model.lm_head.weight, resumed.base_model.model.shared.weight)
    poly.eval()
    for folder in (checkpoint, tmp_path / "final"):
        reloaded = pp.PolyModel.from_pretrained(build("bart", seed=4).float(), folder, config=config).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch, src_lang="de", tgt_lang="fr").logits,
                                       poly(**batch, src_lang="de", tgt_lang="fr").logits)


def test_an_exported_route_carries_the_trained_head_for_peft(tmp_path):
    peft = pytest.importorskip("peft")
    poly = pp.wrap(classifier(), pp.LMSConfig(languages=LANGS, rank=4, synthesis="language",
                                              modules_to_save=["classifier"]))
    train_a_little(poly)
    poly.export_lora(tmp_path / "de", lang="de")
    served = peft.PeftModel.from_pretrained(classifier(head_seed=1), str(tmp_path / "de")).eval()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, poly(input_ids=ids, lang="de").logits)

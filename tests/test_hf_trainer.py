"""Training a PolyModel with transformers' Trainer and Seq2SeqTrainer, default TrainingArguments:
columns kept, routes collated, eval loss reported, adapter-only checkpoints that reload and resume."""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import Seq2SeqTrainingArguments, Trainer, TrainingArguments

import polypeft as pp
from polypeft.tasks.hf_trainer import DataCollatorWithRoutes, PolySeq2SeqTrainer, PolyTrainer
from tiny_models import VOCAB, build

LANGS = ["en", "de", "fr"]


def causal_dataset(rows: int = 16, length: int = 8, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    # Each row repeats one token: learnable in a few steps, so the loss must fall.
    ids = torch.randint(3, VOCAB, (rows, 1), generator=generator).repeat(1, length)
    langs = [LANGS[i % 3] for i in range(rows)]
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * rows,
                              "labels": ids.tolist(), "lang": langs, "unused_note": ["x"] * rows})


def seq2seq_dataset(rows: int = 16, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(3, VOCAB, (rows, 7), generator=generator)
    target = torch.randint(3, VOCAB, (rows, 5), generator=generator)
    return Dataset.from_dict({"input_ids": source.tolist(), "attention_mask": [[1] * 7] * rows,
                              "labels": target.tolist(), "src_lang": [LANGS[i % 3] for i in range(rows)],
                              "tgt_lang": [LANGS[(i + 1) % 3] for i in range(rows)]})


def routed(kind: str):
    poly = pp.wrap(build(kind).float(), pp.LMSConfig(languages=LANGS, rank=4, synthesis="language", freeze_base=True))
    for module in poly.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return poly


def arguments(tmp_path, cls=TrainingArguments, **extra):
    return cls(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-2,
               save_steps=3, report_to=[], use_cpu=True, logging_steps=1, **extra)


def test_collator_turns_language_columns_into_route_ids():
    poly = routed("llama")
    collate = DataCollatorWithRoutes(poly)
    batch = collate([{"input_ids": [5, 6], "lang": "de"}, {"input_ids": [7, 8], "lang": "fr"}])
    assert batch["input_ids"].tolist() == [[5, 6], [7, 8]]
    assert batch["src_lang"].tolist() == [LANGS.index("de"), LANGS.index("fr")]
    assert batch["tgt_lang"].tolist() == batch["src_lang"].tolist()
    with pytest.raises(pp.LanguageError, match="xx"):
        collate([{"input_ids": [5, 6], "lang": "xx"}])


def test_plain_trainer_with_default_arguments_trains_and_evaluates(tmp_path):
    poly = routed("llama")
    data = causal_dataset()
    before = {n: p.detach().clone() for n, p in poly.added_state_dict().items()}
    trainer = Trainer(model=poly, args=arguments(tmp_path, save_strategy="no"), train_dataset=data,
                      eval_dataset=causal_dataset(8, seed=1), data_collator=DataCollatorWithRoutes(poly))
    history = trainer.train()
    assert history.global_step == 6
    assert any(not torch.equal(before[n], p) for n, p in poly.added_state_dict().items()), "factors did not train"
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("fd", [False, True])
def test_poly_trainer_checkpoints_reload_and_resume(tmp_path, fd):
    poly = pp.wrap(build("llama").float(), pp.LMSConfig(languages=LANGS, rank=4, shared_route=fd, freeze_base=True))
    data = causal_dataset()
    trainer = PolyTrainer(model=poly, args=arguments(tmp_path), train_dataset=data, eval_dataset=data,
                          data_collator=DataCollatorWithRoutes(poly), fd=fd)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before, f"the training data's loss did not go down: {before} -> {after}"
    checkpoint = tmp_path / "out" / "checkpoint-6"
    reloaded = pp.PolyModel.from_pretrained(build("llama").float(), checkpoint).eval()
    batch = {"input_ids": torch.tensor(data["input_ids"][:2])}
    torch.testing.assert_close(reloaded(**batch, lang=["de", "fr"]).logits, poly.eval()(**batch, lang=["de", "fr"]).logits)
    # Resume from step 3 to step 6: the same factors as the uninterrupted run.
    fresh = pp.wrap(build("llama").float(), pp.LMSConfig(languages=LANGS, rank=4, shared_route=fd, freeze_base=True))
    resumed = PolyTrainer(model=fresh, args=arguments(tmp_path / "again"), train_dataset=data,
                          data_collator=DataCollatorWithRoutes(fresh), fd=fd)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    for name, parameter in fresh.added_state_dict().items():
        torch.testing.assert_close(parameter, poly.added_state_dict()[name], msg=name)


def test_seq2seq_trainer_saves_tied_embeddings_and_generates_on_routes(tmp_path):
    poly = routed("bart")
    assert poly.base_model.model.shared.weight is poly.base_model.lm_head.weight, "tiny BART should tie embeddings"
    args = arguments(tmp_path, Seq2SeqTrainingArguments, predict_with_generate=True,
                     generation_max_length=6, generation_num_beams=2)
    trainer = PolySeq2SeqTrainer(model=poly, args=args, train_dataset=seq2seq_dataset(),
                                 eval_dataset=seq2seq_dataset(4, seed=2), data_collator=DataCollatorWithRoutes(poly))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "polypeft_model.safetensors").is_file()
    prediction = trainer.predict(seq2seq_dataset(4, seed=2))
    data = seq2seq_dataset(4, seed=2)
    for i in range(4):
        alone = poly.generate(input_ids=torch.tensor(data["input_ids"][i : i + 1]), src_lang=data["src_lang"][i],
                              tgt_lang=data["tgt_lang"][i], max_length=6, num_beams=2)[0].tolist()
        predicted = [t for t in prediction.predictions[i].tolist() if t != -100]
        assert predicted[: len(alone)] == alone[: len(predicted)], f"example {i} was not generated on its routes"

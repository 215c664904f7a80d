"""transformers' Trainer and polypeft's loop on one recipe train the same model: same weights, batches (mixed
routes, padded), AdamW, schedule and clipping give the same loss curve; a change on either side shows."""
from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from datasets import Dataset
from transformers.models.marian.modeling_marian import shift_tokens_right
from transformers.optimization import get_scheduler

import polypeft as pp
from polypeft.backbones.seq2seq import build_translation_model
from polypeft.data.batching import LABEL_PAD_ID
from polypeft.tasks.hf_trainer import DataCollatorWithRoutes, PolyTrainer, trainer_arguments
from polypeft.training.loop import TrainSettings, train
from polypeft.training.schedules import SCHEDULES, schedule

LANGS = ["en", "de", "fr"]
VOCAB, PAD, EOS, START = 40, 1, 2, 0
SETTINGS = TrainSettings(steps=6, lr=2e-2, warmup=2, schedule="linear", betas=(0.9, 0.98), weight_decay=0.0,
                         accumulation=1, clip_norm=0.5, seed=0, progress=False)


def rows(count: int = 24) -> Dataset:
    """Rows of varied lengths (so padding, label masking and token counts matter) and mixed routes."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (count, 2), generator=generator).tolist()
    return Dataset.from_dict({
        "input_ids": [torch.randint(3, VOCAB, (s,), generator=generator).tolist() for s, _ in lengths],
        "labels": [torch.randint(3, VOCAB, (t,), generator=generator).tolist() for _, t in lengths],
        "src_lang": [LANGS[i % 3] for i in range(count)], "tgt_lang": [LANGS[(i + 1 + i // 3) % 3] for i in range(count)]})


def pad_and_shift(features: list[dict]) -> dict:
    """Padded inputs and labels plus the decoder inputs (the Trainer's label smoother takes the labels away)."""
    def pad(sequences, value):
        width = max(len(s) for s in sequences)
        return torch.tensor([list(s) + [value] * (width - len(s)) for s in sequences])

    input_ids, labels = pad([f["input_ids"] for f in features], PAD), pad([f["labels"] for f in features], LABEL_PAD_ID)
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long(), "labels": labels,
            "decoder_input_ids": shift_tokens_right(labels, PAD, START)}


def initial_model() -> pp.PolyModel:
    torch.manual_seed(0)
    base = build_translation_model("tiny", VOCAB, PAD, EOS, START, dropout=0.0).double()
    return pp.wrap(base, pp.LMSConfig(languages=LANGS, rank=4, synthesis="pair"))


def loop_losses(model: pp.PolyModel, settings: TrainSettings, smoothing: float, batch_size: int = 4) -> list[float]:
    data, collate = rows(), DataCollatorWithRoutes(model, pad_and_shift)

    def batches():  # epoch after epoch in row order, as the Trainer's sequential sampler gives them
        for _ in itertools.count():
            for start in range(0, len(data), batch_size):
                yield collate([data[i] for i in range(start, min(start + batch_size, len(data)))])

    def loss_fn(model, batch):
        batch = dict(batch)
        labels = batch.pop("labels")
        return pp.token_cross_entropy(model(**batch).logits, labels, smoothing), int((labels != -100).sum())

    return [record["loss"] for record in train(model, batches, loss_fn, settings)["history"]]


class RecordingTrainer(PolyTrainer):
    """Keeps each micro-batch's unrounded loss; a step's loss is their sum, as the Trainer logs it."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.__dict__.setdefault("micro", []).append(float(loss))
        return loss


def trainer_losses(model: pp.PolyModel, settings: TrainSettings, smoothing: float, tmp_path,
                   loop_schedule: bool = True, batch_size: int = 4, **changes) -> list[float]:
    """Without smoothing the loss is the model's own; with it, transformers' LabelSmoother's."""
    arguments = trainer_arguments(settings, str(tmp_path / "hf"), per_device_train_batch_size=batch_size,
                                  label_smoothing_factor=smoothing, use_cpu=True, **changes)
    trainer = RecordingTrainer(model=model, args=arguments, train_dataset=rows(),
                               data_collator=DataCollatorWithRoutes(model, pad_and_shift),
                               loop_schedule=settings if loop_schedule else None)
    trainer.train()
    k = settings.accumulation
    return [sum(trainer.micro[i:i + k]) for i in range(0, len(trainer.micro), k)]


def max_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == SETTINGS.steps, (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


# transformers' LabelSmoother sums the log-probabilities in float32, so with smoothing the float64 curves agree
# to float32 rounding only; the model's own loss agrees to float64 rounding.
@pytest.mark.slow
@pytest.mark.parametrize("accumulation, smoothing, tolerance", [(1, 0.0, 1e-10), (2, 0.0, 1e-10), (2, 0.1, 1e-6)])
def test_trainer_and_loop_give_the_same_curve_and_weights(tmp_path, accumulation, smoothing, tolerance):
    settings = dataclasses.replace(SETTINGS, accumulation=accumulation)
    start = initial_model()
    by_loop, by_trainer = copy.deepcopy(start), copy.deepcopy(start)
    loop = loop_losses(by_loop, settings, smoothing)
    hf = trainer_losses(by_trainer, settings, smoothing, tmp_path)
    with torch.no_grad():
        moved = max(float((a - b).abs().max()) for a, b in zip(by_loop.parameters(), start.parameters()))
    assert moved > 1e-3, "the recipe did not train: a no-op on both sides would compare equal"
    assert max_gap(loop, hf) < tolerance, f"loop {loop}\nTrainer {hf}"
    for name, tensor in by_loop.state_dict().items():
        torch.testing.assert_close(by_trainer.state_dict()[name], tensor, rtol=0, atol=100 * tolerance, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("change", ["hf_schedule", "other_batches", "other_betas", "plain_marian_accumulation"])
def test_a_change_on_one_side_shows_in_the_curve(tmp_path, change):
    """The tolerance above is tight enough to see each way the two sides could drift apart."""
    settings = dataclasses.replace(SETTINGS, accumulation=2 if change == "plain_marian_accumulation" else 1)
    start = initial_model()
    loop = loop_losses(copy.deepcopy(start), settings, smoothing=0.0)
    trainer_model = copy.deepcopy(start)
    options: dict = {}
    if change == "hf_schedule":  # transformers' warm-up starts at lr 0, the loop's at lr / warmup
        options["loop_schedule"] = False
    elif change == "other_batches":
        options["batch_size"] = 3
    elif change == "other_betas":
        options["adam_beta2"] = 0.999
    else:  # as transformers builds Marian: the Trainer assumes the loss took a token count, sums micro-batch means
        del trainer_model.base_model.accepts_loss_kwargs
    hf = trainer_losses(trainer_model, settings, 0.0, tmp_path, **options)
    assert max_gap(loop, hf) > 1e-4, f"{change} did not change the curve: loop {loop}\nTrainer {hf}"


def test_trainer_arguments_carry_the_loop_settings(tmp_path):
    settings = dataclasses.replace(SETTINGS, weight_decay=0.05, accumulation=3, mixed_precision="no", clip_norm=0.0)
    arguments = trainer_arguments(settings, str(tmp_path))
    assert (arguments.max_steps, arguments.learning_rate, arguments.gradient_accumulation_steps) == (6, 2e-2, 3)
    assert (arguments.adam_beta1, arguments.adam_beta2, arguments.adam_epsilon) == (0.9, 0.98, 1e-8)
    assert (arguments.weight_decay, arguments.max_grad_norm, arguments.seed) == (0.05, 0.0, 0)
    assert str(arguments.optim) in ("adamw_torch", "OptimizerNames.ADAMW_TORCH")
    with pytest.raises(TypeError, match="not_a_field"):
        trainer_arguments(settings, str(tmp_path), not_a_field=1)
    with pytest.raises(TypeError, match="TrainSettings"):
        trainer_arguments({"lr": 1e-3}, str(tmp_path))


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_loop_schedule_has_a_trainer_schedule_with_the_same_decay(name, tmp_path):
    """A Trainer given the loop's settings alone (no loop_schedule) decays as the loop does once warm-up ends
    (transformers' warm-up starts at 0; its inverse_sqrt counts one step later than fairseq's)."""
    arguments = trainer_arguments(dataclasses.replace(SETTINGS, steps=20, warmup=4, schedule=name), str(tmp_path))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    trainer_schedule = get_scheduler(arguments.lr_scheduler_type, optimizer, num_warmup_steps=arguments.warmup_steps,
                                     num_training_steps=arguments.max_steps,
                                     scheduler_specific_kwargs=arguments.lr_scheduler_kwargs)
    trainer_rates = []
    for _ in range(20):
        trainer_rates.append(trainer_schedule.get_last_lr()[0])
        optimizer.step()
        trainer_schedule.step()
    loop_rates = [schedule(name, 4, 20)(k) for k in range(20)]
    if name == "inverse_sqrt":
        assert trainer_rates[5:] == pytest.approx(loop_rates[4:-1])
    else:
        assert trainer_rates[4:] == pytest.approx(loop_rates[4:])
    assert min(loop_rates[4:]) < 1.0 or name == "constant", "the steps after warm-up must show the decay"


def test_a_wsd_trainer_decays_over_the_steps_it_runs_and_another_schedule_gets_no_wsd_arguments(tmp_path):
    settings = dataclasses.replace(SETTINGS, steps=20, warmup=4, schedule="wsd")
    assert trainer_arguments(settings, str(tmp_path), max_steps=50).lr_scheduler_kwargs["num_decay_steps"] == 10
    assert not trainer_arguments(settings, str(tmp_path), lr_scheduler_type="linear").lr_scheduler_kwargs

"""Issue 27, "nothing non-finite is kept": the loop stops at the first NaN, saves and loads refuse NaN weights,
an integer factor is never cast, and train_task refuses rows that score nothing instead of hanging or NaN."""
from __future__ import annotations

import itertools
import json
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

import polypeft as pp
from polypeft import NonFiniteError
from polypeft.model.savefiles import WEIGHTS_NAME
from polypeft.tasks.records import TaskDataError
from polypeft.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from polypeft.training.loop import LOG_NAME, TrainSettings, train
from tiny_models import build, random_batch, randomize_added


def lms_model() -> pp.PolyModel:
    poly = pp.wrap(build("bart"), pp.LMSConfig(languages=["en", "de"], rank=2))
    randomize_added(poly, scale=0.1)
    return poly


def batches():
    for seed in itertools.count():
        batch = random_batch("bart", 2, length=5, seed=seed)
        yield {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["input_ids"]}


def loss_turning_nan_at(step: int, gradient_only: bool = False):
    calls = itertools.count(1)

    def loss_fn(model, batch):
        loss = model(**batch, src_lang="de", tgt_lang="en").loss
        if next(calls) == step:
            if gradient_only:  # a finite loss whose gradient is infinite: d sqrt(x) / dx at 0
                factor = next(p for p in model.parameters() if p.requires_grad)
                return loss + (factor - factor.detach()).abs().sum().sqrt() * 0, 1
            return loss * float("nan"), 1
        return loss, 1
    return loss_fn


def settings(steps: int = 5, **changes) -> TrainSettings:
    return TrainSettings(**{"steps": steps, "lr": 1e-3, "warmup": 0, "checkpoint_every": 2, "progress": False,
                            **changes})


@pytest.mark.parametrize("gradient_only, what", [(False, "loss"), (True, "gradient norm")])
def test_training_stops_at_the_first_non_finite_step_and_keeps_the_last_finite_checkpoint(tmp_path, gradient_only,
                                                                                           what):
    model = lms_model()
    with pytest.raises(NonFiniteError, match=rf"optimiser step 3: the {what} is nan.*checkpoint.safetensors \(step "
                                             r"2, finite\) is kept"):
        train(model, batches, loss_turning_nan_at(3, gradient_only), settings(), tmp_path)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the failing step reached the weights"
    logged = [json.loads(line)["step"] for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert logged == [1, 2], "the NaN step was logged"


def test_in_memory_training_names_the_step_too():
    with pytest.raises(NonFiniteError, match=r"optimiser step 1: the loss is nan.*nothing is written"):
        train(lms_model(), batches, loss_turning_nan_at(1), settings())


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path):
    from polypeft.training.checkpoint import save_checkpoint

    model = lms_model()
    train(model, batches, lambda m, b: (m(**b, src_lang="de", tgt_lang="en").loss, 1), settings(2), tmp_path)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with torch.no_grad():  # finite gradients can still overflow a weight (a huge lr): the write is the last guard
        next(iter(model.routed_layers.values())).lms_F.data[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"checkpoint.safetensors not written: tensor .*lms_F \(1 of"):
        save_checkpoint(tmp_path / CHECKPOINT_NAME, {"step": 3, "model": model.state_dict()})
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before


def test_resume_refuses_a_checkpoint_holding_nan(tmp_path):
    train(lms_model(), batches, lambda m, b: (m(**b, src_lang="de", tgt_lang="en").loss, 1), settings(2), tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    name = next(key for key in tensors if "lms_F" in key and key.startswith("state.model"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path), metadata=metadata)  # written by something other than polypeft
    model = lms_model()
    with pytest.raises(NonFiniteError, match=r"--resume: .*checkpoint.safetensors holds a non-finite weight.*lms_F"):
        train(model, batches, lambda m, b: (m(**b, src_lang="de", tgt_lang="en").loss, 1), settings(4), tmp_path,
              resume=True)


def test_saving_nan_weights_is_refused_and_the_old_save_stays(tmp_path):
    model = lms_model()
    model.save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        next(iter(model.routed_layers.values())).lms_V.data[1, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=rf"{tmp_path} not saved: tensor .*lms_V \(1 of \d+ values NaN or inf\)"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    with pytest.raises(NonFiniteError, match=r"de not exported: tensor .*lms_V"):
        model.export_lora(tmp_path / "de", lang="de")


@pytest.mark.parametrize("damage, message", [
    (lambda t: torch.full_like(t, float("nan")), r"polypeft_model.safetensors: refused: tensor .*lms_F \(\d+ of"),
    (lambda t: t.to(torch.int32), r"lms_F is stored as torch.int32, the model's is torch.float64; a weight is never "
                                  r"cast"),
])
def test_loading_nan_or_integer_weights_is_refused_by_name(tmp_path, damage, message):
    lms_model().save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    name = next(key for key in tensors if key.endswith("lms_F"))
    tensors[name] = damage(tensors[name])
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=message):
        pp.PolyModel.from_pretrained(build("bart"), tmp_path)


# ---------------------------------------------------------------------------------------------- train_task rows

def classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, num_labels=2)
    return pp.wrap(BertForSequenceClassification(config),
                   pp.LMSConfig(languages=["de"], rank=2, synthesis="language", modules_to_save=["classifier"]))


def inputs(rows: int, labels=None, masks=None) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 32, (rows, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, 6, dtype=torch.long) if masks is None else masks
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([i % 2 for i in range(rows)]) if labels is None else labels}


def run_in_a_thread(function, seconds: float = 60.0):
    """`function()` with a time limit: a hang fails the test instead of stalling the suite."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: it hangs"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_train_task_on_zero_rows_is_refused_at_once():
    empty = {key: value[:0] for key, value in inputs(2).items()}
    with pytest.raises(TaskDataError, match=r"train_task got 0 input rows"):
        run_in_a_thread(lambda: pp.train_task(classifier(), empty, [], pp.TaskTrainingSettings.from_values(steps=2),
                                              progress=False))


@pytest.mark.parametrize("column, value, counted", [
    ("labels", -100, r"2 with every label -100 and 0 with an all-zero attention mask"),
    ("attention_mask", 0, r"0 with every label -100 and 2 with an all-zero attention mask"),
])
def test_rows_that_score_nothing_are_skipped_and_counted(column, value, counted):
    data = inputs(4)
    data[column] = data[column].clone()
    data[column][:2] = value
    with pytest.warns(UserWarning, match=rf"2 of 4 input rows skipped \({counted}\)"):
        losses = pp.train_task(classifier(), data, ["de"] * 4,
                               pp.TaskTrainingSettings.from_values(steps=3, batch_size=2), progress=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    data[column][:] = value
    with pytest.raises(TaskDataError, match=rf"none of the 4 input rows can be trained on \(4 with|and 4 with"):
        pp.train_task(classifier(), data, ["de"] * 4, pp.TaskTrainingSettings.from_values(steps=3), progress=False)

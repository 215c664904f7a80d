"""The one training loop: settings checked by name, checkpoints that are never unpickled, resume after a torn
log line, bf16 autocast with float32 factors, the schedules, and one backward pass in the whole package."""
from __future__ import annotations

import itertools
import json
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import polypeft as pp
from polypeft.core.config import ConfigError
from polypeft.training.checkpoint import CHECKPOINT_NAME, PICKLED_CHECKPOINT_NAME, load_checkpoint
from polypeft.training.loop import BatchStreamEnded, TrainSettings, train
from polypeft.training.schedules import constant, linear, warmup_stable_decay
from tiny_models import build, random_batch, randomize_added


def lms_model(dtype: torch.dtype = torch.float64) -> pp.PolyModel:
    poly = pp.wrap(build("bart").to(dtype), pp.LMSConfig(languages=["en", "de"], rank=4, freeze_base=False))
    randomize_added(poly, scale=0.1)
    return poly


def batches():
    """Copy tasks: the decoder learns to repeat a random input, a new one each batch."""
    for seed in itertools.count():
        batch = random_batch("bart", 4, length=6, seed=seed)
        yield {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["input_ids"]}


def loss_fn(model, batch):
    return model(**batch, src_lang="de", tgt_lang="en").loss, int(batch["labels"].numel())


def run(run_dir, steps: int, resume: bool = False, **changes) -> tuple[pp.PolyModel, dict]:
    settings = TrainSettings(**{"steps": steps, "lr": 3e-3, "warmup": 2, "checkpoint_every": 3, "progress": False,
                                **changes})
    model = lms_model()
    return model, train(model, batches, loss_fn, settings, run_dir, resume=resume)


@pytest.mark.parametrize("changes, message", [
    ({"steps": 0}, r"TrainSettings.steps=0 must be a positive int"),
    ({"steps": -5}, r"TrainSettings.steps=-5 must be a positive int"),
    ({"accumulation": 0}, r"TrainSettings.accumulation=0 must be a positive int"),
    ({"steps": True}, r"TrainSettings.steps=True must be a positive int"),
    ({"lr": float("nan")}, r"TrainSettings.lr=nan must be a finite number"),
    ({"lr": float("inf")}, r"TrainSettings.lr=inf must be a finite number"),
    ({"lr": 0.0}, r"TrainSettings.lr=0.0 must be a positive number"),
    ({"weight_decay": float("nan")}, r"TrainSettings.weight_decay=nan must be a finite number"),
    ({"clip_norm": float("-inf")}, r"TrainSettings.clip_norm=-inf must be a finite number"),
    ({"schedule": "cosine"}, r"TrainSettings.schedule='cosine' is not allowed; choose one of \['inverse_sqrt', "
                             r"'linear', 'constant', 'wsd'\]"),
    ({"mixed_precision": "fp8"}, r"TrainSettings.mixed_precision='fp8' is not allowed; choose one of \['no', "
                                 r"'bf16', 'fp16'\]"),
    ({"progress": "false"}, r"TrainSettings.progress='false' must be true or false"),
    ({"betas": (0.9,)}, r"TrainSettings.betas=\(0.9,\) must be two numbers in \[0, 1\)"),
    ({"betas": (0.9, float("nan"))}, r"TrainSettings.betas\[1\]=nan must be a finite number"),
    ({"betas": (0.9, 1.0)}, r"TrainSettings.betas\[1\]=1.0 must be a number in \[0, 1\)"),
    ({"seed": -1}, r"TrainSettings.seed=-1 must be an int >= 0 or null"),
])
def test_settings_are_checked_on_construction(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainSettings(**changes)


class CodeOnUnpickle:
    """A crafted checkpoint: unpickling it creates a file, as a real attack would run any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_never_unpickles_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    full, _ = run(tmp_path / "full", steps=6)
    run(tmp_path / "cut", steps=3)
    marker = tmp_path / "code-ran"
    (tmp_path / "cut" / PICKLED_CHECKPOINT_NAME).write_bytes(pickle.dumps(CodeOnUnpickle(marker)))
    resumed, result = run(tmp_path / "cut", steps=6, resume=True)
    assert not marker.exists(), "a pickle in the run folder was loaded"
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)
    assert [r["step"] for r in result["history"]] == [1, 2, 3, 4, 5, 6]
    state = load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)
    assert state["step"] == 6 and isinstance(state["optimizer"]["state"][0]["exp_avg"], torch.Tensor)
    assert set(load_file(str(tmp_path / "cut" / CHECKPOINT_NAME))), "the tensors live in the safetensors body"

    (tmp_path / "cut" / CHECKPOINT_NAME).write_bytes(pickle.dumps(CodeOnUnpickle(marker)))
    with pytest.raises(ValueError, match=r"checkpoint.safetensors is not a readable polypeft checkpoint"):
        run(tmp_path / "cut", steps=7, resume=True)
    assert not marker.exists()


def test_an_old_pickled_checkpoint_alone_is_named_not_loaded(tmp_path):
    marker = tmp_path / "code-ran"
    (tmp_path / PICKLED_CHECKPOINT_NAME).write_bytes(pickle.dumps(CodeOnUnpickle(marker)))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*checkpoint.safetensors; .*checkpoint.pt is a "
                                                r"pickled checkpoint of an older polypeft, never loaded"):
        run(tmp_path, steps=3, resume=True)
    assert not marker.exists()


def test_a_torn_last_log_line_does_not_block_resume(tmp_path):
    run(tmp_path, steps=3)
    log = tmp_path / "train_log.jsonl"
    with open(log, "a", encoding="utf-8") as handle:  # step 4 logged, then power went mid-way through step 5
        handle.write(json.dumps({"step": 4, "loss": 9.9}) + "\n" + '{"step": 5, "lo')
    _, result = run(tmp_path, steps=5, resume=True)
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[3:] == result["history"][3:] and all(r["loss"] != 9.9 for r in records)


def test_elapsed_time_runs_on_across_a_resume(tmp_path):
    import time

    def slow_loss(model, batch):
        time.sleep(0.1)
        return loss_fn(model, batch)

    settings = TrainSettings(steps=3, lr=3e-3, warmup=2, checkpoint_every=3, progress=False)
    first = train(lms_model(), batches, slow_loss, settings, tmp_path)["history"]
    assert first[-1]["elapsed_s"] >= 0.3
    _, result = run(tmp_path, steps=5, resume=True)  # the resumed part is fast: its clock starts where step 3 ended
    elapsed = [r["elapsed_s"] for r in result["history"]]
    assert elapsed[:3] == [r["elapsed_s"] for r in first] and elapsed[3] >= first[-1]["elapsed_s"]
    assert elapsed == sorted(elapsed)
    # a checkpoint written before the loop counted its time: the earlier parts' time is unknown, not zero
    from polypeft.training.checkpoint import save_checkpoint
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    state["history"] = [{key: value for key, value in r.items() if key != "elapsed_s"} for r in state["history"]]
    save_checkpoint(tmp_path / CHECKPOINT_NAME, state)
    _, older = run(tmp_path, steps=6, resume=True)
    assert older["history"][-1]["elapsed_s"] is None


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    run(tmp_path, steps=3)
    log = tmp_path / "train_log.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    log.write_text(lines[0] + "garbage\n" + "".join(lines[1:]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_log.jsonl line 2 is not JSON"):
        run(tmp_path, steps=4, resume=True)


def test_bf16_autocasts_the_compute_and_keeps_the_trainable_factors_float32():
    model = lms_model(torch.float32)
    batch = next(batches())
    compute_dtypes = []  # accelerate hands the model's outputs back in float32: look inside, at the output layer
    model.base_model.lm_head.register_forward_hook(lambda module, inputs, output: compute_dtypes.append(output.dtype))
    settings = TrainSettings(steps=12, lr=1e-2, warmup=1, mixed_precision="bf16", progress=False)
    losses = [r["loss"] for r in train(model, lambda: iter([batch] * 12), loss_fn, settings)["history"]]
    assert set(compute_dtypes) == {torch.bfloat16}, "the forward pass must run under bf16 autocast"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert losses[-1] < 0.8 * losses[0], losses
    compute_dtypes.clear()
    model(**batch, src_lang="de", tgt_lang="en")
    assert compute_dtypes == [torch.float32], "the autocast wrapper was left on the model"
    plain = train(lms_model(), lambda: iter([batch] * 2), loss_fn, TrainSettings(steps=2, progress=False))
    assert len(plain["history"]) == 2, "a later full-precision run in the same process still trains"


def test_in_memory_training_writes_nothing_and_a_short_stream_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(lms_model(), batches, loss_fn, TrainSettings(steps=2, progress=False, checkpoint_every=1))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BatchStreamEnded, match=r"the batch stream ended at optimiser step 3 of 4"):
        train(lms_model(), lambda: iter([next(batches())] * 4), loss_fn,
              TrainSettings(steps=4, accumulation=2, progress=False))


def test_linear_and_constant_schedules():
    assert [round(linear(2, 6)(k), 4) for k in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [constant(3)(k) for k in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    assert constant(0)(0) == 1.0 and math.isclose(linear(0, 4)(3), 1 / 3)


def test_wsd_holds_the_peak_then_decays_to_zero_over_the_last_fifth():
    rates = [warmup_stable_decay(2, 10)(k) for k in range(10)]
    assert rates == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 1.0, 0.5])
    assert warmup_stable_decay(0, 100)(79) == 1.0 and warmup_stable_decay(0, 100)(99) == pytest.approx(0.05)


def test_exactly_one_place_in_the_package_runs_a_backward_pass():
    package = Path(pp.__file__).parent
    calls = [f"{path.relative_to(package)}:{number}" for path in sorted(package.rglob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"(?<!def )(?<![\w])backward\(", line)]  # calls, not autograd Functions' own backward
    assert len(calls) == 1 and calls[0].startswith("training/loop.py:"), calls

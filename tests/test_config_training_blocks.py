"""The optimisation fields are declared once (TrainSettings): a warm-up left null is a tenth of the steps."""
from __future__ import annotations

import pytest
import torch

from polypeft.core.config import ConfigError
from polypeft.training.loop import TrainSettings, train

# ---------------------------------------------------------------------------------------------- warm-up


def test_a_null_warmup_is_a_tenth_of_the_steps_and_an_explicit_one_wins():
    assert TrainSettings(steps=600, warmup=None).warmup_steps == 60
    assert TrainSettings(steps=5, warmup=None).warmup_steps == 1  # at least one step
    assert TrainSettings(steps=600, warmup=7).warmup_steps == 7
    assert TrainSettings(steps=600, warmup=0).warmup_steps == 0
    with pytest.raises(ConfigError, match=r"warmup=-1 must be an int >= 0 or null"):
        TrainSettings(warmup=-1)


def test_the_loop_warms_up_over_a_tenth_of_the_steps_when_warmup_is_null():
    def rates(warmup):
        model = torch.nn.Linear(2, 1)
        batches = lambda: iter(lambda: torch.ones(1, 2), None)  # noqa: E731 (an endless stream)
        settings = TrainSettings(steps=30, lr=1e-2, warmup=warmup, schedule="linear", progress=False)
        history = train(model, batches, lambda m, x: (m(x).pow(2).mean(), 1), settings)["history"]
        return [record["lr"] for record in history]

    assert rates(None) == rates(3) != rates(10)

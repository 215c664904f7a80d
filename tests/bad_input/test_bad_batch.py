"""Issue 16 item 10: a batch of zero examples runs through every routed layer and comes out empty."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import polypeft as pp

LANGS = ["en", "de"]
TARGETS = ["fc1", "fc2"]


class TwoBlocks(nn.Module):
    """Two numbered FFN blocks (Switch needs layer indices), small enough to run any batch shape."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(8, 12), "fc2": nn.Linear(12, 8)}) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block["fc2"](block["fc1"](x))
        return x


CONFIGS = {
    "lms-pair": lambda: pp.LMSConfig(languages=LANGS, rank=2, target_modules=TARGETS),
    "lms-language-shared": lambda: pp.LMSConfig(languages=LANGS, rank=2, target_modules=TARGETS,
                                                synthesis="language", shared_route=True),
    "lora": lambda: pp.LoRAConfig(languages=LANGS, rank=2, target_modules=TARGETS),
    "ls_ffn": lambda: pp.LSFFNConfig(languages=LANGS, target_modules=TARGETS),
    "switch": lambda: pp.SwitchConfig(languages=LANGS, target_modules=TARGETS),
    "clsr": lambda: pp.CLSRConfig(languages=LANGS, target_modules=TARGETS, language_weights="per_sublayer"),
}
ROUTES = {"one-code": ("en", "de"), "empty-lists": ([], []),
          "empty-tensors": (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))}


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("routes", ROUTES)
@pytest.mark.parametrize("shape", [(0, 8), (0, 3, 8)])
def test_an_empty_batch_gives_an_empty_output(method, routes, shape):
    poly = pp.wrap(TwoBlocks().double(), CONFIGS[method]())
    src, tgt = ROUTES[routes]
    for training in (False, True):
        poly.train(training)
        with poly.routes(src_lang=src, tgt_lang=tgt):
            output = poly.base_model(torch.zeros(shape, dtype=torch.double))
        assert output.shape == shape
        auxiliary = poly.auxiliary_loss()
        assert torch.isfinite(torch.as_tensor(auxiliary)).all(), "an empty batch must not poison the loss"


def test_an_empty_batch_still_checks_its_routes():
    poly = pp.wrap(TwoBlocks().double(), CONFIGS["lms-pair"]())
    with pytest.raises(pp.LanguageError, match="unknown language code 'xx'"):
        with poly.routes(src_lang="xx", tgt_lang="de"):
            poly.base_model(torch.zeros(0, 8, dtype=torch.double))

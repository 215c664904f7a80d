"""What every test shares: the tests folder on the import path, one CPU thread, and the fixtures below."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)

from tiny_models import bert_tokenizer  # noqa: E402  (the path above makes it importable)



@pytest.fixture
def tiny_tokenizer(request):
    """A fresh word-level tokenizer over the test module's WORDS ([PAD] and [UNK] first where missing); BERT-style
    ([CLS] ... [SEP]) when WORDS hold those two next."""
    words = list(request.module.WORDS)
    return bert_tokenizer([token for token in ("[PAD]", "[UNK]") if token not in words] + words)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache with huggingface_hub (and transformers through it) offline: Hub ids load from it only."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache

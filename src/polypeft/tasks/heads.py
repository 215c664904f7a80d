"""Put one of transformers' own task heads on a loaded encoder, keeping the encoder's trained weights.

Every encoder task (classification, tokens, QA) builds its model this way, so any HF encoder works.
"""
from __future__ import annotations

from typing import Any

import torch


def attach_head(encoder: torch.nn.Module, auto_class: Any, **config_updates: Any) -> torch.nn.Module:
    """Return `auto_class.from_config(encoder.config + config_updates)` holding `encoder`'s weights.

    `auto_class` is e.g. `transformers.AutoModelForSequenceClassification`. Only the new head (and a
    pooler the encoder was loaded without) starts from random weights, and a pooler the head does not
    use is dropped; any other encoder weight that does not fit raises, naming it.
    """
    config = encoder.config.__class__.from_dict(encoder.config.to_dict())
    for key, value in config_updates.items():
        setattr(config, key, value)
    config.architectures = None
    model = auto_class.from_config(config)
    body = getattr(model, model.base_model_prefix, None)
    if body is None:
        raise TypeError(f"{type(model).__name__} has no base model attribute {model.base_model_prefix!r}")
    state = encoder.state_dict()
    # An encoder loaded with its head already (e.g. a *ForMaskedLM) carries the body under the prefix.
    prefix = model.base_model_prefix + "."
    if state and all(name.startswith(prefix) for name in state):
        state = {name[len(prefix):]: tensor for name, tensor in state.items()}
    result = body.load_state_dict(state, strict=False)
    # Poolers come and go between heads (token and span heads drop BERT's); nothing else may.
    unexpected = [name for name in result.unexpected_keys if not name.startswith("pooler.")]
    missing = [name for name in result.missing_keys if not name.startswith("pooler.")]
    if unexpected or missing:
        raise ValueError(f"encoder {type(encoder).__name__} does not fit {type(body).__name__} of "
                         f"{auto_class.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(next(encoder.parameters()).device)

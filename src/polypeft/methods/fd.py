"""Losses over non-padding tokens: cross-entropy, symmetric and one-way KL, fuse distillation.

The FD step runs the language-specific and the shared route as one batched pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.nn import functional as F

from ..core.languages import LanguageSpec

IGNORE_INDEX = -100


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in at least float32: half-precision logits lose the small probabilities KL needs."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not `ignore_index`."""
    return F.cross_entropy(
        _upcast(logits).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


def _token_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per token, from log-probabilities over the last axis."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """½ (KL(a‖b) + KL(b‖a)), averaged over the tokens where `mask` is true."""
    log_a, log_b = F.log_softmax(_upcast(logits_a), -1), F.log_softmax(_upcast(logits_b), -1)
    return _masked_mean(0.5 * (_token_kl(log_a, log_b) + _token_kl(log_b, log_a)), mask)


def one_way_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(sg(p_teacher) ‖ p_student): gradients reach the student only."""
    log_t = F.log_softmax(_upcast(teacher_logits.detach()), -1)
    log_s = F.log_softmax(_upcast(student_logits), -1)
    return _masked_mean(_token_kl(log_t, log_s), mask)


@dataclass
class FuseDistillationLoss:
    """The FD objective and its parts, for logging."""

    loss: torch.Tensor
    ce_language: torch.Tensor
    ce_shared: torch.Tensor
    kl: torch.Tensor


def fuse_distillation_loss(
    language_logits: torch.Tensor,
    shared_logits: torch.Tensor,
    labels: torch.Tensor,
    kl_weight: float = 1.0,
    one_way: bool = False,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> FuseDistillationLoss:
    """½ (CE_ls + CE_sh) + λ · KL, with the symmetric KL (LMS) or one-way KL(sg(p_ls)‖p_sh) (full-rank LS).

    Equal to composing `token_cross_entropy` and `symmetric_kl`/`one_way_kl`, but the vocabulary-wide work
    (one log-softmax per route, on the scored tokens only) is shared: with a small model it dominates the step.
    """
    mask = labels != ignore_index
    log_language = F.log_softmax(_upcast(language_logits[mask]), -1)
    log_shared = F.log_softmax(_upcast(shared_logits[mask]), -1)
    targets = labels[mask]
    ce_language = _smoothed_nll(log_language, targets, label_smoothing)
    ce_shared = _smoothed_nll(log_shared, targets, label_smoothing)
    if one_way:
        teacher = log_language.detach()
        per_token = (teacher.exp() * (teacher - log_shared)).sum(-1)
    else:  # ½ (KL(a‖b) + KL(b‖a)) = ½ Σ (p_a − p_b)(log p_a − log p_b)
        per_token = 0.5 * ((log_language.exp() - log_shared.exp()) * (log_language - log_shared)).sum(-1)
    kl = per_token.mean() if per_token.numel() else per_token.sum()
    return FuseDistillationLoss(0.5 * (ce_language + ce_shared) + kl_weight * kl, ce_language, ce_shared, kl)


def _smoothed_nll(log_probs: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """What F.cross_entropy(label_smoothing=ε) gives, from log-probabilities already at hand."""
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(-1)
    return nll.mean()


def model_inputs(poly, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without `labels`: the model's own loss would be a wasted pass over the vocabulary.
    An encoder-decoder still gets the decoder inputs the labels imply."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    labels = batch.get("labels")
    if labels is None or "decoder_input_ids" in inputs or "decoder_inputs_embeds" in inputs:
        return inputs
    if getattr(getattr(poly, "config", None), "is_encoder_decoder", False):
        prepare = getattr(poly.base_model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            return dict(batch)  # cannot derive them: let the model do it, loss and all
        inputs["decoder_input_ids"] = prepare(labels=labels)
    return inputs


def _doubled(value: Any, batch_size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
        return torch.cat([value, value], dim=0)
    return value


def fuse_distillation_step(
    model,
    batch: dict[str, torch.Tensor],
    src_lang: LanguageSpec = None,
    tgt_lang: LanguageSpec = None,
    kl_weight: float = 1.0,
    one_way: bool = False,
    label_smoothing: float = 0.0,
    labels: Optional[torch.Tensor] = None,
) -> FuseDistillationLoss:
    """One FD forward: the batch twice in one pass, routes [language routes; shared], and the FD loss."""
    labels = batch["labels"] if labels is None else labels
    batch_size = int(labels.shape[0])
    poly = getattr(model, "module", model)  # DDP or accelerate wrappers forward, the PolyModel routes
    routes = poly.make_routes(src_lang, tgt_lang, batch_size).expanded_to(batch_size)
    shared_id = poly.registry.shared_id
    src = routes.src.tolist() + [shared_id] * batch_size
    tgt = routes.tgt.tolist() + [shared_id] * batch_size
    doubled = {key: _doubled(value, batch_size) for key, value in model_inputs(poly, batch).items()}
    logits = model(**doubled, src_lang=torch.tensor(src), tgt_lang=torch.tensor(tgt)).logits
    language_logits, shared_logits = logits.split(batch_size, dim=0)
    return fuse_distillation_loss(language_logits, shared_logits, labels, kl_weight, one_way, label_smoothing)

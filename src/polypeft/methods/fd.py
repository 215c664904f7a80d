"""Losses over non-padding tokens: cross-entropy, symmetric and one-way KL, fuse distillation.

The FD step runs both routes as one batched pass, and its loss as one fused pass that writes its own gradient.
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


# Elements per chunk of the fused loss (rows x vocabulary): 1 MiB of float32, so the chunk's few
# temporaries stay in a core's cache (4x larger ran 1.4x slower on this machine's CPU). A GPU wants few
# large kernels instead: 64 MiB chunks.
CHUNK_ELEMENTS = 1 << 18
CHUNK_ELEMENTS_GPU = 1 << 24


@dataclass(frozen=True)
class FusedOptions:
    """The FD loss's constants, fixed for one call."""

    kl_weight: float
    one_way: bool
    label_smoothing: float
    ignore_index: int


class FusedDistillation(torch.autograd.Function):
    """CE of both routes and their KL in one chunked pass over the vocabulary, the gradient of the total
    computed on the way; the per-part outputs are for logging (a gradient through them recomputes).

    `apply(language, shared, targets, options)` takes the two routes' (tokens, vocabulary) logits; with
    `shared=None`, `language` holds both, language rows first, as the doubled FD pass returns them, and
    gets one gradient tensor (splitting the logits would cost a copy of them all in the backward)."""

    @staticmethod
    def forward(ctx, language: torch.Tensor, shared: Optional[torch.Tensor], targets: torch.Tensor,
                options: FusedOptions):
        ctx.set_materialize_grads(False)
        ctx.pair = shared is None
        # Rows of masked tokens keep a zero gradient; when every token is scored, every row is written.
        allocate = torch.empty_like if bool((targets != options.ignore_index).all()) else torch.zeros_like
        if ctx.pair:
            ctx.gradients = [allocate(language)]
            language, shared = language.split(targets.shape[0])
            halves = ctx.gradients[0].split(targets.shape[0])
        else:
            ctx.gradients = halves = [allocate(language), allocate(shared)]
        with torch.no_grad():
            parts = _fused_pass(language, shared, targets, options, halves)
        ctx.save_for_backward(language, shared, targets)
        ctx.options = options
        return parts

    @staticmethod
    def backward(ctx, grad_loss, grad_ce_language, grad_ce_shared, grad_kl):
        if grad_ce_language is None and grad_ce_shared is None and grad_kl is None:
            gradients = [_scaled(gradient, grad_loss) for gradient in ctx.gradients]
        else:
            gradients = _recomputed(*ctx.saved_tensors, ctx.options, (grad_loss, grad_ce_language, grad_ce_shared,
                                                                      grad_kl))
            if ctx.pair:
                gradients = [torch.cat([torch.zeros_like(half) if gradient is None else gradient
                                        for half, gradient in zip(ctx.saved_tensors, gradients)])]
        return (*gradients, *[None] * (4 - len(gradients)))  # none for targets, options (and an absent `shared`)


def _recomputed(language: torch.Tensor, shared: torch.Tensor, targets: torch.Tensor, options: FusedOptions,
                grads: tuple[Optional[torch.Tensor], ...]) -> list[Optional[torch.Tensor]]:
    """Gradients through the logged parts, from the plain composition: rarely asked for, so not fused."""
    with torch.enable_grad():
        leaves = [language.detach().requires_grad_(True), shared.detach().requires_grad_(True)]
        parts = _composed_parts(*leaves, targets, options)
        used = [(part, grad) for part, grad in zip(parts, grads) if grad is not None]
        return list(torch.autograd.grad([p for p, _ in used], leaves, [g for _, g in used], allow_unused=True))


def _scaled(gradient: torch.Tensor, grad_loss: Optional[torch.Tensor]) -> torch.Tensor:
    """The stored gradient times the incoming one; a backward from the loss itself (1 on the CPU) needs no pass."""
    if grad_loss is None or (grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):
        return gradient
    return gradient * grad_loss.to(gradient.dtype)


def _composed_parts(language: torch.Tensor, shared: torch.Tensor, targets: torch.Tensor,
                    options: FusedOptions) -> tuple[torch.Tensor, ...]:
    """The FD loss as the public functions compose it: the reference the fused pass must equal."""
    mask = targets != options.ignore_index
    ce = [token_cross_entropy(half, targets, options.label_smoothing, options.ignore_index)
          for half in (language, shared)]
    kl = (one_way_kl if options.one_way else symmetric_kl)(language, shared, mask)
    return 0.5 * (ce[0] + ce[1]) + options.kl_weight * kl, ce[0], ce[1], kl


def _fused_pass(language_rows: torch.Tensor, shared_rows: torch.Tensor, targets: torch.Tensor, options: FusedOptions,
                gradients: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Loss, CE_ls, CE_sh and KL (summed in float64); the gradients of the loss for both routes' rows are
    written into `gradients` (zero-filled where tokens are masked).

    Per scored token, with a, b the two routes' log-probabilities, p, q their probabilities, d = a − b,
    c = 1/n and ε the smoothing: d(½CE)/dz = ½c (p − (1−ε)·onehot − ε/V); symmetric KL ½ Σ (p − q) d has
    d/dz_a = ½c (p (d − E_p d) + p − q) and d/dz_b = ½c (q (E_q d − d) + q − p); one-way KL Σ p d has
    d/dz_b = c (q − p) and none for z_a.
    """
    count, vocabulary = targets.shape[0], language_rows.shape[-1]
    scored = targets != options.ignore_index
    everything = bool(scored.all())
    positions = None if everything else scored.nonzero().squeeze(-1)
    tokens = count if everything else int(positions.numel())
    totals = torch.zeros(3, dtype=torch.float64, device=targets.device)  # CE_ls, CE_sh, KL sums
    scale, weight, smoothing = 1.0 / max(tokens, 1), options.kl_weight, options.label_smoothing
    chunk = CHUNK_ELEMENTS if language_rows.device.type == "cpu" else CHUNK_ELEMENTS_GPU
    step = max(1, chunk // max(vocabulary, 1))
    # Per route, gradient = own · (slope · d + shift) + constant − other_weight · other (see the docstring).
    half, constant = 0.5 * weight * scale, -0.5 * scale * smoothing / vocabulary
    for start in range(0, tokens, step):
        if everything:
            index = slice(start, min(start + step, tokens))
            language, shared, target = language_rows[index], shared_rows[index], targets[index]
        else:
            index = positions[start:start + step]
            language, shared = language_rows.index_select(0, index), shared_rows.index_select(0, index)
            target = targets.index_select(0, index)
        a = torch.log_softmax(_upcast(language), -1)
        b = torch.log_softmax(_upcast(shared), -1)
        p, q = a.exp(), b.exp()
        picked = target.unsqueeze(-1)
        for slot, log_probs in ((0, a), (1, b)):
            nll = -log_probs.gather(-1, picked).sum()
            if smoothing:
                nll = (1 - smoothing) * nll - smoothing * log_probs.sum() / vocabulary
            totals[slot] += nll.double()
        d = a.sub_(b)  # a is no longer needed as itself
        mean_p = torch.linalg.vecdot(p, d).unsqueeze(-1)
        if options.one_way:
            totals[2] += mean_p.sum().double()
            terms = ((p, 0.0, 0.5 * scale, q, 0.0), (q, 0.0, 0.5 * scale + weight * scale, p, weight * scale))
        else:
            mean_q = torch.linalg.vecdot(q, d).unsqueeze(-1)
            totals[2] += 0.5 * (mean_p.sum() - mean_q.sum()).double()
            terms = ((p, half, 0.5 * scale + half - half * mean_p, q, half),
                     (q, -half, 0.5 * scale + half + half * mean_q, p, half))
        for (own, slope, shift, other, other_weight), gradient in zip(terms, gradients):
            direct = everything and gradient.dtype == own.dtype
            out = gradient[index] if direct else torch.empty_like(own)
            if slope:
                torch.add(shift, d, alpha=slope, out=out).mul_(own)
            else:
                torch.mul(own, shift, out=out)
            if other_weight:
                out.sub_(other, alpha=other_weight)
            if constant:
                out.add_(constant)
            out.scatter_add_(-1, picked, torch.full(picked.shape, -0.5 * scale * (1 - smoothing), dtype=out.dtype,
                                                    device=out.device))
            if everything and not direct:
                gradient[index].copy_(out)
            elif not everything:
                gradient.index_copy_(0, index, out.to(gradient.dtype))
    nan = float("nan")
    means = totals / tokens if tokens else torch.tensor([nan, nan, 0.0], dtype=torch.float64, device=totals.device)
    parts = means.to(torch.promote_types(language_rows.dtype, torch.float32))
    loss = 0.5 * (parts[0] + parts[1]) + weight * parts[2]
    return loss, parts[0], parts[1], parts[2]


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

    Equal to composing `token_cross_entropy` and `symmetric_kl`/`one_way_kl` in value and gradient, but the
    vocabulary-wide work runs once, in cache-sized chunks that compute the gradient on the way
    (`FusedDistillation`), and copies no logits when no token is masked.
    """
    if shared_logits.shape != language_logits.shape:
        raise ValueError(f"fuse_distillation_loss: language logits {tuple(language_logits.shape)} and shared "
                         f"logits {tuple(shared_logits.shape)} must have the same shape")
    options = FusedOptions(float(kl_weight), bool(one_way), float(label_smoothing), ignore_index)
    return _fused_loss(language_logits, shared_logits, labels, options)


def _fused_loss(language_logits: torch.Tensor, shared_logits: Optional[torch.Tensor], labels: torch.Tensor,
                options: FusedOptions) -> FuseDistillationLoss:
    """`shared_logits=None`: `language_logits` are the doubled pass's, [language routes; shared route]."""
    vocabulary = language_logits.shape[-1]
    targets = labels.reshape(-1).to(language_logits.device)
    routes = 1 if shared_logits is not None else 2
    if routes * targets.shape[0] * vocabulary != language_logits.numel():
        raise ValueError(f"fuse_distillation_loss: labels {tuple(labels.shape)} do not match logits "
                         f"{tuple(language_logits.shape)}: one label per row of {vocabulary} logits and route")
    shared_rows = None if shared_logits is None else shared_logits.reshape(-1, vocabulary)
    loss, ce_language, ce_shared, kl = FusedDistillation.apply(language_logits.reshape(-1, vocabulary), shared_rows,
                                                               targets, options)
    return FuseDistillationLoss(loss, ce_language, ce_shared, kl)


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


def predicts_next_token(poly) -> bool:
    """A causal LM (transformers' `*ForCausalLM` mapping): its labels are its inputs, shifted inside its loss."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = getattr(poly, "base_model", poly)
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


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
    if predicts_next_token(poly):  # logits[t] predict labels[t + 1], as the model's own loss shifts them
        logits, labels = logits[:, :-1], labels[:, 1:]
    options = FusedOptions(float(kl_weight), bool(one_way), float(label_smoothing), IGNORE_INDEX)
    return _fused_loss(logits, None, labels, options)  # [language; shared] rows: one gradient tensor, no split

"""The fused FD loss against the plain composition of the public losses, in value and gradient.

The fused pass computes the gradient itself, chunk by chunk; any slip in its algebra shows here.
"""
import pytest
import torch

import polypeft as pp
from polypeft.methods import fd

VOCABULARY = 37


def reference(language, shared, labels, kl_weight, one_way, label_smoothing):
    """½ (CE_ls + CE_sh) + λ KL, composed from the public functions as a user would write it."""
    ce = [pp.token_cross_entropy(t, labels, label_smoothing) for t in (language, shared)]
    kl = (pp.one_way_kl if one_way else pp.symmetric_kl)(language, shared, labels != -100)
    return 0.5 * (ce[0] + ce[1]) + kl_weight * kl, ce[0], ce[1], kl


def twins(dtype, masked, seed=0, batch=5, length=9):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCABULARY, (batch, length), generator=generator)
    if masked:
        labels[0, 4:] = -100
        labels[3, 1:] = -100
    logits = [3 * torch.randn(batch, length, VOCABULARY, generator=generator, dtype=dtype) for _ in range(2)]
    fused = [t.clone().requires_grad_(True) for t in logits]
    plain = [t.clone().requires_grad_(True) for t in logits]
    return labels, fused, plain


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("one_way", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_loss_equals_the_composition_to_1e6(monkeypatch, dtype, masked, one_way, label_smoothing):
    monkeypatch.setattr(fd, "CHUNK_ELEMENTS", 4 * VOCABULARY)  # several chunks, the last one short
    labels, fused, plain = twins(dtype, masked)
    got = pp.fuse_distillation_loss(*fused, labels, kl_weight=0.7, one_way=one_way, label_smoothing=label_smoothing)
    expected = reference(*plain, labels, 0.7, one_way, label_smoothing)
    for mine, theirs in zip((got.loss, got.ce_language, got.ce_shared, got.kl), expected):
        assert mine.dtype == theirs.dtype
        assert abs(mine.item() - theirs.item()) <= 1e-6 * max(1.0, abs(float(theirs)))
    got.loss.backward()
    expected[0].backward()
    for mine, theirs in zip(fused, plain):
        assert float((mine.grad - theirs.grad).abs().max()) <= 1e-6 * float(theirs.grad.abs().max())
        if masked:
            assert not mine.grad[3, 1:].any(), "padding tokens get no gradient"


def test_gradient_through_a_logged_part_is_that_parts_gradient():
    labels, fused, plain = twins(torch.float64, masked=True, seed=1)
    got = pp.fuse_distillation_loss(*fused, labels, label_smoothing=0.1)
    expected = reference(*plain, labels, 1.0, False, 0.1)
    (got.kl + 2 * got.ce_shared).backward()
    (expected[3] + 2 * expected[2]).backward()
    for mine, theirs in zip(fused, plain):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_a_scaled_loss_scales_the_gradient():
    labels, fused, plain = twins(torch.float64, masked=False, seed=2)
    (3 * pp.fuse_distillation_loss(*fused, labels).loss).backward()
    (3 * reference(*plain, labels, 1.0, False, 0.0)[0]).backward()
    for mine, theirs in zip(fused, plain):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_half_precision_logits_are_scored_in_float32_and_get_a_gradient_of_their_own_dtype():
    labels, fused, plain = twins(torch.float32, masked=True, seed=3)
    halves = [t.detach().bfloat16().requires_grad_(True) for t in fused]
    got = pp.fuse_distillation_loss(*halves, labels)
    expected = reference(*[t.detach().bfloat16().requires_grad_(True) for t in plain], labels, 1.0, False, 0.0)
    assert got.loss.dtype == torch.float32
    assert abs(float(got.loss) - float(expected[0])) <= 1e-5
    got.loss.backward()
    assert halves[0].grad.dtype == torch.bfloat16 and halves[0].grad.abs().sum() > 0


def test_no_scored_token_gives_the_composition_values():
    labels, fused, plain = twins(torch.float64, masked=False, seed=4)
    labels[:] = -100
    got = pp.fuse_distillation_loss(*fused, labels)
    expected = reference(*plain, labels, 1.0, False, 0.0)
    assert torch.isnan(got.ce_language) and torch.isnan(expected[1])
    assert float(got.kl) == float(expected[3]) == 0.0


def test_mismatched_shapes_are_refused_by_name():
    labels, fused, _ = twins(torch.float32, masked=False)
    with pytest.raises(ValueError, match=r"shared logits \(5, 9, 36\)"):
        pp.fuse_distillation_loss(fused[0], fused[1][..., 1:], labels)
    with pytest.raises(ValueError, match=r"labels \(5, 8\)"):
        pp.fuse_distillation_loss(*fused, labels[:, 1:])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("one_way", [False, True])
def test_the_doubled_pass_logits_whole_give_the_same_loss_and_gradient(masked, one_way):
    """`fuse_distillation_step` hands the [language; shared] logits over unsplit: one gradient tensor."""
    labels, fused, plain = twins(torch.float64, masked, seed=5)
    doubled = torch.cat([t.detach() for t in fused]).requires_grad_(True)
    options = fd.FusedOptions(0.7, one_way, 0.1, -100)
    got = fd._fused_loss(doubled, None, labels, options)
    expected = reference(*plain, labels, 0.7, one_way, 0.1)
    torch.testing.assert_close(torch.stack([got.loss, got.ce_language, got.ce_shared, got.kl]), torch.stack(expected))
    got.loss.backward()
    expected[0].backward()
    torch.testing.assert_close(doubled.grad, torch.cat([t.grad for t in plain]))
    doubled.grad = None
    fd._fused_loss(doubled, None, labels, options).kl.backward()  # through a logged part: recomputed
    kl_only = [t.detach().clone().requires_grad_(True) for t in plain]
    reference(*kl_only, labels, 0.7, one_way, 0.1)[3].backward()
    language_grad = torch.zeros_like(kl_only[0]) if kl_only[0].grad is None else kl_only[0].grad
    torch.testing.assert_close(doubled.grad, torch.cat([language_grad, kl_only[1].grad]))

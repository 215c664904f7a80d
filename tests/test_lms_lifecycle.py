"""Save/load, merge/unmerge/unload round trips, and the FD objective on tiny models."""
from __future__ import annotations

import json

import pytest
import torch

import polypeft as pp
from tiny_models import ALL_KINDS, build, output_of, random_batch, randomize_added

LANGS = ["en", "de", "fr"]


def make(kind: str, synthesis: str = "pair", seed: int = 0):
    poly = pp.wrap(build(kind, seed), pp.LMSConfig(languages=LANGS, rank=4, synthesis=synthesis, shared_route=True))
    randomize_added(poly)
    return poly


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_save_and_load_restore_outputs_exactly(kind, tmp_path):
    poly = make(kind, "language")
    batch = random_batch(kind, 3)
    routes = dict(src_lang=["de", "fr", "shared"], tgt_lang=["en", "de", "shared"])
    expected = output_of(poly, batch, **routes)
    poly.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "polypeft_config.json").read_text())
    assert saved["config"]["synthesis"] == "language" and saved["config"]["method"] == "lms"
    # only the added parameters are saved
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "polypeft_model.safetensors"))
    assert set(tensors) == set(poly.added_state_dict())
    restored = pp.PolyModel.from_pretrained(build(kind), tmp_path)
    torch.testing.assert_close(output_of(restored, batch, **routes), expected, rtol=0, atol=0)


def test_load_refuses_a_base_model_of_another_shape(tmp_path):
    make("bart").save_pretrained(tmp_path)
    with pytest.raises(pp.ConfigError, match=r"does not fit.*modules missing"):
        pp.PolyModel.from_pretrained(build("llama"), tmp_path)
    import transformers as tf

    wider = tf.BartForConditionalGeneration(tf.BartConfig(**{**build("bart").config.to_dict(), "encoder_ffn_dim": 40}))
    with pytest.raises(pp.ConfigError, match=r"shapes differ: \['model.encoder.layers.0.fc1: saved \[48, 32\], model \[40, 32\]"):
        pp.PolyModel.from_pretrained(wider, tmp_path)


def test_load_refuses_unknown_config_keys(tmp_path):
    make("bert").save_pretrained(tmp_path)
    path = tmp_path / "polypeft_config.json"
    saved = json.loads(path.read_text())
    saved["config"]["rnak"] = 4
    path.write_text(json.dumps(saved))
    with pytest.raises(pp.ConfigError, match=r"unknown keys \['rnak'\].*allowed keys are"):
        pp.PolyModel.from_pretrained(build("bert"), tmp_path)


@pytest.mark.parametrize("kind", ["bert", "bart", "t5", "llama"])
@pytest.mark.parametrize("synthesis", ["pair", "language"])
@pytest.mark.parametrize("merge_args", [dict(route="shared"), dict(src="de", tgt="fr")])
def test_merge_matches_routed_outputs_and_unmerge_restores(kind, synthesis, merge_args):
    poly = make(kind, synthesis)
    batch = random_batch(kind, 2)
    src = merge_args.get("route", merge_args.get("src"))
    tgt = merge_args.get("route", merge_args.get("tgt"))
    routed = output_of(poly, batch, src_lang=src, tgt_lang=tgt)
    weights_before = {n: l.base_layer.weight.clone() for n, l in poly.routed_layers.items()}
    poly.merge(**merge_args)
    torch.testing.assert_close(output_of(poly, batch), routed, rtol=0, atol=1e-5)
    with pytest.raises(pp.LanguageError, match="merged into its weights"):
        poly(**batch, src_lang="en", tgt_lang="en")
    poly.unmerge()
    for name, layer in poly.routed_layers.items():
        torch.testing.assert_close(layer.base_layer.weight, weights_before[name], rtol=0, atol=1e-12)
    torch.testing.assert_close(output_of(poly, batch, src_lang=src, tgt_lang=tgt), routed, rtol=0, atol=1e-12)


def test_merge_and_unload_returns_a_plain_model():
    poly = make("bart")
    batch = random_batch("bart", 2)
    routed = output_of(poly, batch, src_lang="shared")
    plain = poly.merge_and_unload(route="shared")
    assert not any(isinstance(m, pp.PolyModel) or hasattr(m, "lms_V") for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in build("bart").parameters())
    torch.testing.assert_close(output_of(plain, batch), routed, rtol=0, atol=1e-5)


def test_fuse_distillation_step_matches_two_separate_passes():
    poly = make("bart")
    batch = random_batch("bart", 3)
    labels = torch.randint(3, 64, (3, 5))
    labels[0, -2:] = -100  # padding is left out of CE and KL
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    src, tgt = ["de", "fr", "en"], ["en", "en", "de"]
    fd = pp.fuse_distillation_step(poly, batch, src, tgt, kl_weight=1.0)
    language_logits = poly(**batch, src_lang=src, tgt_lang=tgt).logits
    shared_logits = poly(**batch, src_lang="shared").logits
    mask = labels != -100
    ce = lambda logits: torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    p, q = language_logits[mask].log_softmax(-1), shared_logits[mask].log_softmax(-1)
    kl = 0.5 * ((p.exp() * (p - q)).sum(-1) + (q.exp() * (q - p)).sum(-1)).mean()
    expected = 0.5 * (ce(language_logits) + ce(shared_logits)) + kl
    torch.testing.assert_close(fd.loss, expected)
    torch.testing.assert_close(fd.kl, kl)
    assert fd.kl > 0
    fd.loss.backward()
    layer = next(iter(poly.routed_layers.values()))
    assert layer.lms_F.grad[3].abs().sum() > 0 and layer.lms_F.grad[1].abs().sum() > 0


def test_fuse_distillation_step_on_a_causal_lm_predicts_the_next_token():
    """Labels of a causal LM are its inputs; FD scores logits[t] against labels[t + 1], as the model's loss does."""
    poly = make("llama")
    ids = random_batch("llama", 3)["input_ids"]
    langs = ["de", "fr", "en"]
    fd = pp.fuse_distillation_step(poly, {"input_ids": ids, "labels": ids}, langs, langs, kl_weight=1.0)
    own_language = poly(input_ids=ids, labels=ids, lang=langs).loss
    own_shared = poly(input_ids=ids, labels=ids, lang="shared").loss
    torch.testing.assert_close(fd.ce_language, own_language, check_dtype=False)
    torch.testing.assert_close(fd.ce_shared, own_shared, check_dtype=False)


def test_fuse_distillation_step_does_not_ask_the_model_for_its_own_loss():
    poly = make("bart")
    batch = random_batch("bart", 2)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "labels": torch.randint(3, 64, (2, 5))}
    seen = []
    poly.base_model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    pp.fuse_distillation_step(poly, batch, "de", "en")
    (kwargs,) = seen
    assert "labels" not in kwargs, "the model's loss is a wasted pass over the vocabulary"
    expected = poly.base_model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    torch.testing.assert_close(kwargs["decoder_input_ids"], torch.cat([expected, expected]))


@pytest.mark.parametrize("one_way", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fuse_distillation_loss_equals_its_parts_in_value_and_gradient(one_way, label_smoothing):
    """The loss shares one log-softmax per route; it must equal CE + KL composed from the public functions."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 11, (3, 4), generator=generator)
    labels[1, 2:] = -100
    logits = [torch.randn(3, 4, 11, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    fused = pp.fuse_distillation_loss(*logits, labels, kl_weight=0.7, one_way=one_way,
                                      label_smoothing=label_smoothing)
    twins = [t.detach().clone().requires_grad_(True) for t in logits]
    ce = [pp.token_cross_entropy(t, labels, label_smoothing) for t in twins]
    kl = (pp.one_way_kl if one_way else pp.symmetric_kl)(*twins, labels != -100)
    composed = 0.5 * (ce[0] + ce[1]) + 0.7 * kl
    torch.testing.assert_close(fused.loss, composed)
    torch.testing.assert_close((fused.ce_language, fused.ce_shared, fused.kl), (ce[0], ce[1], kl))
    fused.loss.backward()
    composed.backward()
    for mine, theirs in zip(logits, twins):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_one_way_kl_sends_gradients_to_the_student_only():
    teacher = torch.randn(2, 4, 10, requires_grad=True)
    student = torch.randn(2, 4, 10, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.bool)
    pp.one_way_kl(teacher, student, mask).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert float(pp.one_way_kl(student.detach(), student.detach(), mask)) == pytest.approx(0.0, abs=1e-6)
    both = pp.fuse_distillation_loss(teacher, student, torch.zeros(2, 4, dtype=torch.long), one_way=True)
    teacher.grad = None
    both.kl.backward()
    assert teacher.grad is None

"""Routes that hold where users run models: threads sharing one model, and gradient checkpointing,
whose recomputation runs during backward after the routes' context has closed."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

import polypeft as pp
from tiny_models import build, output_of, random_batch, randomize_added

LANGS = ["en", "de", "fr"]


def routed(kind: str, synthesis: str = "pair"):
    poly = pp.wrap(build(kind), pp.LMSConfig(languages=LANGS, rank=4, synthesis=synthesis))
    randomize_added(poly)
    return poly


def test_threads_sharing_one_model_each_see_their_own_routes():
    poly = routed("llama").eval()
    batch = random_batch("llama", 2)
    expected = {lang: output_of(poly, batch, lang=lang) for lang in ("de", "fr")}
    assert not torch.allclose(expected["de"], expected["fr"])
    wrong: list[str] = []
    start = threading.Barrier(2)

    def serve(lang: str) -> None:
        start.wait()
        for call in range(30):
            with torch.no_grad():
                out = output_of(poly, batch, lang=lang)
            if not torch.equal(out, expected[lang]):
                wrong.append(f"{lang} call {call}")

    threads = [threading.Thread(target=serve, args=(lang,)) for lang in ("de", "fr")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, f"calls that ran another thread's routes: {wrong[:5]} ({len(wrong)} of 60)"


def test_a_copied_model_routes_like_the_original():
    poly = routed("bart").eval()
    batch = random_batch("bart", 2)
    twin = copy.deepcopy(poly)
    torch.testing.assert_close(output_of(twin, batch, src_lang="de", tgt_lang="fr"),
                               output_of(poly, batch, src_lang="de", tgt_lang="fr"))


def gradients(poly, batch, src, tgt, checkpointing: dict | None) -> dict[str, torch.Tensor]:
    poly.zero_grad(set_to_none=True)
    if checkpointing is not None:
        poly.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    poly.train()
    for module in poly.modules():  # deterministic: recomputation must see the same activations
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    out = poly(**batch, src_lang=src, tgt_lang=tgt)
    loss = out.logits.pow(2).mean()  # backward() runs outside the routes' context
    loss.backward()
    return {name: p.grad.clone() for name, p in poly.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "bart"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(kind, use_reentrant):
    batch = random_batch(kind, 4)
    if kind == "llama":
        batch["input_ids"].requires_grad_(False)
    src, tgt = ["de", "fr", "en", "de"], ["en", "en", "fr", "fr"]
    reference = gradients(routed(kind), batch, src, tgt, checkpointing=None)
    checkpointed_model = routed(kind)
    checkpointed = gradients(checkpointed_model, batch, src, tgt, checkpointing={"use_reentrant": use_reentrant})
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed_model.modules()), "not checkpointing"
    factor_grads = [n for n in reference if "lms_" in n]
    assert factor_grads, "the LMS factors got no gradient"
    for name in factor_grads:
        assert name in checkpointed, f"{name} lost its gradient under checkpointing"
        torch.testing.assert_close(checkpointed[name], reference[name], msg=name)

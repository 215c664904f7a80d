"""The per-example routers bench compares like with like: equal trainable parameters, and every server of the
exported routes (peft's adapter_names, polylora) giving polypeft's outputs on a fully mixed batch."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import per_example_routers as bench  # noqa: E402  (a bench script: fails loudly if it breaks)

pytest.importorskip("peft")


def test_the_trained_routers_have_equal_trainable_parameters():
    _, counts = bench.training_steps(bench.build_base())
    routers = [counts[name] for name in ("polypeft LMS", "peft Poly (task_ids)", "peft MHR (task_ids, 4 splits)")]
    assert max(routers) / min(routers) < 1.003, counts  # the routers' mixing weights are all that differ
    assert counts["plain (full fine-tuning)"] > 10 * counts["polypeft LMS"]


def test_every_server_of_the_exported_routes_gives_polypeft_s_outputs(tmp_path):
    base = bench.build_base()
    poly = bench.polypeft_model(base).eval()
    served = bench.peft_adapters(poly, base, tmp_path / "routes")
    batch, langs = bench.mixed_batch(1)
    assert len(set(langs)) == len(langs) == 4
    with torch.no_grad():
        ours = poly(**batch, lang=langs).logits
        assert (ours - bench.build_base()(**batch).logits).abs().max() > 1e-3  # the routes change the outputs
        torch.testing.assert_close(served(**batch, adapter_names=langs).logits, ours, rtol=0, atol=1e-5)
    pytest.importorskip("polylora")  # the bench extra
    with torch.no_grad():
        polylora = bench.polylora_adapters(tmp_path / "routes", base)
        torch.testing.assert_close(polylora(**batch, adapter_ids=langs).logits, ours, rtol=0, atol=1e-5)

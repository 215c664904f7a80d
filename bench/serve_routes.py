"""Serving every language route with peft: the recipe a vLLM/LoRAX user follows, checked without a GPU.

Exports each LMS route of a Llama-style model as a PEFT adapter, loads them all into one peft model, runs
a mixed batch with `adapter_names=` and checks it per example against polypeft's routed forward; then
times polypeft's mixed-route forward against peft's on the same weights, interleaved round by round.
Usage: python bench/serve_routes.py [--device cpu|cuda] [--rounds N] [--json bench/experiments/serve_routes/serve_routes.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers as tf
from peft import PeftModel

import polypeft as pp
from core_speed import interleaved

LANGS = ["en", "de", "fr", "es", "ru", "ar", "ko", "it"]


def build_base(args) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=8000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                            num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                            max_position_embeddings=256)
    return tf.LlamaForCausalLM(config).to(args.device).eval()


def routed_model(args) -> pp.PolyModel:
    """LMS language-wise on every FFN linear, factors drawn at random so each route really differs."""
    poly = pp.wrap(build_base(args), pp.LMSConfig(languages=LANGS[: args.languages], rank=args.rank,
                                                  synthesis="language", freeze_base=True))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in poly.added_state_dict().values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return poly.eval()


def peft_with_every_route(args, folder: Path) -> tuple[PeftModel, list[str]]:
    index = json.loads((folder / "routes.json").read_text())
    names = [entry["name"] for entry in index["routes"]]
    model = PeftModel.from_pretrained(build_base(args), str(folder / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folder / name), adapter_name=name)
    return model.eval(), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--languages", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    poly = routed_model(args)
    langs = [LANGS[i % args.languages] for i in range(args.batch)]
    ids = torch.randint(4, 8000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device)}
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        index_path = poly.export_lora_routes(folder)
        commands = json.loads(index_path.read_text())["commands"]
        served, names = peft_with_every_route(args, Path(folder))
        routed = poly(**batch, lang=langs).logits
        through_peft = served(**batch, adapter_names=langs).logits
        alone = torch.cat([poly(**{k: v[i:i + 1] for k, v in batch.items()}, lang=langs[i]).logits
                           for i in range(args.batch)])
        difference = (through_peft - routed).abs().amax(dim=(1, 2))
        seconds = interleaved({
            "polypeft_mixed_routes": lambda: poly(**batch, lang=langs),
            "peft_adapter_names": lambda: served(**batch, adapter_names=langs),
        }, args.rounds, args.device)
    result = {
        "device": args.device,
        "torch": torch.__version__,
        "model": f"Llama {args.layers} layers, hidden {args.hidden}, FFN {args.hidden * 11 // 4}, vocab 8000",
        "routes": names,
        "rank": args.rank,
        "batch": f"{args.batch} x {args.length} tokens, routes {langs}",
        "max_abs_diff_per_example_peft_vs_polypeft": [float(d) for d in difference],
        "max_abs_diff_polypeft_mixed_vs_one_by_one": float((alone - routed).abs().max()),
        "equal_per_example": bool((difference < 1e-4).all()),
        "seconds_median": seconds,
        "peft_over_polypeft": seconds["peft_adapter_names"] / seconds["polypeft_mixed_routes"],
        "vllm_command": commands["vllm"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

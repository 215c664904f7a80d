"""Language modelling as a task: build (train once, cache, resume) the English-centric causal LM with the one
training loop, and measure it: perplexity on held-out verses and greedy continuations of prompts.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch
import transformers as tf
from tqdm.auto import tqdm

from ..backbones.causal_lm import (CausalLmSettings, CausalLmTokenizer, build_model, causal_lm_dir, load_causal_lm,
                                   mean_verse_lengths, mixture_weights, save_causal_lm, token_windows, tokenizer_for,
                                   training_verses)
from ..core.modes import evaluation_mode
from ..data.bible import BibleCorpus
from ..training.checkpoint import load_checkpoint
from ..training.loop import CHECKPOINT_NAME, train

__all__ = ["build_english_centric_lm", "continue_prompts", "language_model_loss", "mean_token_nll", "perplexity"]

VALID_BATCHES = 2  # batches of held-out windows (books `valid_books`) the build's validation loss is taken on


def language_model_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy of a packed window batch (no padding), and its token count."""
    ids = batch["input_ids"]
    return model(input_ids=ids, labels=ids).loss, ids.numel()


def build_english_centric_lm(settings: CausalLmSettings = CausalLmSettings(), cache_dir: Optional[str | Path] = None,
                             corpus: Optional[BibleCorpus] = None,
                             progress: bool = True) -> tuple[tf.LlamaForCausalLM, CausalLmTokenizer, dict]:
    """The model of `settings`: from the cache when it was built, else trained (resuming a stopped build).

    Returns the model (eval mode), its tokenizer and the build record (settings, wall time, step time,
    token shares, losses). The record's wall time counts only the training run that finished it.
    """
    corpus = corpus or BibleCorpus()
    tokenizer = tokenizer_for(settings, corpus)
    directory = causal_lm_dir(settings, cache_dir)
    model = load_causal_lm(directory)
    if model is not None:
        return model, tokenizer, json.loads((directory / "build.json").read_text(encoding="utf-8"))
    verses = training_verses(settings, tokenizer, "train", corpus)
    weights = mixture_weights(settings, verses)
    held_out = training_verses(settings, tokenizer, "valid", corpus)
    valid_stream = token_windows(held_out, weights, settings.seq_len, settings.batch_size, seed=settings.seed + 1)
    valid_batches = [next(valid_stream) for _ in range(VALID_BATCHES)]

    def valid_loss(model: torch.nn.Module) -> float:
        return sum(float(language_model_loss(model, batch)[0]) for batch in valid_batches) / len(valid_batches)

    model = build_model(settings, tokenizer)
    loop_settings = settings.loop_settings(progress)
    resume = (directory / CHECKPOINT_NAME).is_file()
    start_step = load_checkpoint(directory / CHECKPOINT_NAME)["step"] if resume else 0
    started = time.perf_counter()
    result = train(model, lambda: token_windows(verses, weights, settings.seq_len, settings.batch_size, settings.seed),
                   language_model_loss, loop_settings, run_dir=directory, resume=resume, valid_fn=valid_loss,
                   description="English-centric LM")
    wall = time.perf_counter() - started
    history = result["history"]
    record = {
        "settings": asdict(settings), "key": settings.key(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "verse_weights": weights, "token_shares": token_shares(verses, weights),
        "resumed_from_step": start_step, "wall_seconds_last_run": round(wall, 1),
        "seconds_per_step_last_run": round(wall / max(1, loop_settings.steps - start_step), 3),
        "final_loss": history[-1]["loss"],
        "valid_loss": [{"step": r["step"], "valid_loss": r["valid_loss"]} for r in history if "valid_loss" in r],
    }
    record = json.loads(json.dumps(record))  # as a later load reads it back: tuples become lists
    save_causal_lm(directory, model, record)
    return model.eval(), tokenizer, record


def token_shares(verses: dict[str, list[list[int]]], weights: dict[str, float]) -> dict[str, float]:
    """The expected share of training tokens per language under the verse weights."""
    mean_length = mean_verse_lengths(verses)
    total = sum(weights[code] * mean_length[code] for code in weights)
    return {code: round(weights[code] * mean_length[code] / total, 4) for code in weights}


def token_losses(model: torch.nn.Module, tokenizer: CausalLmTokenizer, texts: Sequence[str],
                 batch_size: int = 32, max_length: int = 128) -> list[torch.Tensor]:
    """Each text's negative log-likelihood per predicted token (every piece after bos, and the closing eos)."""
    per_text: list[torch.Tensor] = []
    device = next(model.parameters()).device
    with evaluation_mode(model):
        for start in range(0, len(texts), batch_size):
            rows = [tokenizer.encode(text, eos=True)[:max_length] for text in texts[start:start + batch_size]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for index, row in enumerate(rows):
                ids[index, :len(row)] = torch.tensor(row)
                mask[index, :len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            targets = ids[:, 1:].to(device)
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            keep = mask[:, 1:].to(device).bool()
            per_text.extend(losses[index][keep[index]].cpu() for index in range(len(rows)))
    return per_text


def mean_token_nll(model: torch.nn.Module, tokenizer: CausalLmTokenizer, texts: Sequence[str],
                   batch_size: int = 32, max_length: int = 128) -> float:
    """Mean negative log-likelihood per predicted token over all texts (what perplexity exponentiates)."""
    losses = token_losses(model, tokenizer, texts, batch_size, max_length)
    return float(sum(float(loss.sum()) for loss in losses)) / max(1, sum(loss.numel() for loss in losses))


def text_nll(model: torch.nn.Module, tokenizer: CausalLmTokenizer, texts: Sequence[str],
             batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """Each text's mean token NLL: per-example scores, so a layer search can tell a gain from noise."""
    return torch.stack([loss.mean() for loss in token_losses(model, tokenizer, texts, batch_size, max_length)])


def perplexity(model: torch.nn.Module, tokenizer: CausalLmTokenizer, texts: Sequence[str], batch_size: int = 32) -> float:
    return math.exp(mean_token_nll(model, tokenizer, texts, batch_size))


def continue_prompts(model: torch.nn.Module, tokenizer: CausalLmTokenizer, prompts: Sequence[str],
                     new_tokens: int = 24, batch_size: int = 32, progress: bool = False) -> list[str]:
    """Greedy continuations (the new text only) of `prompts`; generation stops early at eos."""
    device = next(model.parameters()).device
    continuations = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: prompts must end at the same column
    try:
        with evaluation_mode(model):
            for start in tqdm(range(0, len(prompts), batch_size), desc="continuations", disable=not progress):
                batch = {name: tensor.to(device) for name, tensor in tokenizer(prompts[start:start + batch_size]).items()}
                output = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                width = batch["input_ids"].shape[1]
                continuations.extend(tokenizer.decode(row[width:].tolist()) for row in output)
    finally:
        tokenizer.padding_side = side
    return continuations

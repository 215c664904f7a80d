"""Translation quality per direction: beam search, sacreBLEU (13a) and chrF, en→xx and xx→en averages.

Decoding runs one direction at a time, so every batch takes the one-matmul route path.
"""
from __future__ import annotations

from collections import defaultdict
from statistics import mean
from typing import Callable, Optional, Sequence

import sacrebleu
import torch
from tqdm.auto import tqdm

from ...backbones.warm_start import decoder_start_column
from ...data.parallel import ParallelExample


def translate(
    model,
    tokenizer,
    examples: Sequence[ParallelExample],
    beam: int = 5,
    length_penalty: float = 1.0,
    batch_size: int = 32,
    route: Optional[str] = None,
    max_source_length: int = 256,
    max_new_tokens: int = 256,
    progress: bool = True,
) -> list[str]:
    """Hypotheses in the order of `examples`; `route` (e.g. "shared") overrides the language routes.

    Output length is 1.5 x the source + 10 tokens, capped at `max_new_tokens`.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: (examples[i].direction, len(examples[i].src)))
    hypotheses: list[str] = [""] * len(examples)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc="translating", disable=not progress, leave=False):
        batch = [examples[i] for i in chunk]
        sources = [tokenizer.encode(e.src, lang_tag=e.tgt_lang)[:max_source_length] for e in batch]
        width = max(len(s) for s in sources)
        input_ids = torch.tensor([s + [tokenizer.pad_id] * (width - len(s)) for s in sources], device=device)
        attention_mask = (input_ids != tokenizer.pad_id).long()
        extra = {}  # the routes of a routed model, and a per-language decoder start where the model has one
        if hasattr(model, "registry"):
            if route is not None:
                extra = {"src_lang": route, "tgt_lang": route}
            else:
                extra = {"src_lang": [e.src_lang for e in batch], "tgt_lang": [e.tgt_lang for e in batch]}
        starts = decoder_start_column(model.config, [e.tgt_lang for e in batch])
        if starts is not None:  # one start per row (generate puts bos before given decoder_input_ids)
            extra["decoder_start_token_id"] = starts.to(device)
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, num_beams=beam, length_penalty=length_penalty,
                max_new_tokens=min(int(width * 1.5) + 10, max_new_tokens), early_stopping=True, **extra,
            )
        for i, ids in zip(chunk, output.tolist()):
            hypotheses[i] = tokenizer.decode(ids)
    return hypotheses


def score_directions(
    examples: Sequence[ParallelExample], hypotheses: Sequence[str], pivot: str = "en"
) -> dict:
    """BLEU and chrF per direction, and the en→xx / xx→en / all averages of each."""
    grouped: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for example, hypothesis in zip(examples, hypotheses):
        hyps, refs = grouped[f"{example.src_lang}-{example.tgt_lang}"]
        hyps.append(hypothesis)
        refs.append(example.tgt)
    directions = {}
    for name in sorted(grouped):
        hyps, refs = grouped[name]
        directions[name] = {
            "bleu": round(sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score, 2),
            "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2),
            "sentences": len(hyps),
        }
    return {"directions": directions, "averages": averages(directions, pivot)}


def sentences_by_direction(examples: Sequence[ParallelExample], hypotheses: Sequence[str]) -> dict:
    """Per direction, each verse's id (book:chapter:verse), hypothesis and sacreBLEU (13a) sufficient statistics (hypothesis
    and reference length, then matches and totals of 1- to 4-grams): their sum over any resample of the verses is
    that resample's corpus BLEU, so intervals and paired tests need no second decoding."""
    bleu = sacrebleu.metrics.BLEU(tokenize="13a", effective_order=True)  # changes the sentence score, not its counts
    grouped: dict[str, dict[str, list]] = defaultdict(lambda: {"verse_ids": [], "hypotheses": [], "bleu_statistics": []})
    for example, hypothesis in zip(examples, hypotheses):
        score = bleu.sentence_score(hypothesis, [example.tgt])
        rows = grouped[f"{example.src_lang}-{example.tgt_lang}"]
        rows["verse_ids"].append(example.ref)
        rows["hypotheses"].append(hypothesis)
        rows["bleu_statistics"].append([score.sys_len, score.ref_len, *score.counts, *score.totals])
    return {name: grouped[name] for name in sorted(grouped)}


def averages(directions: dict, pivot: str = "en") -> dict:
    def average(select: Callable[[str], bool], metric: str) -> Optional[float]:
        values = [d[metric] for name, d in directions.items() if select(name)]
        return round(mean(values), 2) if values else None

    out_of_pivot = lambda name: name.startswith(f"{pivot}-")
    into_pivot = lambda name: name.endswith(f"-{pivot}")
    return {
        f"{metric}_{label}": average(select, metric)
        for metric in ("bleu", "chrf")
        for label, select in ((f"{pivot}_xx", out_of_pivot), (f"xx_{pivot}", into_pivot), ("all", lambda n: True))
    }


def win_ratio(candidate: dict, baseline: dict, metric: str = "bleu") -> float:
    """Fraction of shared directions where the candidate scores higher than the baseline."""
    shared = sorted(set(candidate) & set(baseline))
    if not shared:
        raise ValueError("win ratio: the two runs share no direction")
    return sum(candidate[d][metric] > baseline[d][metric] for d in shared) / len(shared)

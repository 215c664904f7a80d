"""FD's training step against its bound (the doubled batch with a plain CE), as ratios measured side by side.

On the tiny translation model and an e5-shaped classifier, every variant interleaved in one process.

Usage: python bench/fd_speed.py [--batch 128] [--length 32] [--repeats 5] [--json bench/experiments/fd_speed/fd_speed.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Callable

import torch
from torch.nn import functional as F

import polypeft as pp
from polypeft.backbones.seq2seq import build_translation_model
from polypeft.core.fileio import write_json
from polypeft.methods.fd import fuse_distillation_step, model_inputs, token_cross_entropy

LANGUAGES = ["en", "fr", "es", "de", "ru", "ar", "ko"]
ATTENTION_AND_FFN = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
LABEL_SMOOTHING = 0.1


def previous_fd_loss(language_logits: torch.Tensor, shared_logits: torch.Tensor, labels: torch.Tensor,
                     label_smoothing: float) -> torch.Tensor:
    """The FD loss as src/ computed it before the fused pass (masked copies, autograd through every op),
    kept only here as the 'before' of the comparison."""
    mask = labels != -100
    log_language = F.log_softmax(language_logits[mask].float(), -1)
    log_shared = F.log_softmax(shared_logits[mask].float(), -1)
    targets = labels[mask]

    def smoothed_nll(log_probs: torch.Tensor) -> torch.Tensor:
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return ((1 - label_smoothing) * nll - label_smoothing * log_probs.mean(-1)).mean()

    kl = (0.5 * ((log_language.exp() - log_shared.exp()) * (log_language - log_shared)).sum(-1)).mean()
    return 0.5 * (smoothed_nll(log_language) + smoothed_nll(log_shared)) + kl


def interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds of each step, the order reversed every round so no variant always runs first."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(warmup + repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            steps[name]()
            sync()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def translation_batch(batch: int, length: int, vocabulary: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocabulary, (batch, length), generator=generator)
    labels = torch.randint(4, vocabulary, (batch, length), generator=generator)
    decoder = torch.cat([torch.full((batch, 1), 3), labels[:, :-1]], dim=1)
    return {key: value.to(device) for key, value in
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": decoder,
             "labels": labels}.items()}


def translation_steps(batch: dict[str, torch.Tensor], vocabulary: int, device: str) -> dict[str, Callable[[], None]]:
    """naive, LMS, the doubled batch with a plain CE (the bound), and the FD step before and after."""
    torch.manual_seed(0)
    naive = build_translation_model("tiny", vocabulary, pad_id=1, eos_id=2, decoder_start_id=3).to(device).train()
    config = pp.LMSConfig(languages=LANGUAGES, rank=8, synthesis="pair", shared_route=True,
                          target_modules=ATTENTION_AND_FFN, freeze_base=False)  # trains like naive
    lms = pp.wrap(copy.deepcopy(naive), config).train()
    size = batch["labels"].shape[0]
    src = [LANGUAGES[1 + i % (len(LANGUAGES) - 1)] for i in range(size)]
    tgt = ["en"] * size
    labels = batch["labels"]
    inputs = model_inputs(lms, batch)
    doubled = {key: torch.cat([value, value]) for key, value in inputs.items()}
    doubled_routes = {"src_lang": src + ["shared"] * size, "tgt_lang": tgt + ["shared"] * size}

    def step(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            loss().backward()
        return run

    def previous_fd() -> torch.Tensor:
        language, shared = lms(**doubled, **doubled_routes).logits.split(size)
        return previous_fd_loss(language, shared, labels, LABEL_SMOOTHING)

    return {
        "naive": step(naive, lambda: token_cross_entropy(naive(**inputs).logits, labels, LABEL_SMOOTHING)),
        "lms": step(lms, lambda: token_cross_entropy(lms(**inputs, src_lang=src, tgt_lang=tgt).logits, labels,
                                                     LABEL_SMOOTHING)),
        "doubled_ce": step(lms, lambda: token_cross_entropy(lms(**doubled, **doubled_routes).logits,
                                                            torch.cat([labels, labels]), LABEL_SMOOTHING)),
        "fd_before": step(lms, previous_fd),
        "fd_after": step(lms, lambda: fuse_distillation_step(lms, batch, src, tgt,
                                                             label_smoothing=LABEL_SMOOTHING).loss),
    }


def ratios(seconds: dict[str, float]) -> dict[str, dict[str, float]]:
    return {"over_lms": {k: round(v / seconds["lms"], 3) for k, v in seconds.items()},
            "over_naive": {k: round(v / seconds["naive"], 3) for k, v in seconds.items()}}


def measure_translation(batch: int = 128, length: int = 32, vocabulary: int = 8000, repeats: int = 5,
                        device: str = "cpu") -> dict:
    """The tiny translation preset, fr/es/...->en, LMS rank 8 on attention and FFN."""
    data = translation_batch(batch, length, vocabulary, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = interleaved(translation_steps(data, vocabulary, device), repeats, sync=sync)
    return {"model": "tiny translation preset", "batch": batch, "length": length, "vocabulary": vocabulary,
            "repeats": repeats, "device": device, "seconds": {k: round(v, 4) for k, v in seconds.items()},
            **ratios(seconds)}


def e5_shaped_encoder(layers: int, hidden: int = 384, vocabulary: int = 8000) -> torch.nn.Module:
    """multilingual-e5-small's shape (384 wide, FFN 1536, 12 heads), randomly initialised, smaller vocabulary."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocabulary, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 32), intermediate_size=4 * hidden,
                        max_position_embeddings=512)
    return BertModel(config, add_pooling_layer=False).eval()


def measure_classifier(batch: int = 32, length: int = 64, layers: int = 12, repeats: int = 5,
                       examples: int = 256) -> dict:
    """naive, LMS and LMS+FD training steps of the encoder fine-tuning task, all layers trained."""
    from polypeft.tasks import encoder_finetune as ef

    generator = torch.Generator().manual_seed(0)
    langs = ["en", "fr", "de", "es"]
    items = [torch.randint(4, 8000, (length,), generator=generator) for _ in range(examples)]
    train = ef.EncodedExamples(items, torch.randint(0, 3, (examples,), generator=generator),
                               [langs[i % len(langs)] for i in range(examples)])
    encoder = e5_shaped_encoder(layers)
    settings = ef.FinetuneSettings.from_values(method="lms", steps=1, batch_size=batch, max_length=length, rank=8,
                                               warmup=1)
    classifiers = {name: ef.build_classifier(encoder, ["a", "b", "c"], langs, settings.replaced(method=name))
                   for name in ("naive", "lms", "lms_fd")}
    throughput = ef.measure_throughput(classifiers, train, settings, steps=repeats, warmup_steps=1, progress=False)
    rates = throughput["examples_per_s"]
    seconds = {name: batch / rate for name, rate in rates.items()}
    return {"model": f"e5-small-shaped encoder, {layers} layers", "batch": batch, "length": length,
            "repeats": repeats, "seconds": {k: round(v, 4) for k, v in seconds.items()},
            "fd_over_lms": round(seconds["lms_fd"] / seconds["lms"], 3),
            "fd_over_naive": round(seconds["lms_fd"] / seconds["naive"], 3)}


def translation_table(translation: dict) -> list[str]:
    """The translation measurement as Markdown: a line saying what ran, then seconds and ratios per step."""
    lines = [f"FD step, {translation['model']}, batch {translation['batch']} x {translation['length']} tokens, "
             f"vocabulary {translation['vocabulary']}, median of {translation['repeats']} interleaved rounds "
             f"({translation['device']}):", "", "| step | seconds | / LMS | / naive |", "|---|---|---|---|"]
    over_lms, over_naive = translation["over_lms"], translation["over_naive"]
    return lines + [f"| {name} | {value:.4f} | {over_lms[name]:.2f} | {over_naive[name]:.2f} |"
                    for name, value in translation["seconds"].items()]


def markdown(results: dict) -> str:
    lines = translation_table(results["translation"])
    if "classifier" in results:
        classifier = results["classifier"]
        lines += ["", f"{classifier['model']}, batch {classifier['batch']} x {classifier['length']}: LMS+FD step "
                      f"{classifier['fd_over_lms']:.2f}x LMS, {classifier['fd_over_naive']:.2f}x naive "
                      f"(seconds {classifier['seconds']})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="translation sentences per batch")
    parser.add_argument("--length", type=int, default=32, help="tokens per sentence, source and target")
    parser.add_argument("--vocabulary", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--classifier-batch", type=int, default=32)
    parser.add_argument("--classifier-layers", type=int, default=12)
    parser.add_argument("--skip-classifier", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default="bench/experiments/fd_speed/fd_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"threads": torch.get_num_threads(),
               "translation": measure_translation(args.batch, args.length, args.vocabulary, args.repeats, args.device)}
    if not args.skip_classifier:
        results["classifier"] = measure_classifier(args.classifier_batch, layers=args.classifier_layers,
                                                   repeats=args.repeats)
    print(markdown(results))
    write_json(args.json, results)
    print(json.dumps({"json": args.json}))


if __name__ == "__main__":
    main()

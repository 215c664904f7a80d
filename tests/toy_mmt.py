"""A word-for-word toy translation corpus and recipe, shared by the translation and FLARE-MT tests."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from polypeft.data.parallel import ParallelExample
from polypeft.data.spm import train_spm
import torch

from polypeft.tasks.translation.run import MMTData, MMTRecipe, batch_stream, make_loss_fn

WORDS = {
    "en": ["house", "water", "light", "bread", "king", "river", "stone", "night"],
    "de": ["haus", "wasser", "licht", "brot", "koenig", "fluss", "stein", "nacht"],
    "fr": ["maison", "eau", "lumiere", "pain", "roi", "fleuve", "pierre", "nuit"],
}


def sentences(lang: str, count: int) -> list[str]:
    words = WORDS[lang]
    return [" ".join(words[(i * 3 + k) % 8] for k in range(4 + i % 3)) for i in range(count)]


def toy_data(directory: Path) -> MMTData:
    """en<->de, en<->fr, 24 sentences each: learnable in a few hundred steps."""
    corpus = {lang: sentences(lang, 24) for lang in WORDS}
    tokenizer = train_spm([s for lang in WORDS for s in corpus[lang]], list(WORDS), directory / "t.model",
                          vocab_size=34, model_type="word")
    examples = [ParallelExample(s, t, corpus[s][i], corpus[t][i], str(i))
                for i in range(24) for s, t in (("en", "de"), ("de", "en"), ("en", "fr"), ("fr", "en"))]
    return MMTData(tokenizer, examples, examples[:8], examples[:8])


def toy_recipe(output_dir, method, **changes) -> MMTRecipe:
    # Flat keys, as recipes written before the training block: `steps`, `lr`, ... still read into it.
    base = MMTRecipe.from_dict({"name": method["name"], "languages": list(WORDS), "method": method, "steps": 6,
                                "warmup": 2, "lr": 3e-3, "max_tokens": 256, "max_length": 16, "checkpoint_every": 3,
                                "dropout": 0.1, "output_dir": str(output_dir), "beam": 2, **changes})
    return base


def mean_loss(model, data: MMTData, recipe: MMTRecipe, batches: int = 4) -> float:
    """The model's mean unsmoothed loss over the first `batches` training batches: did training lower it?"""
    loss_fn = make_loss_fn(dataclasses.replace(recipe, label_smoothing=0.0))
    stream = batch_stream(recipe, data, model.config)
    model.eval()
    with torch.no_grad():
        return sum(float(loss_fn(model, next(stream))[0]) for _ in range(batches)) / batches


def tiny_bert_folder(folder: Path, unused: tuple[str, ...] | list[str] = ()) -> Path:
    """A local folder holding a 3-layer BertModel and a Unigram tokenizer over the toy words (plus `unused`
    ones): e5-small's stand-in for the warm start, seconds instead of minutes."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = [w for lang in WORDS for w in WORDS[lang]] + list(unused)
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    backend = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                           sep_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=48, max_position_embeddings=64, pad_token_id=1),
                        add_pooling_layer=False)
    bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

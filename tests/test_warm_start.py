"""The warm-started translation model: a tiny BERT with its own Unigram tokenizer stands in for e5-small."""
from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import polypeft as pp
from polypeft.backbones.warm_start import WarmStart, build_warm_model
from polypeft.core.routed import RoutedLinear
from polypeft.data import pruned_vocab
from polypeft.data.parallel import ParallelExample
from polypeft.cli.main import print_scores
from polypeft.tasks.confidence import bleu_intervals, corpus_bleu
from polypeft.data.pruned_vocab import PrunedTokenizer, pruned_tokenizer
from polypeft.tasks.translation.evaluate import translate
from polypeft.tasks.translation.run import (MMTData, MMTRecipe, batch_stream, build_model, evaluate_run,
                                            load_translation_model, make_loss_fn, train_run)
from polypeft.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from toy_mmt import WORDS, mean_loss, sentences, tiny_bert_folder

ROOT = Path(__file__).resolve().parents[1]
UNUSED = ["zebra", "quartz", "vulkan"]  # pieces of the base vocabulary no toy sentence uses


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("tiny_bert"), UNUSED)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYPEFT_CACHE", str(tmp_path / "cache"))


def toy_examples(count: int = 24) -> list[ParallelExample]:
    """de->en and fr->en, word for word (xx->en, the warm start's first directions)."""
    corpus = {lang: sentences(lang, count) for lang in WORDS}
    return [ParallelExample(src, "en", corpus[src][i], corpus["en"][i], str(i)) for i in range(count) for src in ("de", "fr")]


def toy_tokenizer(base_dir) -> PrunedTokenizer:
    train = toy_examples()
    return pruned_tokenizer(tf.AutoTokenizer.from_pretrained(base_dir), [e.src for e in train], [e.tgt for e in train],
                            ["en"])


def warm_recipe(output_dir, base_dir, method=None, training=None, **changes) -> MMTRecipe:
    return MMTRecipe.from_dict({
        "name": "warm", "languages": ["en", "de", "fr"], "directions": "into_pivot", "method": method or {"name": "naive"},
        "base": {"encoder": str(base_dir), "decoder_layers": 2, "decoder_init": "upper", "frozen_layers": 1},
        "training": {"steps": 6, "warmup": 2, "lr": 3e-3, "checkpoint_every": 3, "valid_every": 0, **(training or {})},
        "max_tokens": 256, "max_length": 16, "dropout": 0.1, "output_dir": str(output_dir), "beam": 2, **changes})


def test_pruning_maps_ids_both_ways_and_keeps_every_corpus_piece(base_dir, tmp_path):
    base = tf.AutoTokenizer.from_pretrained(base_dir)
    tokenizer = toy_tokenizer(base_dir)
    train = toy_examples()
    for side, texts in ((tokenizer.source, [e.src for e in train]), (tokenizer.target, [e.tgt for e in train])):
        used = {i for text in texts for i in base(text, add_special_tokens=False)["input_ids"]}
        assert used <= set(side.kept), "every piece the corpus uses is kept"
        assert set(side.kept) == used | {0, 1, 2, 3}, "and nothing else"
        assert side.to_old(side.to_new(sorted(used))) == sorted(used)
        assert side.to_new(side.to_old(range(len(side)))) == list(range(len(side)))
    unused = base.convert_tokens_to_ids(["\u2581" + w for w in UNUSED])
    assert tokenizer.source.to_new(unused) == [tokenizer.unk_id] * 3
    assert len(tokenizer.target) < len(tokenizer.source) < len(base), "xx->en: the decoder's side holds English only"
    text = train[0].tgt
    assert tokenizer.decode(tokenizer.encode(text)) == text
    source = tokenizer.encode(train[0].src, lang_tag="en")
    assert source[0] == tokenizer.lang_tag_id("en") == tokenizer.source_vocab_size - 1 and source[-1] == tokenizer.eos_id
    assert tokenizer.source.to_old([tokenizer.bos_id, *source[1:]]) == base(train[0].src)["input_ids"], "e5's format"
    # the mapping is cached under the cache root and read back, not rebuilt
    cached = list((tmp_path / "cache" / "pruned_vocab").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["source"] == list(tokenizer.source.kept)
    original, pruned_vocab.build_mapping = pruned_vocab.build_mapping, None
    try:
        assert toy_tokenizer(base_dir).mapping == tokenizer.mapping
    finally:
        pruned_vocab.build_mapping = original
    # the run folder's copy loads without the base or the corpus
    again = PrunedTokenizer.load(tokenizer.save(tmp_path / "saved"))
    assert again.encode(train[1].src, lang_tag="en") == tokenizer.encode(train[1].src, lang_tag="en")


def test_the_warm_encoder_equals_the_pretrained_one_on_pruned_inputs(base_dir):
    tokenizer = toy_tokenizer(base_dir)
    pretrained = tf.BertModel.from_pretrained(base_dir, add_pooling_layer=False).eval()
    model = build_warm_model(WarmStart(encoder=str(base_dir), decoder_layers=2, frozen_layers=1), tokenizer).eval()
    inputs = tokenizer([e.src for e in toy_examples()[:6]])
    old_ids = torch.tensor([tokenizer.source.to_old(row) for row in inputs["input_ids"].tolist()])
    expected = pretrained(input_ids=old_ids, attention_mask=inputs["attention_mask"]).last_hidden_state
    torch.testing.assert_close(model.encoder(**inputs).last_hidden_state, expected, rtol=0, atol=0)
    tagged = tokenizer([e.src for e in toy_examples()[:6]], lang_tag="en")  # a tag starts as bos's row
    torch.testing.assert_close(model.encoder(**tagged).last_hidden_state, expected, rtol=0, atol=0)
    # the decoder starts from the top layers, its output tied to its pruned input rows
    top = pretrained.encoder.layer[-1]
    torch.testing.assert_close(model.decoder.bert.encoder.layer[-1].intermediate.dense.weight, top.intermediate.dense.weight)
    words = pretrained.embeddings.word_embeddings.weight
    torch.testing.assert_close(model.decoder.get_output_embeddings().weight, words[list(tokenizer.target.kept)])
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("encoder.embeddings.", "encoder.encoder.layer.0.")) for n in frozen)
    assert model.encoder.encoder.layer[1].output.dense.weight.requires_grad


@pytest.mark.slow
def test_a_tiny_warm_run_trains_saves_resumes_and_translates(base_dir, tmp_path, capsys):
    data = MMTData(toy_tokenizer(base_dir), toy_examples(), toy_examples()[:8], toy_examples()[:8])
    full = warm_recipe(tmp_path / "full", base_dir)
    train_run(full, data=data)
    cut = warm_recipe(tmp_path / "cut", base_dir, training={"steps": 3})
    train_run(cut, data=data)
    resumed = dataclasses.replace(cut, training=dataclasses.replace(cut.training, steps=6))
    train_run(resumed, data=data, resume=True)
    assert load_checkpoint(cut.run_dir / CHECKPOINT_NAME)["step"] == 6
    from safetensors.torch import load_file

    a, b = load_file(str(full.run_dir / "model.safetensors")), load_file(str(cut.run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # longer, it learns: the loss falls and the run folder alone translates
    longer = warm_recipe(tmp_path / "long", base_dir, training={"steps": 60, "lr": 5e-3, "warmup": 5},
                         max_eval_verses=3)
    before = mean_loss(build_model(longer, data.tokenizer), data, longer)
    recipe, tokenizer, model = load_translation_model(train_run(longer, data=data))
    assert mean_loss(model, data, longer) < before - 1.0
    assert isinstance(tokenizer, PrunedTokenizer) and recipe.base == longer.base
    hypotheses = translate(model, tokenizer, data.test, beam=2, max_new_tokens=12, progress=False)
    assert len(hypotheses) == len(data.test) and any(hypotheses)
    assert all(set(h.split()) <= set(WORDS["en"]) for h in hypotheses), hypotheses
    # scored, each verse's hypothesis and BLEU statistics are kept, so intervals need no second decoding
    results = evaluate_run(recipe.run_dir, data=data)
    sentences = results["variants"]["default"]["sentences"]
    assert sorted(sentences) == ["de-en", "fr-en"] and results["pivot"] == "en"
    for direction, rows in sentences.items():
        kept = [e for e in data.test if f"{e.src_lang}-{e.tgt_lang}" == direction]
        assert rows["verse_ids"] == [e.ref for e in kept] and len(rows["hypotheses"]) == len(kept)
        summed = np.sum(rows["bleu_statistics"], axis=0)
        assert corpus_bleu(summed) == pytest.approx(results["variants"]["default"]["directions"][direction]["bleu"],
                                                    abs=0.006)
    # one of its test books alone, with the run's own tokenizer: the verses a run holding out that book draws
    john = evaluate_run(recipe.run_dir, books=[43])
    from polypeft.data.bible import BibleCorpus

    drawn = random.Random("bible-test").sample(BibleCorpus().parallel(["en", "de", "fr"], books=[43]), 3)
    assert john["books"] == [43] and (recipe.run_dir / "eval_test_books-43.json").is_file()
    assert john["variants"]["default"]["sentences"]["fr-en"]["verse_ids"] == [row["ref"] for row in drawn]
    with pytest.raises(pp.ConfigError, match=r"books=\[1, 43\]: \[1\] not among the run's test_books \[43\]"):
        evaluate_run(recipe.run_dir, books=[1, 43])
    print_scores(results)  # what `polypeft mmt eval` prints: the averages, then their intervals
    printed = capsys.readouterr().out
    xx_en = bleu_intervals(sentences)["xx_en"]
    assert f"BLEU 95 % intervals (verses resampled): xx_en [{xx_en['low']:.2f}, {xx_en['high']:.2f}]" in printed


def test_lms_wraps_the_warm_model_on_both_sides(base_dir, tmp_path):
    data = MMTData(toy_tokenizer(base_dir), toy_examples(), [], [])
    recipe = warm_recipe(tmp_path, base_dir, method={"name": "lms", "rank": 2, "synthesis": "language"})
    model = build_model(recipe, data.tokenizer)
    assert isinstance(model, pp.PolyModel)
    routed = [name for name, module in model.named_modules() if isinstance(module, RoutedLinear)]
    assert any(".encoder.encoder.layer.2.intermediate.dense" in name for name in routed)
    assert any(".decoder.bert.encoder.layer.1.output.dense" in name for name in routed)
    assert not any("attention" in name for name in routed), "LMS's default targets are the FFN linears"
    assert not model.get_base_model().encoder.encoder.layer[0].output.dense.weight.requires_grad, "still frozen"
    batch = next(batch_stream(recipe, data, model.config))
    loss, _ = make_loss_fn(recipe)(model, batch)
    loss.backward()
    factors = [p for name, p in model.named_parameters() if p.requires_grad and "decoder.bert" in name and p.grad is not None]
    assert factors and any(float(p.grad.abs().sum()) > 0 for p in factors)


def test_frozen_embeddings_refuse_several_target_languages(base_dir, tmp_path):
    with pytest.raises(pp.ConfigError, match=r"base.frozen_layers=1 .* 3 target languages"):
        warm_recipe(tmp_path, base_dir, directions="both")
    assert warm_recipe(tmp_path, base_dir, directions="both", base={"encoder": str(base_dir)}).base.frozen_layers == 0
    started = warm_recipe(tmp_path, base_dir, directions="both",
                          base={"encoder": str(base_dir), "frozen_layers": 1, "decoder_start": "language"})
    assert started.base.decoder_start == "language", "each target's own decoder start tells them apart"
    with pytest.raises(pp.ConfigError, match="base.decoder_init='middle' is not allowed"):
        warm_recipe(tmp_path, base_dir, base={"encoder": str(base_dir), "decoder_init": "middle"})


@pytest.mark.slow
def test_a_frozen_encoder_translates_into_several_languages_from_per_language_decoder_starts(base_dir, tmp_path):
    corpus = {lang: sentences(lang, 24) for lang in WORDS}
    pairs = [("de", "en"), ("fr", "en"), ("en", "de"), ("en", "fr")]
    train = [ParallelExample(s, t, corpus[s][i], corpus[t][i], str(i)) for i in range(24) for s, t in pairs]
    tokenizer = pruned_tokenizer(tf.AutoTokenizer.from_pretrained(base_dir), [e.src for e in train],
                                 [e.tgt for e in train], ["en", "de", "fr"], target_tags=["en", "de", "fr"])
    assert sorted(tokenizer.decoder_starts.values()) == list(range(len(tokenizer.target), tokenizer.vocab_size))
    recipe = warm_recipe(tmp_path, base_dir, directions="both", max_eval_verses=3,
                         base={"encoder": str(base_dir), "decoder_layers": 2, "frozen_layers": 3,
                               "decoder_start": "language"},
                         training={"steps": 600, "lr": 5e-3, "warmup": 5})
    data = MMTData(tokenizer, train, train[:8], [e for e in train if e.src_lang == "en"][:12])
    model = build_model(recipe, tokenizer)
    assert not any(p.requires_grad for p in model.encoder.parameters()), "the whole encoder is frozen"
    batch = next(batch_stream(recipe, data, model.config))
    assert batch["decoder_input_ids"][:, 0].tolist() == [tokenizer.decoder_starts[lang] for lang in batch["tgt_lang"]]
    _, tokenizer, model = load_translation_model(train_run(recipe, data=data))
    generated = []
    generate = model.generate
    model.generate = lambda **inputs: generated.append(generate(**inputs)) or generated[-1]
    hypotheses = translate(model, tokenizer, data.test, beam=2, max_new_tokens=12, progress=False)
    for example, hypothesis in zip(data.test, hypotheses):
        assert hypothesis and set(hypothesis.split()) <= set(WORDS[example.tgt_lang]), (example, hypothesis)
    assert sum(h == e.tgt for h, e in zip(hypotheses, data.test)) >= len(data.test) // 2, hypotheses
    first = Counter(int(row[0]) for output in generated for row in output)
    assert first == Counter(tokenizer.decoder_starts[e.tgt_lang] for e in data.test), "decoding starts as training did"
    assert {e.tgt_lang for e in data.test} == {"de", "fr"}, "both targets read the same English sources"


def test_a_second_command_is_refused_while_one_builds_the_folder(base_dir, tmp_path, monkeypatch):
    from filelock import FileLock

    from polypeft.tasks.translation import cached as cached_module
    from polypeft.tasks.translation.cached import BuildInProgressError, build_cached, cached_recipe

    data = MMTData(toy_tokenizer(base_dir), toy_examples(), toy_examples()[:8], toy_examples()[:8])
    recipe = warm_recipe(tmp_path / "ignored", base_dir)
    run_dir = cached_recipe(recipe, tmp_path / "cache").run_dir
    trained = []
    monkeypatch.setattr(cached_module, "train_run", lambda *args, **kwargs: trained.append(kwargs))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(run_dir.with_name(run_dir.name + ".lock")):  # the first command, still building
        with pytest.raises(BuildInProgressError, match=f"another command is building {re.escape(str(run_dir))}"):
            build_cached(recipe, data=data, cache_dir=tmp_path / "cache")
    assert trained == [], "refused before it touched the folder"
    build_cached(recipe, data=data, cache_dir=tmp_path / "cache")  # the first one finished or died: the lock is free
    assert len(trained) == 1
    with FileLock(run_dir.with_name(run_dir.name + ".lock"), timeout=0):  # and let go after the build
        pass

    class FinishedWhileWaiting(FileLock):  # the command holding the lock finishes the build as this one takes it
        def acquire(self, *args, **kwargs):
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "model.safetensors").write_bytes(b"")
            return super().acquire(*args, **kwargs)

    monkeypatch.setattr(cached_module, "FileLock", FinishedWhileWaiting)
    assert build_cached(recipe, data=data, cache_dir=tmp_path / "cache") == run_dir
    assert len(trained) == 1, "reused, not trained again"


@pytest.mark.slow
def test_a_cached_build_is_reused_and_a_stopped_one_continues(base_dir, tmp_path, monkeypatch, capsys):
    from polypeft.tasks.translation import run as mmt
    from polypeft.tasks.translation import cached as cached_module
    from polypeft.tasks.translation.cached import build_cached, cached_recipe, recipe_key

    data = MMTData(toy_tokenizer(base_dir), toy_examples(), toy_examples()[:8], toy_examples()[:8])
    recipe = warm_recipe(tmp_path / "ignored", base_dir)
    straight = build_cached(recipe, data=data, cache_dir=tmp_path / "straight")
    assert straight == tmp_path / "straight" / f"warm-{recipe_key(recipe)}-seed0"
    written = (straight / "model.safetensors").stat().st_mtime_ns
    assert build_cached(recipe, data=data, cache_dir=tmp_path / "straight") == straight  # reused, not retrained
    assert (straight / "model.safetensors").stat().st_mtime_ns == written
    renamed = dataclasses.replace(recipe, name="same-settings-other-name")
    assert build_cached(renamed, data=data, cache_dir=tmp_path / "straight") == straight, "not built twice"
    assert (straight / "model.safetensors").stat().st_mtime_ns == written
    own = tmp_path / "straight" / f"same-settings-other-name-{recipe_key(recipe)}-seed0"
    shutil.copytree(straight, own)  # where a recipe's own finished build exists, it is its own
    assert cached_recipe(renamed, cache_dir=tmp_path / "straight").run_dir == own
    # the key follows what shapes the model, not where it is written or how often it is scored
    assert recipe_key(dataclasses.replace(recipe, output_dir="elsewhere", name="other", beam=4)) == recipe_key(recipe)
    held_out = MMTRecipe.from_yaml(ROOT / "bench" / "experiments" / "flare_translate" / "translation.yaml")
    # the folder §2.5's build lies in (while that recipe file is unchanged): a setting added later keeps it
    assert recipe_key(held_out) == "0d0fa70d3f1598a2"
    started = dataclasses.replace(held_out, base=dataclasses.replace(held_out.base, decoder_start="language"))
    assert recipe_key(started) != recipe_key(held_out)
    assert recipe_key(dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, steps=7))) != \
        recipe_key(recipe)

    real_stream = mmt.batch_stream

    def stopping_stream(*args):  # the build is killed while drawing its fifth batch, after the step-3 checkpoint
        for index, batch in enumerate(real_stream(*args)):
            if index == 4:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(mmt, "batch_stream", stopping_stream)
    for where in ("stopped", "stopped-elsewhere"):
        with pytest.raises(KeyboardInterrupt):
            build_cached(recipe, data=data, cache_dir=tmp_path / where)
    stopped = cached_recipe(recipe, tmp_path / "stopped").run_dir
    assert load_checkpoint(stopped / CHECKPOINT_NAME)["step"] == 3 and not (stopped / "model.safetensors").exists()
    monkeypatch.setattr(mmt, "batch_stream", real_stream)
    calls = []

    def spied_train_run(recipe, **kwargs):
        calls.append(kwargs)
        return mmt.train_run(recipe, **kwargs)

    monkeypatch.setattr(cached_module, "train_run", spied_train_run)
    assert build_cached(recipe, data=data, cache_dir=tmp_path / "stopped") == stopped
    assert [call["resume"] for call in calls] == [True]  # continued from the step-3 checkpoint, not retrained
    # another name's stopped build may be one another command is still writing: a recipe builds its own folder
    elsewhere = tmp_path / "stopped-elsewhere"
    assert cached_recipe(renamed, elsewhere).run_dir == elsewhere / f"same-settings-other-name-{recipe_key(recipe)}-seed0"
    # a finished build under another name comes before the recipe's own stopped one
    shutil.copytree(straight, elsewhere / f"finished-{recipe_key(recipe)}-seed0")
    assert cached_recipe(recipe, elsewhere).run_dir == elsewhere / f"finished-{recipe_key(recipe)}-seed0"
    capsys.readouterr()
    # a name this recipe's name is a prefix of is still another name: "warm" is told it reuses "warm-e5"'s build
    prefixed = tmp_path / "prefixed" / straight.name.replace("warm-", "warm-e5-", 1)
    shutil.copytree(straight, prefixed)
    assert build_cached(recipe, data=data, cache_dir=prefixed.parent) == prefixed
    assert "the same model settings built under another name" in capsys.readouterr().out
    from safetensors.torch import load_file

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(stopped / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

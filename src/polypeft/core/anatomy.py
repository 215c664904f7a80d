"""One table of where each transformers architecture keeps its blocks, FFN, attention and sublayer-output
linears and its embeddings; every method, intervention and task asks it (a missing type falls back to a guess).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from torch import nn

# The FFN linears of BERT/XLM-R, BART/Marian, T5 (plain and gated) and Llama/Qwen-style models, for a
# model whose type is not in the table. `output.dense` is the BERT FFN's second linear;
# `attention.output.dense` is not an FFN.
DEFAULT_FFN_TARGETS = (
    r".*(\.fc1|\.fc2|\.intermediate\.dense|(?<!attention)\.output\.dense"
    r"|\.mlp\.(gate_proj|up_proj|down_proj)|\.DenseReluDense\.(wi|wi_0|wi_1|wo))"
)
# Names transformers gives block lists, for the fallback (BERT `encoder.layer`, BART `encoder.layers`,
# T5 `block`, Llama `model.layers`, GPT-2 `transformer.h`).
FALLBACK_BLOCK_LIST_NAMES = ("layer", "layers", "block", "h")
# Outside the table's architectures (custom models), an FFN closes in one of these linears.
FALLBACK_FFN_OUTPUT_SUFFIXES = ("fc2", "output.dense", "wo", "down_proj")
# The output linear of every attention and FFN sublayer (BART/Marian, BERT, T5, Llama/Qwen), for a model
# whose type is not in the table.
DEFAULT_SUBLAYER_OUTPUT_TARGETS = (
    r".*(\.out_proj|\.o_proj|\.attention\.output\.dense|\.(SelfAttention|EncDecAttention)\.o"
    r"|\.fc2|(?<!attention)\.output\.dense|\.DenseReluDense\.wo|\.mlp\.down_proj)"
)
# The heads transformers puts on a task model (fresh when a model is loaded for a new task).
TASK_HEADS = ("classifier", "score", "qa_outputs")


class AnatomyError(ValueError):
    """A model whose structure the anatomy table cannot name."""


@dataclass(frozen=True)
class Anatomy:
    """One architecture: its block lists by side, and regexes (relative to one block) for its linears.

    `stacks` maps "encoder"/"decoder" to the dotted path suffix of that side's `nn.ModuleList` of
    blocks; `ffn_in` matches the FFN linears that read the hidden state, `ffn_out` the one that
    writes it back, `attention` the attention projections (fused ones included).
    """

    stacks: Mapping[str, str]
    ffn_in: str
    ffn_out: str
    attention: str
    # The linear closing each attention sublayer (its FFN's is `ffn_out`): where CLSR mixes its paths.
    attention_out: str = ""
    # Modules inside one MoE expert: a router reorders the token rows they see (see `in_moe_expert`).
    experts: Optional[str] = None
    # The module (relative to the model's body) that turns token ids into the first hidden states.
    embeddings: Optional[str] = None


ENCODER = Anatomy(
    {"encoder": "encoder.layer"}, r"intermediate\.dense", r"output\.dense",
    r"attention\.(self\.(query|key|value)|output\.dense)", r"attention\.output\.dense", embeddings="embeddings",
)
BART_LIKE = Anatomy(
    {"encoder": "encoder.layers", "decoder": "decoder.layers"}, "fc1", "fc2",
    r"(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)", r"(self_attn|encoder_attn)\.out_proj",
)
LLAMA_LIKE = Anatomy(
    {"decoder": "layers"}, r"mlp\.(gate_proj|up_proj)", r"mlp\.down_proj",
    r"self_attn\.(q_proj|k_proj|v_proj|o_proj)", r"self_attn\.o_proj",
)
# BLOOM, GPT-NeoX and Falcon share the FFN names and fuse q, k and v into one linear.
FUSED_QKV_FFN_IN, FUSED_QKV_FFN_OUT = r"mlp\.dense_h_to_4h", r"mlp\.dense_4h_to_h"

ANATOMY: dict[str, Anatomy] = {
    "bert": ENCODER,
    "xlm-roberta": ENCODER,
    "roberta": ENCODER,
    "deberta-v2": Anatomy(
        {"encoder": "encoder.layer"}, r"intermediate\.dense", r"output\.dense",
        r"attention\.(self\.(query_proj|key_proj|value_proj)|output\.dense)", r"attention\.output\.dense",
        embeddings="embeddings",
    ),
    "distilbert": Anatomy(
        {"encoder": "transformer.layer"}, r"ffn\.lin1", r"ffn\.lin2", r"attention\.(q_lin|k_lin|v_lin|out_lin)",
        r"attention\.out_lin", embeddings="embeddings",
    ),
    # T5 blocks hold a list of sublayers; the FFN is the last (plain `wi`, gated `wi_0`/`wi_1`).
    "t5": Anatomy(
        {"encoder": "encoder.block", "decoder": "decoder.block"},
        r"layer\.\d+\.DenseReluDense\.(wi|wi_0|wi_1)", r"layer\.\d+\.DenseReluDense\.wo",
        r"layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|k|v|o)", r"layer\.\d+\.(SelfAttention|EncDecAttention)\.o",
    ),
    "bart": BART_LIKE,
    "mbart": BART_LIKE,
    "marian": BART_LIKE,
    "m2m_100": BART_LIKE,  # NLLB (dense) checkpoints are m2m_100
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "gemma3_text": LLAMA_LIKE,
    # Phi-3 fuses gate and up into one linear of width 2 * intermediate: it is the FFN input.
    "phi3": Anatomy({"decoder": "layers"}, r"mlp\.gate_up_proj", r"mlp\.down_proj", r"self_attn\.(qkv_proj|o_proj)",
                    r"self_attn\.o_proj"),
    "xglm": Anatomy({"decoder": "layers"}, "fc1", "fc2", r"self_attn\.(q_proj|k_proj|v_proj|out_proj)",
                    r"self_attn\.out_proj"),
    "opt": Anatomy({"decoder": "decoder.layers"}, "fc1", "fc2", r"self_attn\.(q_proj|k_proj|v_proj|out_proj)",
                   r"self_attn\.out_proj"),
    "bloom": Anatomy({"decoder": "h"}, FUSED_QKV_FFN_IN, FUSED_QKV_FFN_OUT, r"self_attention\.(query_key_value|dense)",
                     r"self_attention\.dense"),
    "gpt_neox": Anatomy({"decoder": "layers"}, FUSED_QKV_FFN_IN, FUSED_QKV_FFN_OUT, r"attention\.(query_key_value|dense)",
                        r"attention\.dense"),
    "falcon": Anatomy({"decoder": "h"}, FUSED_QKV_FFN_IN, FUSED_QKV_FFN_OUT, r"self_attention\.(query_key_value|dense)",
                      r"self_attention\.dense"),
    # GPT-2 (and mGPT) keep these as transformers' Conv1D, weight stored (in, out): lms and lora wrap
    # them; the weight-copying methods refuse them by name.
    "gpt2": Anatomy({"decoder": "h"}, r"mlp\.c_fc", r"mlp\.c_proj", r"attn\.(c_attn|c_proj)", r"attn\.c_proj"),
    # Sparse layers hold one dense FFN per expert under `experts.expert_k`; the other layers are dense.
    "nllb-moe": Anatomy(
        BART_LIKE.stacks, r"ffn\.(experts\.expert_\d+\.)?fc1", r"ffn\.(experts\.expert_\d+\.)?fc2",
        BART_LIKE.attention, BART_LIKE.attention_out, experts=r"ffn\.experts\.expert_\d+\..+",
    ),
    "switch_transformers": Anatomy(
        {"encoder": "encoder.block", "decoder": "decoder.block"},
        r"layer\.\d+\.mlp\.(experts\.expert_\d+\.)?wi", r"layer\.\d+\.mlp\.(experts\.expert_\d+\.)?wo",
        r"layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|k|v|o)", r"layer\.\d+\.(SelfAttention|EncDecAttention)\.o",
        experts=r"layer\.\d+\.mlp\.experts\.expert_\d+\..+",
    ),
}
ANATOMY["mt5"] = ANATOMY["t5"]
# transformers' EncoderDecoderModel over two BERTs (the e5-small warm start): the decoder's blocks add cross-attention.
ANATOMY["encoder-decoder"] = Anatomy(
    {"encoder": "encoder.encoder.layer", "decoder": "decoder.bert.encoder.layer"}, ENCODER.ffn_in, ENCODER.ffn_out,
    r"(attention|crossattention)\.(self\.(query|key|value)|output\.dense)", r"(attention|crossattention)\.output\.dense",
)


@dataclass(frozen=True)
class BlockStack:
    """One side's list of transformer blocks and its dotted path in the model."""

    side: str
    path: str
    blocks: nn.ModuleList


@dataclass(frozen=True)
class BlockPosition:
    """A module's place in a stack of transformer blocks: `<blocks>.<index>.<rest>`."""

    blocks: str
    index: int
    count: int
    rest: str
    side: Optional[str] = None

    def name_at(self, index: int) -> str:
        return f"{self.blocks}.{index}.{self.rest}" if self.blocks else f"{index}.{self.rest}"


def model_type_of(model: nn.Module) -> Optional[str]:
    """The `config.model_type` of a transformers model (None for a plain torch module)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def anatomy_of(model: nn.Module) -> Optional[Anatomy]:
    """The table's row for this model's `config.model_type`, or None when the type is not in it."""
    return ANATOMY.get(model_type_of(model) or "")


def blocks(model: nn.Module) -> dict[str, BlockStack]:
    """The block lists of a model by side ("encoder" and/or "decoder"), from its table row.

    A model type not in the table (or whose row's paths it lacks) gets the fallback guess: the
    outermost ModuleLists named layer/layers/block/h, on the encoder side when their path says so.
    """
    row = anatomy_of(model)
    found = table_blocks(model, row) if row is not None else {}
    return found or guessed_blocks(model)


def table_blocks(model: nn.Module, row: Anatomy) -> dict[str, BlockStack]:
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    found: dict[str, BlockStack] = {}
    for side, suffix in row.stacks.items():
        matches = [(name, module) for name, module in lists if name == suffix or name.endswith("." + suffix)]
        if len(matches) > 1:
            raise AnatomyError(
                f"{type(model).__name__} ({model_type_of(model)}) has {len(matches)} {side} block lists ending "
                f"in {suffix!r}: {[name for name, _ in matches]}; polypeft needs exactly one per side"
            )
        if matches:
            found[side] = BlockStack(side, matches[0][0], matches[0][1])
    return found


def guessed_blocks(model: nn.Module) -> dict[str, BlockStack]:
    candidates = sorted(
        (
            (name, module) for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) > 0
            and name.split(".")[-1] in FALLBACK_BLOCK_LIST_NAMES
        ),
        key=lambda item: item[0].count("."),
    )
    # T5 keeps a ModuleList named `layer` inside each block: only the outermost lists are stacks.
    outer: list[tuple[str, nn.ModuleList]] = []
    for name, module in candidates:
        if not any(name.startswith(kept + ".") for kept, _ in outer):
            outer.append((name, module))
    by_side: dict[str, list[tuple[str, nn.ModuleList]]] = {}
    for name, module in outer:
        side = "encoder" if any("encoder" in part for part in name.split(".")) else "decoder"
        by_side.setdefault(side, []).append((name, module))
    if not by_side:
        raise AnatomyError(
            f"no transformer block list found in {type(model).__name__} (model_type "
            f"{model_type_of(model)!r}, not in the anatomy table): looked for a ModuleList named one of "
            f"{list(FALLBACK_BLOCK_LIST_NAMES)}; known model types: {sorted(ANATOMY)}"
        )
    for side, lists in by_side.items():
        if len(lists) > 1:
            raise AnatomyError(
                f"{type(model).__name__} has {len(lists)} candidate {side} block lists "
                f"{[name for name, _ in lists]}; polypeft needs exactly one per side"
            )
    return {side: BlockStack(side, lists[0][0], lists[0][1]) for side, lists in by_side.items()}


def block_of(name: str, model: Optional[nn.Module] = None) -> Optional[BlockPosition]:
    """The block holding module `name`, or None for modules outside every block (heads, embeddings).

    With a model in the table, its block lists decide; otherwise the first dotted component that is
    a number (and, given a model, indexes an `nn.ModuleList`) is the block index, which is where
    every architecture in the table keeps it.
    """
    row = anatomy_of(model) if model is not None else None
    if row is not None:
        for stack in table_blocks(model, row).values():
            if name.startswith(stack.path + "."):
                index, _, rest = name[len(stack.path) + 1:].partition(".")
                if index.isdigit() and rest:
                    return BlockPosition(stack.path, int(index), len(stack.blocks), rest, stack.side)
    parts = name.split(".")
    for position, part in enumerate(parts[:-1]):
        if not part.isdigit():
            continue
        prefix = ".".join(parts[:position])
        rest = ".".join(parts[position + 1:])
        if model is None:
            return BlockPosition(prefix, int(part), 0, rest)
        parent = model.get_submodule(prefix) if prefix else model
        if isinstance(parent, nn.ModuleList):
            return BlockPosition(prefix, int(part), len(parent), rest)
    return None


def default_targets(model: nn.Module, layers: Optional[Sequence[int]] = None) -> str:
    """A target regex for the FFN linears (input and output) of every block, or of blocks `layers`.

    Models not in the table get `DEFAULT_FFN_TARGETS`, which cannot select blocks by index.
    """
    row = anatomy_of(model)
    stacks = table_blocks(model, row) if row is not None else {}
    if not stacks:
        if layers is not None:
            raise AnatomyError(
                f"default_targets(layers={list(layers)}): {type(model).__name__} (model_type "
                f"{model_type_of(model)!r}) is not in the anatomy table, so its blocks cannot be chosen by "
                f"index; known model types: {sorted(ANATOMY)}, or pass target_modules yourself"
            )
        return DEFAULT_FFN_TARGETS
    paths = "|".join(re.escape(stack.path) for stack in stacks.values())
    indices = r"\d+" if layers is None else "|".join(str(int(index)) for index in layers)
    return rf"({paths})\.({indices})\.({row.ffn_in}|{row.ffn_out})"


def sublayer_output_targets(model: nn.Module) -> str:
    """A target regex for the output linear of every attention and FFN sublayer (where CLSR mixes its paths);
    models not in the table, or whose row names no attention output, get `DEFAULT_SUBLAYER_OUTPUT_TARGETS`."""
    row = anatomy_of(model)
    stacks = table_blocks(model, row) if row is not None and row.attention_out else {}
    if not stacks:
        return DEFAULT_SUBLAYER_OUTPUT_TARGETS
    paths = "|".join(re.escape(stack.path) for stack in stacks.values())
    return rf"({paths})\.\d+\.({row.attention_out}|{row.ffn_out})"


def targets_for(model: nn.Module, default_targets_kind: str) -> str:
    """The default targets a method declares (`MethodConfig.default_targets`): "ffn" or "sublayer_outputs"."""
    return sublayer_output_targets(model) if default_targets_kind == "sublayer_outputs" else default_targets(model)


def embeddings_of(model: nn.Module) -> nn.Module:
    """The module that turns token ids into the first hidden states, from the table's row (BERT-likes)."""
    row = anatomy_of(model)
    body = getattr(model, getattr(model, "base_model_prefix", ""), model)
    if row is None or row.embeddings is None:
        raise AnatomyError(f"{type(model).__name__} (model_type {model_type_of(model)!r}): the anatomy table does not "
                           "say where its embeddings are; rows that do: "
                           f"{sorted(t for t, r in ANATOMY.items() if r.embeddings)}")
    return body.get_submodule(row.embeddings)


def linears_in_block(model: nn.Module, block: nn.Module, pattern_of: str) -> list[tuple[str, nn.Module]]:
    """The modules with a weight in `block` whose name (relative to it) a field (`pattern_of`) of the row matches."""
    row = anatomy_of(model)
    if row is None:
        raise AnatomyError(
            f"{type(model).__name__} (model_type {model_type_of(model)!r}) is not in the anatomy table; "
            f"known model types: {sorted(ANATOMY)}"
        )
    pattern = getattr(row, pattern_of)
    return [
        (name, module) for name, module in block.named_modules()
        if name and re.fullmatch(pattern, name) and getattr(module, "weight", None) is not None
    ]


def ffn_linears(model: nn.Module, block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FFN linears of one block of `model` (input ones first, then the output one)."""
    return linears_in_block(model, block, "ffn_in") + linears_in_block(model, block, "ffn_out")


def attention_linears(model: nn.Module, block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention projections of one block of `model` (fused q/k/v counts as one)."""
    return linears_in_block(model, block, "attention")


def closes_ffn(name: str) -> bool:
    """True when `name` is the output linear of an FFN in any architecture of the table."""
    position = block_of(name)
    rest = position.rest if position is not None else name
    return any(re.fullmatch(row.ffn_out, rest) for row in ANATOMY.values()) or any(
        rest.endswith("." + suffix) or rest == suffix for suffix in FALLBACK_FFN_OUTPUT_SUFFIXES
    )


# Outside the table, expert linears sit under `experts.<k>` or `experts.expert_<k>` (NLLB-MoE, Switch style).
FALLBACK_EXPERT_PATTERN = r"(.+\.)?experts\.(expert_)?\d+\..+"


def in_moe_expert(model: nn.Module, name: str) -> bool:
    """True when module `name` belongs to one MoE expert, whose rows a router picks and reorders."""
    row = anatomy_of(model)
    if row is not None and row.experts is not None:
        position = block_of(name, model)
        return position is not None and re.fullmatch(row.experts, position.rest) is not None
    return re.fullmatch(FALLBACK_EXPERT_PATTERN, name) is not None


def fused_expert_parameters(module: nn.Module) -> list[str]:
    """The 3-D parameters (experts x out x in) a fused MoE expert module (Mixtral, Qwen2-MoE) holds itself."""
    return [name for name, parameter in module.named_parameters(recurse=False) if parameter.dim() == 3]


def is_fused_experts(module: nn.Module) -> bool:
    return bool(fused_expert_parameters(module))


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def is_decoder_only(model: nn.Module) -> bool:
    """One stack of blocks and it is a decoder's (the table's side, else the name guess): a causal LM's body."""
    return not is_encoder_decoder(model) and set(blocks(model)) == {"decoder"}


def is_causal_lm(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return any("CausalLM" in a for a in architectures) or bool(getattr(config, "is_decoder", False))


def side_of(model: nn.Module, name: str) -> str:
    """'encoder' or 'decoder': which language a language-wise layer reads (src or tgt).

    In an encoder-decoder, the side of the block holding `name`; in a one-stack model, the decoder
    for causal LMs and the encoder otherwise (a Llama under a classification head reads its input).
    """
    if is_encoder_decoder(model):
        position = block_of(name, model)
        if position is not None and position.side is not None:
            return position.side
        return "decoder" if "decoder" in name.split(".") else "encoder"
    return "decoder" if is_causal_lm(model) else "encoder"

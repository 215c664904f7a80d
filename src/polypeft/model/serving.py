"""What vLLM and LoRAX will serve of an export: checked when the adapters are written, not when a server loads them.

The limits are the servers' own, cited where they are set; a routed head they would drop is written beside the routes.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..core.anatomy import AnatomyError, blocks, is_encoder_decoder

# vLLM's `--max-lora-rank` choices: `MaxLoRARanks` in vllm/config/lora.py (vllm-project/vllm). An adapter of rank r is
# served with the next one up; a rank above the last is refused.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM refuses an adapter whose adapter_config.json has modules_to_save or use_dora: PEFTHelper._validate_features in
# vllm/lora/peft_helper.py ("vLLM only supports modules_to_save being None.", "vLLM does not yet support DoRA.").
# LoRA is not enabled for encoder-decoder models (vllm-project/vllm#15370), and the BERT and XLM-RoBERTa encoders have
# no LoRA support (no SupportsLoRA in vllm/model_executor/models/bert.py and roberta.py; XLM-R LoRA is the open
# pull request vllm-project/vllm#40581): vLLM serves LoRA on decoder-only generation models.

# LoRAX's target modules per architecture (predibase/lorax, docs/models/adapters/lora.md, "Target Modules"): modules
# outside the list are ignored with a warning on the server; an architecture not listed takes no LoRA adapter.
LORAX_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "qwen": ("c_attn", "c_proj", "w1", "w2", "lm_head"),
    "cohere": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "dbrx": ("Wqkv", "out_proj", "lm_head"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"),
}
SERVERS = ("vllm", "lorax")


def vllm_rank(rank: int) -> Optional[int]:
    """The `--max-lora-rank` that serves rank `rank`, None above vLLM's largest."""
    return next((allowed for allowed in VLLM_LORA_RANKS if allowed >= rank), None)


def model_type_of(base_model: nn.Module) -> str:
    return str(getattr(getattr(base_model, "config", None), "model_type", None) or type(base_model).__name__)


def is_encoder_only(base_model: nn.Module) -> bool:
    """BERT, XLM-R and kin: blocks on the encoder side only (the anatomy table's, or the guessed ones); a model
    whose blocks cannot be found is not called an encoder."""
    try:
        return set(blocks(base_model)) == {"encoder"}
    except AnatomyError:
        return False


def vllm_report(base_model: nn.Module, adapter: dict[str, Any]) -> dict[str, Any]:
    """What vLLM does with adapters of `adapter` (an adapter_config.json) on `base_model`."""
    refused, notes = [], []
    model_type = model_type_of(base_model)
    if getattr(getattr(base_model, "config", None), "model_type", None) is None:
        refused.append(f"{type(base_model).__name__} is no transformers model, and vLLM serves the architectures it "
                       "implements")
    elif is_encoder_decoder(base_model):
        refused.append(f"{model_type} is an encoder-decoder model, and vLLM serves LoRA on decoder-only models only")
    elif is_encoder_only(base_model):
        refused.append(f"{model_type} ({type(base_model).__name__}) is an encoder, and vLLM serves LoRA on "
                       "decoder-only generation models only (BERT and XLM-R have no LoRA support in vLLM)")
    rank = int(adapter["r"])
    if vllm_rank(rank) is None:
        refused.append(f"rank {rank} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")
    elif vllm_rank(rank) != rank:
        notes.append(f"rank {rank} is served with --max-lora-rank {vllm_rank(rank)} (vLLM allows {list(VLLM_LORA_RANKS)})")
    if adapter.get("modules_to_save"):
        refused.append(f"the adapters carry modules_to_save {adapter['modules_to_save']}, which vLLM refuses: export "
                       "with server='vllm' (the modules go beside the adapters, into the served base)")
    if adapter.get("use_dora"):
        refused.append("the adapters are DoRA, which vLLM does not serve")
    return {"serves": not refused, "refused": refused, "notes": notes}


def lorax_report(base_model: nn.Module, adapter: dict[str, Any], routed_names: list[str]) -> dict[str, Any]:
    """What LoRAX does with adapters of `adapter` on `base_model`: which routed layers it ignores."""
    model_type = model_type_of(base_model)
    refused, notes = [], []
    accepted = LORAX_TARGETS.get(model_type)
    ignored: list[str] = []
    if accepted is None:
        refused.append(f"LoRAX lists no LoRA target modules for {model_type} (it lists {sorted(LORAX_TARGETS)})")
    else:
        ignored = sorted(name for name in routed_names if name.rsplit(".", 1)[-1] not in accepted)
        if ignored and len(ignored) == len(routed_names):
            refused.append(f"LoRAX ignores every routed layer: it takes {list(accepted)} on {model_type}")
        elif ignored:
            notes.append(f"LoRAX ignores {len(ignored)} of the {len(routed_names)} routed layers (it takes "
                         f"{list(accepted)} on {model_type}), so its outputs differ from polypeft's: {ignored[:5]}")
    if adapter.get("modules_to_save"):
        notes.append(f"LoRAX does not load modules_to_save {adapter['modules_to_save']}: export with "
                     "server='lorax' (the modules go beside the adapters, into the served base)")
    return {"serves": not refused, "refused": refused, "notes": notes, "ignored_layers": ignored}


def serving_reports(base_model: nn.Module, adapter: dict[str, Any], routed_names: list[str]) -> dict[str, Any]:
    return {"vllm": vllm_report(base_model, adapter), "lorax": lorax_report(base_model, adapter, routed_names)}


def not_served_lines(reports: dict[str, Any]) -> list[str]:
    """One line per server that refuses the export or changes its outputs, for a warning at export time."""
    lines = []
    for server, report in reports.items():
        problems = report["refused"] + [note for note in report["notes"] if "differ" in note or "modules" in note]
        if problems:
            lines.append(f"{server}: {'will not serve these adapters' if report['refused'] else 'serves them, but'}: "
                         + "; ".join(problems))
    return lines

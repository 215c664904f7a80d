"""polypeft: language-specific parameter-efficient modules for multilingual transformers.

The public API lives here; everything else may change. Names load on first use, so `polypeft --help` needs no torch.
"""
__version__ = "0.1.0"

import importlib as _importlib

# Where each public name lives: module -> names.
_EXPORTS = {
    ".core.config": ("ConfigError", "MethodConfig", "recipe_from_yaml"),
    ".methods.registry": ("config_from_dict", "load_config_file"),
    ".methods.lms": ("LMSConfig",),
    ".data.batching": ("TokenBudgetBatcher", "collate", "token_lengths"),
    ".data.bible": ("BIBLE_VERSIONS", "ENGLISH_VERSIONS", "BibleCorpus", "BibleSplit"),
    ".data.parallel": ("ParallelExample", "english_centric", "read_parallel", "write_jsonl"),
    ".data.sampling": ("TemperatureSampler", "temperature_probabilities"),
    ".data.spm": ("SpmTokenizer", "bible_spm", "train_spm"),
    ".tasks.translation.evaluate": ("score_directions", "translate", "win_ratio"),
    ".experiments.flare_recipe": ("TrainedRecipe", "run_recipe", "train_english_lora"),
    ".core.anatomy": ("DEFAULT_FFN_TARGETS",),
    ".core.inject": ("TargetError",),
    ".interventions.capture": ("InterventionError",),
    ".interventions.lrp2": ("LRP2", "LanguageVectors", "language_vectors"),
    ".interventions.search": ("search_layers",),
    ".core.languages": ("SHARED", "LanguageError", "LanguageRegistry", "Routes"),
    ".methods.clsr": ("CLSRConfig",),
    ".methods.flare.layer": ("FLAREConfig", "FLAREError"),
    ".methods.lora": ("LoRAConfig",),
    ".methods.ls_ffn": ("LSFFNConfig",),
    ".methods.switch": ("SwitchConfig",),
    ".methods.fd": ("FuseDistillationLoss", "fuse_distillation_loss", "fuse_distillation_step", "one_way_kl",
        "symmetric_kl", "token_cross_entropy"),
    ".model.routed_model": ("ParameterCounts",),
    ".model.poly_model": ("PolyModel", "wrap"),
    ".model.export": ("ExportError",),
    ".core.finite": ("NonFiniteError",),
    ".model.hub": ("load_config",),
    ".model.peft_conveniences": ("UnsupportedCallError",),
    ".backbones.e5": ("PASSAGE_PREFIX", "QUERY_PREFIX", "embed", "embed_layers", "load_encoder"),
    ".backbones.seq2seq": ("build_translation_model",),
    ".tasks.classification": ("classification_model", "encode_classification", "evaluate_classification",
        "read_classification"),
    ".tasks.qa": ("encode_qa", "evaluate_qa", "qa_model", "read_qa"),
    ".tasks.records": ("TaskDataError",),
    ".tasks.retrieval": ("bitext_retrieval", "read_bitext", "retrieval_accuracy"),
    ".tasks.task_training": ("TaskTrainingSettings", "train_task"),
    ".tasks.tokens": ("encode_tokens", "evaluate_tokens", "read_conll", "read_tokens", "token_classification_model"),
    ".tasks.encoder_finetune": ("FinetuneSettings", "accuracy_per_language", "build_classifier", "encode_examples",
        "finetune"),
    ".tasks.hf_trainer": ("DataCollatorWithRoutes", "PolySeq2SeqTrainer", "PolyTrainer"),
}
# Public names that differ from the name in their module.
_ALIASES = {"FLARE_RECIPES": (".experiments.flare_recipe", "RECIPES"), "SEQ2SEQ_PRESETS": (".backbones.seq2seq", "PRESETS")}
_MODULES = {"lens": ".interventions.lens"}
_WHERE = {**{name: (module, name) for module, names in _EXPORTS.items() for name in names}, **_ALIASES}

__all__ = ["BIBLE_VERSIONS", "BibleCorpus", "BibleSplit", "CLSRConfig", "ConfigError", "DEFAULT_FFN_TARGETS",
    "DataCollatorWithRoutes", "ENGLISH_VERSIONS", "ExportError", "FLAREConfig", "FLAREError",
    "FLARE_RECIPES", "FinetuneSettings", "FuseDistillationLoss", "InterventionError", "LMSConfig", "LRP2",
    "LSFFNConfig", "LanguageError", "LanguageRegistry", "LanguageVectors", "LoRAConfig",
    "MethodConfig", "NonFiniteError", "PASSAGE_PREFIX", "ParallelExample", "ParameterCounts", "PolyModel", "PolySeq2SeqTrainer",
    "PolyTrainer", "QUERY_PREFIX", "Routes", "SEQ2SEQ_PRESETS", "SHARED", "SpmTokenizer", "SwitchConfig",
    "TargetError", "TaskDataError", "TaskTrainingSettings", "TemperatureSampler", "TokenBudgetBatcher",
    "TrainedRecipe", "UnsupportedCallError", "accuracy_per_language", "bible_spm", "bitext_retrieval",
    "build_classifier", "build_translation_model", "classification_model", "collate", "config_from_dict", "embed",
    "embed_layers", "encode_classification", "encode_examples", "encode_qa", "encode_tokens", "english_centric",
    "evaluate_classification", "evaluate_qa", "evaluate_tokens", "finetune", "fuse_distillation_loss",
    "fuse_distillation_step", "language_vectors", "lens", "load_config", "load_config_file", "load_encoder",
    "one_way_kl", "qa_model", "read_bitext", "read_classification", "read_conll", "read_parallel", "read_qa",
    "read_tokens", "recipe_from_yaml", "retrieval_accuracy", "run_recipe", "score_directions", "search_layers",
    "symmetric_kl", "temperature_probabilities", "token_classification_model", "token_cross_entropy",
    "token_lengths", "train_english_lora", "train_spm", "train_task", "translate", "win_ratio", "wrap",
    "write_jsonl"]


def __getattr__(name: str):
    if name in _MODULES:
        value = _importlib.import_module(_MODULES[name], __name__)
    elif name in _WHERE:
        module, attribute = _WHERE[name]
        value = getattr(_importlib.import_module(module, __name__), attribute)
    else:
        raise AttributeError(f"module 'polypeft' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

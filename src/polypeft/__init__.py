"""polypeft: language-specific parameter-efficient modules for multilingual transformers.

The public API lives here: what a user of the library imports. The project's own experiments (the Bible corpus,
the e5 prompts, FLARE's two-stage recipe, the demo) live in `polypeft.experiments` and their modules. Names load
on first use, so `polypeft --help` needs no torch; everything else may change.
"""
__version__ = "0.1.0"

import importlib as _importlib

# Where each public name lives: module -> names.
_EXPORTS = {
    ".core.config": ("ConfigError",),
    ".core.method_config": ("MethodConfig",),
    ".core.yaml_files": ("recipe_from_yaml",),
    ".training.settings": ("TrainSettings",),
    ".methods.registry": ("config_from_dict", "load_config_file"),
    ".methods.lms": ("LMSConfig",),
    ".data.batching": ("TokenBudgetBatcher", "collate", "token_lengths"),
    ".data.parallel": ("ParallelExample", "english_centric", "read_parallel", "write_jsonl"),
    ".data.sampling": ("TemperatureSampler", "temperature_probabilities"),
    ".data.spm": ("SpmTokenizer", "train_spm"),
    ".tasks.translation.evaluate": ("score_directions", "translate", "win_ratio"),
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
    ".model.export": ("ExportError", "ServingWarning"),
    ".core.finite": ("NonFiniteError",),
    ".model.hub": ("load_config",),
    ".model.peft_conveniences": ("UnsupportedCallError",),
    ".backbones.e5": ("embed", "embed_layers", "load_encoder"),
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
_ALIASES = {"SEQ2SEQ_PRESETS": (".backbones.seq2seq", "PRESETS")}
_MODULES = {"lens": ".interventions.lens"}
_WHERE = {**{name: (module, name) for module, names in _EXPORTS.items() for name in names}, **_ALIASES}

# Names that were public before the library and the project's experiments were told apart: still importable,
# with a warning that says where they live now.
_MOVED = {"BIBLE_VERSIONS": ".data.bible", "ENGLISH_VERSIONS": ".data.bible", "BibleCorpus": ".data.bible",
          "BibleSplit": ".data.bible", "bible_spm": ".data.spm", "PASSAGE_PREFIX": ".backbones.e5",
          "QUERY_PREFIX": ".backbones.e5", "TrainedRecipe": ".experiments.flare_recipe",
          "run_recipe": ".experiments.flare_recipe", "train_english_lora": ".experiments.flare_recipe",
          "FLARE_RECIPES": ".experiments.flare_recipe"}


__all__ = ["CLSRConfig", "ConfigError", "DEFAULT_FFN_TARGETS", "DataCollatorWithRoutes", "ExportError",
    "FLAREConfig", "FLAREError", "FinetuneSettings", "FuseDistillationLoss", "InterventionError", "LMSConfig",
    "LRP2", "LSFFNConfig", "LanguageError", "LanguageRegistry", "LanguageVectors", "LoRAConfig", "MethodConfig",
    "NonFiniteError", "ParallelExample", "ParameterCounts", "PolyModel", "PolySeq2SeqTrainer", "PolyTrainer",
    "Routes", "SEQ2SEQ_PRESETS", "SHARED", "ServingWarning", "SpmTokenizer", "SwitchConfig", "TargetError", "TaskDataError",
    "TaskTrainingSettings", "TemperatureSampler", "TokenBudgetBatcher", "TrainSettings", "UnsupportedCallError",
    "accuracy_per_language", "bitext_retrieval", "build_classifier", "build_translation_model",
    "classification_model", "collate", "config_from_dict", "embed", "embed_layers", "encode_classification",
    "encode_examples", "encode_qa", "encode_tokens", "english_centric", "evaluate_classification", "evaluate_qa",
    "evaluate_tokens", "finetune", "fuse_distillation_loss", "fuse_distillation_step", "language_vectors", "lens",
    "load_config", "load_config_file", "load_encoder", "one_way_kl", "qa_model", "read_bitext",
    "read_classification", "read_conll", "read_parallel", "read_qa", "read_tokens", "recipe_from_yaml",
    "retrieval_accuracy", "score_directions", "search_layers", "symmetric_kl", "temperature_probabilities",
    "token_classification_model", "token_cross_entropy", "token_lengths", "train_spm", "train_task", "translate",
    "win_ratio", "wrap", "write_jsonl"]


def __getattr__(name: str):
    if name in _MODULES:
        value = _importlib.import_module(_MODULES[name], __name__)
    elif name in _WHERE:
        module, attribute = _WHERE[name]
        value = getattr(_importlib.import_module(module, __name__), attribute)
    elif name in _MOVED:
        import warnings

        module = "polypeft" + _MOVED[name]
        warnings.warn(f"polypeft.{name} is part of the project's experiments, not the library: import it from "
                      f"{module}", DeprecationWarning, stacklevel=2)
        attribute = "RECIPES" if name == "FLARE_RECIPES" else name
        return getattr(_importlib.import_module(_MOVED[name], __name__), attribute)
    else:
        raise AttributeError(f"module 'polypeft' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

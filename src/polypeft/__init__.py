"""polypeft: language-specific parameter-efficient modules for multilingual transformers.

The public API lives here; everything else may change.
"""
__version__ = "0.1.0"

from .core.config import ConfigError, MethodConfig, config_from_dict, load_config_file, recipe_from_yaml
from .methods.lms import LMSConfig
from .data.batching import TokenBudgetBatcher, collate, token_lengths
from .data.bible import BIBLE_VERSIONS, ENGLISH_VERSIONS, BibleCorpus, BibleSplit
from .data.parallel import ParallelExample, english_centric, read_parallel, write_jsonl
from .data.sampling import TemperatureSampler, temperature_probabilities
from .data.spm import SpmTokenizer, bible_spm, train_spm
from .tasks.translation.evaluate import score_directions, translate, win_ratio
from .methods.flare.recipe import RECIPES as FLARE_RECIPES
from .methods.flare.recipe import TrainedRecipe, run_recipe, train_english_lora
from .core.inject import DEFAULT_FFN_TARGETS, TargetError
from .interventions import lens
from .interventions.lrp2 import LRP2, InterventionError, LanguageVectors, language_vectors, search_layers
from .core.languages import SHARED, LanguageError, LanguageRegistry, Routes
from .methods.clsr import CLSRConfig
from .methods.flare.model import FLAREConfig, FLAREError, FLAREModel
from .methods.flare.layer import LoRALinear
from .methods.lora import LoRAConfig
from .methods.ls_ffn import LSFFNConfig
from .methods.switch import SwitchConfig
from .methods.fd import (
    FuseDistillationLoss,
    fuse_distillation_loss,
    fuse_distillation_step,
    one_way_kl,
    symmetric_kl,
    token_cross_entropy,
)
from .core.model import ParameterCounts, PolyModel, wrap
from .backbones.e5 import PASSAGE_PREFIX, QUERY_PREFIX, embed, embed_layers, load_encoder
from .backbones.seq2seq import PRESETS as SEQ2SEQ_PRESETS
from .backbones.seq2seq import build_translation_model
from .experiments.bible_eval import verse_classification, verse_retrieval
from .tasks.classification import (classification_model, encode_classification, evaluate_classification,
                                   read_classification)
from .tasks.qa import encode_qa, evaluate_qa, qa_model, read_qa
from .tasks.records import TaskDataError
from .tasks.retrieval import bitext_retrieval, read_bitext, retrieval_accuracy
from .tasks.task_training import TaskTrainingSettings, train_task
from .tasks.tokens import encode_tokens, evaluate_tokens, read_conll, read_tokens, token_classification_model
from .tasks.encoder_finetune import FinetuneSettings, accuracy_per_language, build_classifier, encode_examples, finetune

import types as _types

__all__ = sorted(
    name for name, value in globals().items()
    if not name.startswith("_") and (not isinstance(value, _types.ModuleType) or name == "lens")
)

"""Multilingual fine-tuning of an HF encoder under a classification head: naive, LMS or LMS+FD, scored per language.

Zero-shot transfer (train one language, test all) and multilingual runs; FD is scored on the shared route and on the language routes.
"""
from .classifier import Classifier, build_classifier
from .evaluation import accuracy_per_language, predict
from .examples import EncodedExamples, PassThroughEmbeddings, encode_examples, encoder_body, language_means, lirp_shifted
from .experiment import ExperimentSpec, parameter_table, run_experiment, summarize
from .finetune import classifier_loss, finetune, measure_throughput, random_batches
from .report import markdown_report
from .settings import EVAL_ROUTES, METHODS, VARIANT_NAMES, FinetuneSettings

__all__ = [
    "EVAL_ROUTES", "METHODS", "VARIANT_NAMES", "Classifier", "EncodedExamples", "ExperimentSpec", "FinetuneSettings",
    "PassThroughEmbeddings", "accuracy_per_language", "build_classifier", "classifier_loss", "encode_examples",
    "encoder_body", "finetune", "language_means", "lirp_shifted", "markdown_report",
    "measure_throughput", "parameter_table", "predict", "random_batches", "run_experiment", "summarize",
]

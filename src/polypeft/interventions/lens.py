"""LENS (Zhao et al. 2024): probe each layer's language-agnostic direction and language-specific
subspace, then train only the top layers to align with the pivot in one and separate in the other.

Follows the paper and its reference code (losses on the pooled state of the last layer, language
directions measured inside the specific subspace) but caches the frozen reference states instead of
keeping a second copy of the model.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..core.anatomy import is_decoder_only
from ..core.fileio import atomic_write, write_safetensors
from ..training.loop import train as training_loop
from .capture import (
    POOLINGS,
    InterventionError,
    check_identity,
    check_layers,
    check_texts,
    checked_max_length,
    find_blocks,
    iterate_pooled,
    model_identity,
    resolve_stacks,
)
from .lens_objective import LensObjective, pair_batches, text_pairs
from .lens_settings import LensTrainSettings, lens_schedule  # noqa: F401  (lens_schedule: part of pp.lens)

PROBE_WEIGHTS = "lens_probe.safetensors"
PROBE_CONFIG = "lens_probe.json"
TRAINED_FORMAT = "polypeft.lens_layers"


def default_pooling(model: nn.Module) -> str:
    """Last token for decoder-only models (it has seen the whole sentence), token mean for everything else."""
    return "last" if is_decoder_only(model) else "mean"


# ----------------------------------------------------------------------------------------------
# Probe
# ----------------------------------------------------------------------------------------------

@dataclass
class LensProbe:
    """Per layer (rows follow `layers`): language means, the agnostic part and the specific subspace.

    `specific_basis[k]` is (hidden, L-1) with orthonormal columns: the left singular vectors of the
    centered language means. `agnostic_mean[k]` is the mean of the language means and
    `agnostic_direction[k]` its unit part orthogonal to the specific subspace (the same direction
    the reference code derives by pseudo-inverse).
    """

    languages: list[str]
    layers: list[int]
    pivot: str
    pooling: str
    stack: str
    identity: dict
    means: dict[str, torch.Tensor]
    agnostic_mean: torch.Tensor
    agnostic_direction: torch.Tensor
    specific_basis: torch.Tensor
    singular_values: torch.Tensor
    plot_layer: Optional[int] = None
    points: dict[str, torch.Tensor] = field(default_factory=dict)

    def row(self, layer: int) -> int:
        if layer not in self.layers:
            raise InterventionError(f"LENS probe has no layer {layer}; probed layers are {self.layers}")
        return self.layers.index(layer)

    def project_specific(self, states: torch.Tensor, layer: int) -> torch.Tensor:
        basis = self.specific_basis[self.row(layer)].to(states.device, states.dtype)
        return (states @ basis) @ basis.T

    def project_agnostic(self, states: torch.Tensor, layer: int) -> torch.Tensor:
        direction = self.agnostic_direction[self.row(layer)].to(states.device, states.dtype)
        return (states @ direction).unsqueeze(-1) * direction

    def direction(self, language: str, layer: int) -> torch.Tensor:
        """Where `language` sits relative to the pivot inside the specific subspace."""
        if language not in self.means:
            raise InterventionError(f"LENS probe has no language {language!r}; it has {self.languages}")
        offset = self.means[language][self.row(layer)] - self.means[self.pivot][self.row(layer)]
        return self.project_specific(offset.unsqueeze(0), layer)[0]

    def check_model(self, model: nn.Module, where: str = "LENS") -> None:
        check_identity(self.identity, model, "this LENS probe", where)

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """`lens_probe.safetensors` (tensors) and `lens_probe.json` (everything else), both atomic."""
        directory = Path(directory)
        tensors = {
            "agnostic_mean": self.agnostic_mean,
            "agnostic_direction": self.agnostic_direction,
            "specific_basis": self.specific_basis,
            "singular_values": self.singular_values,
            **{f"means/{language}": tensor for language, tensor in self.means.items()},
            **{f"points/{language}": tensor for language, tensor in self.points.items()},
        }
        tensors = {name: tensor.float().contiguous().cpu() for name, tensor in tensors.items()}
        write_safetensors(directory / PROBE_WEIGHTS, tensors)
        config = {
            "format": "polypeft.lens_probe",
            "languages": self.languages,
            "layers": self.layers,
            "pivot": self.pivot,
            "pooling": self.pooling,
            "stack": self.stack,
            "plot_layer": self.plot_layer,
            "identity": self.identity,
            "singular_values": {str(layer): self.singular_values[row].tolist() for row, layer in enumerate(self.layers)},
        }
        text = json.dumps(config, indent=2, sort_keys=True)
        atomic_write(directory / PROBE_CONFIG, lambda temporary: Path(temporary).write_text(text + "\n", encoding="utf-8"))
        return directory

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> "LensProbe":
        directory = Path(directory)
        config_path, weights_path = directory / PROBE_CONFIG, directory / PROBE_WEIGHTS
        for path in (config_path, weights_path):
            if not path.is_file():
                raise InterventionError(f"LENS probe file {str(path)!r} does not exist (written by LensProbe.save)")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        with safe_open(str(weights_path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        probe = cls(
            languages=config["languages"], layers=config["layers"], pivot=config["pivot"],
            pooling=config["pooling"], stack=config["stack"], identity=config["identity"],
            means={name.split("/", 1)[1]: t for name, t in tensors.items() if name.startswith("means/")},
            agnostic_mean=tensors["agnostic_mean"], agnostic_direction=tensors["agnostic_direction"],
            specific_basis=tensors["specific_basis"], singular_values=tensors["singular_values"],
            plot_layer=config.get("plot_layer"),
            points={name.split("/", 1)[1]: t for name, t in tensors.items() if name.startswith("points/")},
        )
        if model is not None:
            probe.check_model(model, where=f"loading {directory}")
        return probe

    def plot(self, path: Union[str, os.PathLike], layer: Optional[int] = None) -> Path:
        """Sentences and language means in the first two directions of the specific subspace."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        layer = self.plot_layer if layer is None else layer
        if layer is None:
            layer = self.layers[-1]
        basis = self.specific_basis[self.row(layer)]
        # With two languages the subspace is one line: the agnostic direction gives the second axis.
        axes_vectors = basis[:, :2] if basis.shape[1] >= 2 else torch.stack(
            [basis[:, 0], self.agnostic_direction[self.row(layer)]], dim=1
        )
        figure = Figure(figsize=(5.5, 4.5))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        colours = [f"C{index % 10}" for index in range(len(self.languages))]
        for colour, language in zip(colours, self.languages):
            if layer == self.plot_layer and language in self.points:
                xy = self.points[language] @ axes_vectors
                axes.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.35, color=colour)
            centre = self.means[language][self.row(layer)] @ axes_vectors
            axes.scatter([centre[0]], [centre[1]], s=90, marker="X", color=colour, edgecolor="k", label=language)
        axes.set_xlabel("specific direction 1")
        axes.set_ylabel("specific direction 2" if basis.shape[1] >= 2 else "agnostic direction")
        axes.set_title(f"LENS probe, {self.stack} layer {layer} ({self.pooling} pooling)", fontsize=9)
        axes.legend(fontsize=7, markerscale=0.6)
        figure.tight_layout()
        return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))


def subspaces(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(languages, hidden) means of one layer -> agnostic mean, agnostic direction, basis, singular values."""
    means = means.double()
    agnostic_mean = means.mean(0)
    centered = means - agnostic_mean
    rank = min(means.shape[0] - 1, means.shape[1])
    left, singular, _ = torch.linalg.svd(centered.T, full_matrices=False)
    basis, singular = left[:, :rank], singular[:rank]
    common = agnostic_mean - basis @ (basis.T @ agnostic_mean)
    direction = common / common.norm().clamp_min(1e-12)
    return agnostic_mean.float(), direction.float(), basis.float(), singular.float()


def probe(
    model: nn.Module,
    tokenizer,
    texts_by_language: Mapping[str, Sequence[str]],
    pooling: Optional[str] = None,
    layers: Optional[Sequence[int]] = None,
    pivot: str = "en",
    stack: Optional[str] = None,
    batch_size: int = 32,
    max_sentences: Optional[int] = None,
    max_length: Optional[int] = None,
    plot_layer: Optional[int] = None,
    progress: bool = True,
) -> LensProbe:
    """Language subspace probing on a few hundred sentences per language (paper: parallel ones).

    `pooling=None` is "last" for causal LMs and "mean" otherwise; `layers=None` is every layer;
    the sentence states of `plot_layer` (default: the last probed layer) are kept for `plot`.
    """
    check_texts(texts_by_language, "LENS probe")
    max_length = checked_max_length(model, max_length, "LENS probe")
    if len(texts_by_language) < 2:
        raise InterventionError(
            f"LENS probe needs at least 2 languages to find a language-specific subspace; got "
            f"{sorted(texts_by_language)}"
        )
    if pivot not in texts_by_language:
        raise InterventionError(f"LENS probe: pivot {pivot!r} is not among the languages {sorted(texts_by_language)}")
    pooling = pooling or default_pooling(model)
    if pooling not in POOLINGS:
        raise InterventionError(f"LENS probe: pooling={pooling!r} is not supported; use one of {list(POOLINGS)}")
    stacks = resolve_stacks(model, stack, "LENS probe")
    if len(stacks) != 1:
        raise InterventionError("LENS probe works on one stack at a time; pass stack='encoder' or 'decoder'")
    stack_name = stacks[0]
    num_blocks = len(find_blocks(model)[stack_name])
    layers = list(range(num_blocks + 1)) if layers is None else list(layers)
    check_layers(layers, num_blocks, "LENS probe")
    plot_layer = layers[-1] if plot_layer is None else plot_layer
    if plot_layer not in layers:
        raise InterventionError(f"LENS probe: plot_layer={plot_layer} is not among the probed layers {layers}")
    languages = sorted(texts_by_language)
    means: dict[str, torch.Tensor] = {}
    points: dict[str, torch.Tensor] = {}
    total = sum(len(texts_by_language[language][:max_sentences] if max_sentences else texts_by_language[language]) for language in languages)
    with tqdm(total=total, desc="LENS probe", unit="sent", disable=not progress) as bar:
        for language in languages:
            texts = list(texts_by_language[language])
            texts = texts[:max_sentences] if max_sentences else texts
            sums, kept = None, []
            for pooled in iterate_pooled(model, tokenizer, texts, layers, stack_name, pooling, batch_size, max_length, bar):
                stacked = torch.stack([pooled[layer] for layer in layers]).double().sum(1)
                sums = stacked if sums is None else sums + stacked
                kept.append(pooled[plot_layer].float().cpu())
            means[language] = (sums / len(texts)).float().cpu()
            points[language] = torch.cat(kept)
    per_layer = [subspaces(torch.stack([means[language][row] for language in languages])) for row in range(len(layers))]
    return LensProbe(
        languages=languages, layers=layers, pivot=pivot, pooling=pooling, stack=stack_name,
        identity=model_identity(model), means=means,
        agnostic_mean=torch.stack([part[0] for part in per_layer]),
        agnostic_direction=torch.stack([part[1] for part in per_layer]),
        specific_basis=torch.stack([part[2] for part in per_layer]),
        singular_values=torch.stack([part[3] for part in per_layer]),
        plot_layer=plot_layer, points=points,
    )


# ----------------------------------------------------------------------------------------------
# Manipulation (training the top layers)
# ----------------------------------------------------------------------------------------------

@dataclass
class LensTrainResult:
    """What `train` did: the trained parameter names and the losses of every step."""

    trained_parameters: list[str]
    history: list[dict]
    settings: dict

    def save_json(self, path: Union[str, os.PathLike]) -> Path:
        text = json.dumps(asdict(self), indent=2, sort_keys=True)
        return atomic_write(path, lambda temporary: Path(temporary).write_text(text + "\n", encoding="utf-8"))


def top_layer_parameters(model: nn.Module, stack: str, top_k_layers: int) -> dict[str, nn.Parameter]:
    """The parameters of the last `top_k_layers` blocks of `stack`, by their names in the model."""
    blocks = find_blocks(model)[stack]
    if not 1 <= top_k_layers <= len(blocks):
        raise InterventionError(
            f"top_k_layers={top_k_layers} is out of range: the {stack} has {len(blocks)} blocks"
        )
    wanted = {id(parameter) for block in list(blocks)[-top_k_layers:] for parameter in block.parameters()}
    return {name: parameter for name, parameter in model.named_parameters() if id(parameter) in wanted}


def train(model: nn.Module, tokenizer, parallel_pairs: Sequence[Mapping[str, str]], probe_result: LensProbe,
          settings: Optional[LensTrainSettings] = None, progress: bool = True) -> LensTrainResult:
    """Train the top `settings.top_k_layers` blocks with the three LENS losses; everything else stays frozen.

    `parallel_pairs`: dicts language -> text holding the pivot and some target languages (extra
    keys such as "ref" are ignored). On the pooled state of the loss layer:
      align    = MSE(P_a h_t, P_a h_pivot)                 agnostic part of target meets the pivot's
      separate = MSE(P_s h_t - P_s h_t^ref, s_l * d_l)      target moves along its own direction d_l
      retain   = MSE(h_pivot, h_pivot^ref)                  pivot stays where the frozen model had it
    weighted by `settings.weights` (paper: 1, 1, 1). s_l is the push strength: the paper's 1 pushes a language
    away from the pivot; a negative value pulls it toward the pivot (cross-lingual retrieval wants that, see
    bench/RESULTS.md §5). h^ref are the frozen model's states, computed once before training. Dropout stays
    off: the targets are exact states.
    """
    settings = settings or LensTrainSettings()
    probe_result.check_model(model, where="LENS train")
    max_length = checked_max_length(model, settings.max_length, "LENS train")
    stack, top_k_layers = probe_result.stack, settings.top_k_layers
    blocks = find_blocks(model)[stack]
    layer = probe_result.layers[-1] if settings.layer is None else settings.layer
    probe_result.row(layer)
    first_trained_output = len(blocks) - top_k_layers + 1
    trainable = top_layer_parameters(model, stack, top_k_layers)
    if layer < first_trained_output:
        raise InterventionError(
            f"LENS train: the loss layer {layer} lies below the trained blocks (they produce layers "
            f"{first_trained_output}..{len(blocks)}); raise top_k_layers or use a higher layer"
        )
    weights, languages, push_strength = tuple(settings.weights), settings.languages, settings.push_strength
    pivot = probe_result.pivot
    languages = [code for code in probe_result.languages if code != pivot] if languages is None else list(languages)
    unknown = [code for code in languages if code not in probe_result.languages or code == pivot]
    if unknown:
        raise InterventionError(
            f"LENS train: target languages {unknown} are not probed non-pivot languages; probed: "
            f"{probe_result.languages}, pivot {pivot!r}"
        )
    pairs = text_pairs(parallel_pairs, pivot, languages)
    if not pairs:
        raise InterventionError(f"LENS train: no example holds both {pivot!r} and one of {languages}")
    if not isinstance(push_strength, Mapping):
        push_strength = dict.fromkeys(languages, push_strength)
    missing = [code for code in languages if code not in push_strength]
    if missing:
        raise InterventionError(
            f"LENS train: push_strength has no value for {missing}; it gives {sorted(push_strength)}, and the "
            f"trained languages are {languages}"
        )
    strengths = {code: float(push_strength[code]) for code in languages}
    objective = LensObjective.build(model, tokenizer, probe_result, pairs, layer, weights, strengths,
                                    settings.batch_size, max_length)
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    loop_settings = replace(settings.training, progress=progress and settings.training.progress)
    try:  # dropout stays off (train_mode=False): the targets are exact states
        training_loop(model, pair_batches(pairs, settings.batch_size, settings.seed), objective, loop_settings,
                      parameters=list(trainable.values()), device_placement=False, train_mode=False,
                      description="LENS train")
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
    record = {
        "top_k_layers": top_k_layers, "weights": list(weights), "steps": settings.training.steps,
        "lr": settings.training.lr, "batch_size": settings.batch_size, "languages": languages, "pivot": pivot,
        "layer": layer, "stack": stack, "pooling": probe_result.pooling, "push_strength": strengths,
        "seed": settings.seed, "num_pairs": len(pairs),
    }
    return LensTrainResult(trained_parameters=sorted(trainable), history=objective.history, settings=record)


def save_trained_layers(model: nn.Module, result: LensTrainResult, path: Union[str, os.PathLike]) -> Path:
    """Only the parameters LENS trained, with the model identity: a few blocks, not the whole model."""
    parameters = dict(model.named_parameters())
    tensors = {name: parameters[name].detach().contiguous().cpu() for name in result.trained_parameters}
    metadata = {"format": TRAINED_FORMAT, "identity": json.dumps(model_identity(model), sort_keys=True),
                "settings": json.dumps(result.settings, sort_keys=True)}
    return write_safetensors(path, tensors, metadata=metadata)


def load_trained_layers(model: nn.Module, path: Union[str, os.PathLike]) -> list[str]:
    """Copy saved LENS layers into `model` (refused for another model); returns the names loaded."""
    path = Path(path)
    if not path.is_file():
        raise InterventionError(f"LENS layer file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != TRAINED_FORMAT:
            raise InterventionError(f"{path}: not a LENS layer file (format {metadata.get('format')!r})")
        check_identity(json.loads(metadata["identity"]), model, f"the LENS layers in {path}", "load_trained_layers")
        parameters = dict(model.named_parameters())
        missing = [name for name in handle.keys() if name not in parameters]
        if missing:
            raise InterventionError(f"{path}: parameters {missing[:5]} do not exist in {type(model).__name__}")
        with torch.no_grad():
            for name in handle.keys():
                parameters[name].copy_(handle.get_tensor(name))
        return list(handle.keys())

"""RoutedModel: a base model whose target linears are routed layers, with routes per call and merge.

It turns the user's language arguments into Routes for each forward or generate call; PolyModel adds its files.
"""
from __future__ import annotations

import inspect
import types
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ..core.anatomy import side_of
from ..core.config import ConfigError
from ..core.method_config import MethodConfig
from ..core.inject import replace_targets, restore_base_layers
from ..core.languages import LanguageError, LanguageRegistry, LanguageSpec, Routes
from ..core.routed import LayerSite, RoutedLinear, mark_moe_experts
from ..core.routing import CallsInFlight, RouteState, carry_routes_into_checkpoints, checkpointing_modules
from ..methods.registry import method_entry
from .merge_guard import MergeSnapshot
from .tied_weights import drop_tied_aliases_on_save
from .trainable import freeze_all_but, resolve_modules_to_save, saved_module_tensors, warn_if_head_frozen


@dataclass(frozen=True)
class ParameterCounts:
    """Exact parameter counts: what training adds, and what each way of deploying keeps."""

    base: int
    language_specific: int
    shared_route: int
    training_extra: int
    inference_extra_language_routes: int
    inference_extra_shared_route: int
    inference_extra_merged: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RoutedModel(nn.Module):
    """Wraps any torch model; `model(**batch, src_lang=..., tgt_lang=...)` routes every example."""

    def __init__(self, base_model: nn.Module, config: MethodConfig, source_encoder: Optional[nn.Module] = None):
        super().__init__()
        refuse_wrapped_twice(base_model, config)
        self.base_model = base_model
        self.poly_config = config
        # A frozen encoder a source pass may read (FLARE-MT); kept out of the module tree: never saved or trained.
        self.__dict__["source_encoder"] = source_encoder
        if source_encoder is not None:
            source_encoder.requires_grad_(False)
        self.registry = LanguageRegistry(config.languages, config.shared_route)
        self.route_state = RouteState()
        self.calls = CallsInFlight()
        self._checkpointing_modules = checkpointing_modules(base_model)
        # This model's forward shows the base model's arguments, so transformers.Trainer keeps their columns.
        self.forward = types.MethodType(forward_with_signature_of(base_model), self)
        build = method_entry(config.method, type(config).__name__).build_layer
        shared: dict = {}  # what one method's layers of this model share while they are built
        self.routed_layers: dict[str, RoutedLinear] = replace_targets(
            base_model,
            config.target_modules,
            lambda name, linear: build(config, LayerSite(linear, name, side_of(base_model, name), self.route_state,
                                                         self.registry, shared, config.keep_base_dtype,
                                                         source_encoder)),
            accept_conv1d=config.handles_conv1d,
            by_default=config.targets_by_default,
        )
        mark_moe_experts(base_model, self.routed_layers)
        self.saved_modules = resolve_modules_to_save(base_model, config.modules_to_save, self.routed_layers)
        if config.freeze_base:
            freeze_all_but(base_model, [*self.route_parameters(), *(p for m in self.saved_modules.values()
                                                                   for p in m.parameters())])
            warn_if_head_frozen(base_model, self.saved_modules)
        # A plain transformers.Trainer saves state_dict() with safetensors, which refuses tied (shared) tensors.
        drop_tied_aliases_on_save(self)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    # ---- routing -------------------------------------------------------------------------------
    @torch.compiler.disable  # host-side checks of codes and ids: under torch.compile they would become guards
    def make_routes(
        self, src_lang: LanguageSpec = None, tgt_lang: LanguageSpec = None, batch_size: Optional[int] = None
    ) -> Routes:
        return self.registry.routes(src_lang, tgt_lang, batch_size, device=self.device_of_parameters())

    @contextmanager
    def routes(
        self,
        src_lang: LanguageSpec = None,
        tgt_lang: LanguageSpec = None,
        lang: LanguageSpec = None,
        batch_size: Optional[int] = None,
    ) -> Iterator[Routes]:
        """Routes for everything run inside the block: the base model, pipelines, generate."""
        with self.calls.running():  # a merge in another thread cannot start while this call runs
            with self.routes_of_call(src_lang, tgt_lang, lang, batch_size) as active:
                yield active

    @contextmanager
    def routes_of_call(self, src_lang: LanguageSpec, tgt_lang: LanguageSpec, lang: LanguageSpec,
                       batch_size: Optional[int]) -> Iterator[Routes]:
        self.check_not_spent("run")
        if self.adapters_disabled:
            yield None  # the plain base layers stand in for the routed ones (disable_adapter)
            return
        if lang is not None:
            if src_lang is not None or tgt_lang is not None:
                raise LanguageError("pass either lang= or src_lang=/tgt_lang=, not both")
            src_lang = tgt_lang = lang
        if src_lang is None and tgt_lang is None and self.poly_config.language_agnostic:
            yield None  # LoRA, Switch: their layers never read routes
            return
        if self.merged_route is not None:
            self._check_matches_merged(src_lang, tgt_lang, batch_size)
            yield self.registry.routes(*self.merged_route_codes, batch_size=None)
            return
        # Gradient checkpointing may have been switched on since the last call (Trainer, the user, any API).
        carry_routes_into_checkpoints(self._checkpointing_modules, self.route_state)
        with self.route_state.use(self.make_routes(src_lang, tgt_lang, batch_size)) as active:
            yield active

    # Under torch.compile this frame runs eagerly (the route arguments, codes or ids, never become guards)
    # and the base model it calls is compiled, reading the routes as id tensors.
    @torch.compiler.disable(recursive=False)
    def forward(self, *args: Any, src_lang: LanguageSpec = None, tgt_lang: LanguageSpec = None,
                lang: LanguageSpec = None, labels: Any = None, source_batch: Optional[dict] = None, **kwargs: Any):
        """The base model's forward with every example on its route; the other arguments go to the base model.

        Args:
            src_lang: The source language of each example: one code for the batch ("de"), a list or tuple of codes
                or a tensor of ids, one per example, or "shared" (the FD route).
            tgt_lang: The target language, given as src_lang is; LMS pair-wise reads (src, tgt), language-wise
                the encoder reads src and the decoder tgt.
            lang: One language for both sides (one-language tasks); not together with src_lang/tgt_lang.
            labels: Passed to the base model (named, so transformers.Trainer finds the label column).
            source_batch: For methods with a source pass (FLARE): the English batch fused into this one.
        """
        # `labels` is named so transformers.Trainer finds the label column of a wrapped model.
        if labels is not None:
            kwargs["labels"] = labels
        with self.routes(src_lang, tgt_lang, lang, batch_size=batch_size_of(args, kwargs)), \
                self.source_states(source_batch, kwargs):
            return self.base_model(*args, **kwargs)

    @contextmanager
    def source_states(self, source_batch: Optional[dict], target_batch: dict) -> Iterator[None]:
        """For methods that declare `needs_source_pass` (FLARE): their source pass over `source_batch` first,
        its per-layer states visible to the layers (this thread only) while the target batch runs."""
        if source_batch is None:
            yield
            return
        method = self.poly_config.method
        if not self.poly_config.needs_source_pass:
            raise ConfigError(f"source_batch= was given but method {method!r} has no source pass; call it without")
        if self.merged_route is not None:
            raise LanguageError("the adapter is merged into the base weights, so no source can be fused; "
                                "call unmerge() before a forward with source_batch=")
        states = method_entry(method).source_pass(self, source_batch, target_batch)
        with self.route_state.use_layer_inputs(states):
            yield

    def generate(self, *args, src_lang=None, tgt_lang=None, lang=None, **kwargs):
        """Generation with routes; beam search grows the batch and the routes follow it."""
        with self.routes(src_lang, tgt_lang, lang, batch_size=batch_size_of(args, kwargs)):
            return self.base_model.generate(*args, **kwargs)

    def device_of_parameters(self) -> torch.device:
        for parameter in self.base_model.parameters():
            return parameter.device
        return torch.device("cpu")

    # ---- parameters ----------------------------------------------------------------------------
    def parameter_counts(self) -> ParameterCounts:
        layers = list(self.routed_layers.values())
        languages = len(self.registry.languages)
        per_route = sum(layer.route_parameter_count(1) for layer in layers)
        added = sum(p.numel() for layer in layers for _, p in added_parameters(layer))
        base = sum(p.numel() for p in self.base_model.parameters()) - added
        # Full-rank language copies without a shared route replace the base linear they copy.
        replaced = sum(layer.replaced_base_parameter_count() for layer in layers)
        shared = shared_only = 0
        if self.registry.shared_route:
            # Most layers pay one route for "shared"; some (full-rank LS FFN, CLSR) reuse what they have.
            shared = sum(layer.shared_route_parameter_count() for layer in layers)
            shared_only = sum(layer.shared_route_only_parameter_count() for layer in layers)
        return ParameterCounts(
            base=base,
            language_specific=per_route * languages,
            shared_route=shared,
            training_extra=added - replaced,
            inference_extra_language_routes=added - shared_only - replaced,
            inference_extra_shared_route=shared,
        )

    def auxiliary_loss(self) -> torch.Tensor | float:
        """Sum of the extra training losses routed layers collected in the last forward (MoE balance,
        CLSR budget); 0.0 for methods that have none. Each layer's term is consumed by the call."""
        terms = [layer.pop_auxiliary_loss() for layer in self.routed_layers.values()]
        terms = [t for t in terms if t is not None]
        return sum(terms) if terms else 0.0

    def num_language_parameters(self) -> int:
        """Parameters of the language routes: L * d * (r + c) summed over the wrapped linears (LMS)."""
        return self.parameter_counts().language_specific

    # ---- merge ---------------------------------------------------------------------------------
    @property
    def merged_route(self) -> Optional[tuple[int, int]]:
        first = next(iter(self.routed_layers.values()), None)
        return first.merged_route if first is not None else None

    @property
    def merged_route_codes(self) -> tuple[str, str]:
        src, tgt = self.merged_route
        return self.registry.code_of(src), self.registry.code_of(tgt)

    def _route_pair(self, route: Optional[str], src: Optional[str], tgt: Optional[str]) -> tuple[int, int]:
        if route is not None:
            if src is not None or tgt is not None:
                raise LanguageError("pass either route= or src=/tgt=, not both")
            src = tgt = route
        if src is None and tgt is None and self.poly_config.language_agnostic:
            return 0, 0  # the layers ignore the route; any one will do
        if src is None and tgt is None:
            raise LanguageError(
                f"merge needs a route: route='shared' or src=/tgt= codes from {self.registry.allowed()}"
            )
        routes = self.registry.routes(src, tgt)
        return int(routes.src[0]), int(routes.tgt[0])

    def merge(self, route: Optional[str] = None, src: Optional[str] = None, tgt: Optional[str] = None) -> None:
        """Fold one route into the base weights: the model then runs at plain-model speed."""
        pair = self._route_pair(route, src, tgt)
        if self.merged_route is not None:
            raise LanguageError(f"route {self.merged_route_codes} is already merged; call unmerge() first")
        with self.calls.alone("merge"):
            self.merge_snapshot = MergeSnapshot.take(self.routed_layers)
            for layer in self.routed_layers.values():
                layer.merge(pair)

    def unmerge(self) -> None:
        if self.merged_route is None:
            return
        # Factors changed since merge (a training step, a load) must not change what unmerge subtracts.
        with self.calls.alone("unmerge"), self.merge_snapshot.factors_as_merged():
            for layer in self.routed_layers.values():
                layer.unmerge()

    def merge_and_unload(
        self, route: Optional[str] = None, src: Optional[str] = None, tgt: Optional[str] = None
    ) -> nn.Module:
        """The plain base model with one route folded in; this PolyModel is spent afterwards."""
        self.merge(route, src, tgt)
        with self.calls.alone("merge_and_unload"):
            restore_base_layers(self.base_model, self.routed_layers)
            self.routed_layers = {}
        return self.base_model

    def _check_matches_merged(self, src_lang: LanguageSpec, tgt_lang: LanguageSpec, batch_size) -> None:
        if src_lang is None and tgt_lang is None:
            return
        asked = self.registry.routes(src_lang, tgt_lang, batch_size)
        if not asked.homogeneous or (int(asked.src[0]), int(asked.tgt[0])) != self.merged_route:
            raise LanguageError(
                f"the model has route {self.merged_route_codes} merged into its weights and cannot "
                "run other routes; call unmerge() first"
            )

    # ---- added parameters ----------------------------------------------------------------------
    def route_parameters(self) -> list[nn.Parameter]:
        """The parameters the routed layers add (not the base linears they wrap)."""
        return [p for layer in self.routed_layers.values() for _, p in added_parameters(layer)]

    def added_state_dict(self) -> dict[str, torch.Tensor]:
        """What a save holds: the routed layers' added parameters and the `modules_to_save` (heads)."""
        routes = {
            f"{name}.{param_name}": parameter
            for name, layer in self.routed_layers.items()
            for param_name, parameter in added_parameters(layer)
        }
        return {**routes, **saved_module_tensors(self.saved_modules)}

    def check_not_spent(self, action: str) -> None:
        if not self.routed_layers:
            raise LanguageError(
                f"cannot {action}: this PolyModel was spent by merge_and_unload() or unload(), which gave its base "
                "model back; use the returned model, or build a new PolyModel (pp.wrap or PolyModel.from_pretrained)"
            )

    @property
    def adapters_disabled(self) -> bool:
        """Whether this thread is inside `disable_adapter()` (other threads keep their routes)."""
        return self.route_state.bypassed

    merge_snapshot = MergeSnapshot([])  # replaced by merge()


def refuse_wrapped_twice(base_model: nn.Module, config: MethodConfig) -> None:
    """A model that already holds routed layers is wrapped once: its layers would be wrapped inside each other."""
    routed = next((name for name, module in base_model.named_modules() if isinstance(module, RoutedLinear)), None)
    if isinstance(base_model, RoutedModel) or routed is not None:
        where = "it is a PolyModel" if isinstance(base_model, RoutedModel) else f"{routed!r} is a routed layer"
        raise LanguageError(
            f"this model is already wrapped ({where}); wrap it once with {type(config).__name__}: wrap the original "
            "base model, or take it back with unload() or merge_and_unload() first"
        )


def added_parameters(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """A routed layer's own parameters, without its wrapped base linear."""
    return [(n, p) for n, p in layer.named_parameters() if not n.startswith("base_layer.")]


ROUTE_ARGUMENTS = ("src_lang", "tgt_lang", "lang", "source_batch")


def forward_with_signature_of(base_model: nn.Module) -> Callable:
    """PolyModel.forward under the base model's signature plus the route arguments (tools that read a
    model's signature, such as Trainer's unused-column removal, then see the real inputs)."""
    def forward(self, *args, **kwargs):
        return RoutedModel.forward(self, *args, **kwargs)

    forward.__doc__ = RoutedModel.forward.__doc__

    try:
        base = inspect.signature(base_model.forward)
    except (TypeError, ValueError):
        return forward
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [p for p in base.parameters.values() if p.kind != p.VAR_KEYWORD and p.name not in ROUTE_ARGUMENTS]
    routing = [inspect.Parameter(name, keyword, default=None) for name in ROUTE_ARGUMENTS]
    rest = [p for p in base.parameters.values() if p.kind == p.VAR_KEYWORD]
    positional = [p for p in params if p.kind != keyword]
    keyword_only = [p for p in params if p.kind == keyword]
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    forward.__signature__ = inspect.Signature([self_parameter, *positional, *keyword_only, *routing, *rest])
    return forward


def batch_size_of(args: tuple, kwargs: dict) -> Optional[int]:
    for key in ("input_ids", "inputs_embeds", "attention_mask", "labels"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    if args and isinstance(args[0], torch.Tensor):
        return int(args[0].shape[0])
    return None

"""FLARE as a polypeft method: its config and routed layer (`layer`), its source pass (`source`), one register call.

Saved, loaded, merged and exported by PolyModel like every method; the two-stage recipe is in experiments.
"""
from ..registry import register_method
from .layer import FLAREConfig, build_flare_layer
from .source import source_states

register_method("flare", FLAREConfig, build_flare_layer, source_pass=source_states)

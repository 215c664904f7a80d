"""The routed methods; importing this package registers each one (its module ends in `register_method`)."""
from . import clsr, flare, lms, lora, ls_ffn, switch  # noqa: F401

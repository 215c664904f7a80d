"""Layers that wrap a base linear: LMS, LoRA and FLARE, and the baselines."""

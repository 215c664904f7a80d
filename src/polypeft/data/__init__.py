"""Corpora, splits, sampling and batching."""

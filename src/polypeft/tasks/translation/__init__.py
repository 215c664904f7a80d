"""tasks.translation."""

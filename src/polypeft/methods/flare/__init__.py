"""methods.flare."""

"""Parameter-free and top-layer interventions on hidden states (LRP2, LENS)."""

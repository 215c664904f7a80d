"""PolyModel and its files: a base model with routed layers, its save format, PEFT export, Hub and card."""

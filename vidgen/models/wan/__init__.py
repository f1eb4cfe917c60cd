"""Wan 2.x: LoRA file formats (the model, recipes and pipeline live beside them)."""

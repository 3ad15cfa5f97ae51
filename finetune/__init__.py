"""QLoRA fine-tuning on quantized bases: recipes, data, training, checkpoints, merge."""

__version__ = "0.1.0"

"""On-disk formats of quantized checkpoints."""

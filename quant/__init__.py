"""Quantized weights: GPTQ/RTN quantizers, on-disk formats, QuantLinear and kernels, perplexity."""

from quant.errors import UserError

__all__ = ["UserError"]

"""Quantized weights: GPTQ/AWQ/RTN quantizers, on-disk formats, packed layers and kernels, perplexity."""

import importlib

from quant.errors import UserError

# Public API, imported lazily so that `import quant` does not pull in torch.
_EXPORTS = {
    "GPTQConfig": "quant.gptq.solver",
    "gptq_quantize": "quant.gptq.solver",
    "HessianAccumulator": "quant.feedback",
    "GPTQLinear": "quant.gptq.nn",
    "QuantLinear": "quant.gptq.nn",
    "quantize_model": "quant.gptq.model",
    "quantize": "quant.gptq.model",
    "save_quantized": "quant.gptq.model",
    "load_gptq_model": "quant.gptq.model",
    "evaluate": "quant.eval",
    "perplexity": "quant.eval",
    "register_quantlinear": "quant.peft_support",
    "AWQConfig": "quant.awq.solver",
    "AWQLinear": "quant.awq.nn",
    "quantize_model_awq": "quant.awq.model",
    "quantize_awq": "quant.awq.model",
    "save_awq": "quant.awq.model",
    "load_awq_model": "quant.awq.model",
    "register_awqlinear": "quant.peft_support",
}

__all__ = ["UserError", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'quant' has no attribute {name!r}")

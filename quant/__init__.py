"""Quantized weights: GPTQ/AWQ/RTN quantizers, on-disk formats, packed layers and kernels, perplexity."""

from quant.errors import UserError

# Public API, imported lazily so that `import quant` (and the CLI's --help) does not pull in torch.
_EXPORTS = {
    "GPTQConfig": "quant.gptq",
    "gptq_quantize": "quant.gptq",
    "HessianAccumulator": "quant.gptq",
    "QuantLinear": "quant.nn",
    "quantize_model": "quant.model",
    "quantize": "quant.model",
    "save_quantized": "quant.model",
    "load_gptq_model": "quant.model",
    "evaluate": "quant.eval",
    "perplexity": "quant.eval",
    "register_quantlinear": "quant.peft_support",
    "AWQConfig": "quant.awq",
    "AWQLinear": "quant.nn_awq",
    "quantize_model_awq": "quant.awq_model",
    "quantize_awq": "quant.awq_model",
    "save_awq": "quant.awq_model",
    "load_awq_model": "quant.awq_model",
    "register_awqlinear": "quant.peft_support",
}

__all__ = ["UserError", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'quant' has no attribute {name!r}")

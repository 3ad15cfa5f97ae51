"""LoRA from peft on top of our packed layers (QuantLinear for GPTQ, AWQLinear for AWQ).

peft has no dispatcher for our layer (its GPTQ dispatcher only recognises GPTQModel's classes), but its
experimental custom-module API maps a layer type to a LoRA layer class. peft's own `GPTQLoraLinear`
fits unchanged: it calls the base layer and adds the LoRA path, and it never merges (peft refuses to
merge into GPTQ weights, doc D). It finds in/out sizes through `infeatures`/`outfeatures`, which
QuantLinear provides. Merging LoRA into a GPTQ or AWQ base is the merge's requantization (finetune merge).
"""

from __future__ import annotations

from quant.nn import QuantLinear


def register_quantlinear(lora_config):
    """Make `lora_config` (a peft LoraConfig) able to wrap QuantLinear modules; returns the same config."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    lora_config._register_custom_module({QuantLinear: GPTQLoraLinear})
    return lora_config


def register_awqlinear(lora_config):
    """The same for AWQLinear: peft's own AWQ dispatcher only recognises GPTQModel's AWQ layers, and its GPTQ
    LoRA layer (base output + LoRA path, never merged) fits any frozen packed layer."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    from quant.nn_awq import AWQLinear

    lora_config._register_custom_module({AWQLinear: GPTQLoraLinear})
    return lora_config


def packed_layer_types() -> tuple[type, ...]:
    """The frozen packed layer types a base can hold, which peft's 'all-linear' does not know."""
    from quant.nn_awq import AWQLinear

    return (QuantLinear, AWQLinear)


def register_packed_layers(lora_config):
    """Make `lora_config` able to wrap every packed layer type (`packed_layer_types`); returns the same config."""
    return register_awqlinear(register_quantlinear(lora_config))

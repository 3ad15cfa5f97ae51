"""LoRA from peft on top of our packed layers (GPTQLinear for GPTQ, AWQLinear for AWQ).

peft has no dispatcher for our layers (its GPTQ and AWQ dispatchers only recognise GPTQModel's classes), but its
experimental custom-module API maps a layer type to a LoRA layer class. peft's own `GPTQLoraLinear` fits
unchanged: it calls the base layer and adds the LoRA path, and it never merges (peft refuses to merge into GPTQ
weights, docs/quantized-formats.md D). It finds in/out sizes through `infeatures`/`outfeatures`, which our packed
layers provide. Merging LoRA into a GPTQ or AWQ base is the merge's requantization (finetune merge).

peft is imported where it is used: importing it takes ~10 s (it imports bitsandbytes), and the training run
imports this module whatever its base.
"""

from __future__ import annotations

from quant.awq.nn import AWQLinear
from quant.gptq.nn import GPTQLinear


def register_quantlinear(lora_config):
    """Make `lora_config` (a peft LoraConfig) able to wrap GPTQLinear modules; returns the same config."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    lora_config._register_custom_module({GPTQLinear: GPTQLoraLinear})
    return lora_config


def register_awqlinear(lora_config):
    """The same for AWQLinear: peft's own AWQ dispatcher only recognises GPTQModel's AWQ layers, and its GPTQ
    LoRA layer (base output + LoRA path, never merged) fits any frozen packed layer."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    lora_config._register_custom_module({AWQLinear: GPTQLoraLinear})
    return lora_config


def packed_layer_types() -> tuple[type, ...]:
    """The frozen packed layer types a base can hold, which peft's 'all-linear' does not know."""
    return (GPTQLinear, AWQLinear)


def register_packed_layers(lora_config):
    """Make `lora_config` able to wrap every packed layer type (`packed_layer_types`); returns the same config."""
    return register_awqlinear(register_quantlinear(lora_config))

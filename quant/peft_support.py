"""LoRA from peft on the layers it has no dispatcher for: the registry's `custom_lora_types`, our packed GPTQ and AWQ
layers (peft's own GPTQ and AWQ dispatchers only recognise GPTQModel's classes).

peft's experimental custom-module API maps a layer type to a LoRA layer class; each format names its class
(`Format.lora_layer`: for the packed layers peft's own `GPTQLoraLinear`, which calls the base layer, adds the LoRA
path and never merges, docs/quantized-formats.md D). peft finds in/out sizes through `infeatures`/`outfeatures`,
which our packed layers provide. Merging LoRA into a GPTQ or AWQ base is the merge's requantization (finetune merge).
"""

from __future__ import annotations

from quant.awq.nn import AWQLinear
from quant.formats import registry
from quant.gptq.nn import GPTQLinear


def register_lora_layers(lora_config, types: tuple[type, ...] | None = None):
    """Make `lora_config` (a peft LoraConfig) able to wrap every layer type peft has no dispatcher for (or those of
    them in `types`); returns the same config."""
    layers = {t: c for t, c in registry.lora_layers().items() if types is None or t in types}
    lora_config._register_custom_module(layers)
    return lora_config


def register_quantlinear(lora_config):
    """Make `lora_config` able to wrap GPTQLinear modules; returns the same config."""
    return register_lora_layers(lora_config, (GPTQLinear,))


def register_awqlinear(lora_config):
    """Make `lora_config` able to wrap AWQLinear modules; returns the same config."""
    return register_lora_layers(lora_config, (AWQLinear,))

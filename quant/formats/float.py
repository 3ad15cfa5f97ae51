"""Unquantized weights: the `none` training base (the float checkpoint in the compute dtype) and the bf16/fp16
merge outputs (plain Hugging Face checkpoints).

transformers is imported where it is used, as in every format module: the registry imports them all for `quant
--help`, to which transformers' model classes add ~1.4 s (2 cores)."""

from __future__ import annotations

from pathlib import Path

import torch

from quant.formats.base import BaseSpec, CastEncoder, EncodeRequest, Format, dtype_name
from quant.moe.convert import defuse_linear


class FloatBase(Format):
    """`base.quantization: none`: the float checkpoint, trained in the compute dtype; every setup shards it."""

    name = "none"
    label = "unquantized"
    base = True

    def load(self, spec: BaseSpec, device, attn_implementation=None):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=spec.dtype,
                                                     attn_implementation=attn_implementation)
        defuse_linear(model)  # a mixture of experts: one frozen nn.Linear per expert and projection (quant.moe)
        return model.to(device)


class FloatOutput(Format):
    """`--format bf16` / `fp16`: every floating tensor in that dtype, no quantization_config."""

    output = True
    fixed_dtype = True

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.default_dtype, self.gpu_compute_dtype = name, dtype, dtype

    def stores(self, config):
        return not config.get("quantization_config") and config.get("torch_dtype", config.get("dtype")) == \
            dtype_name(self.default_dtype)
        self.summary = "plain Hugging Face checkpoint (AutoModelForCausalLM.from_pretrained)"

    def encoder(self, request: EncodeRequest) -> CastEncoder:
        return CastEncoder(request.dtype, self.name)

    def load_merged(self, out_dir: Path, device, dtype):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=dtype).to(device).eval()

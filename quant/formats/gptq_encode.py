"""GPTQ (or RTN) requantization of a merged model, streamed one decoder layer at a time (`finetune merge
--format gptq`); the streaming itself is `quant.formats.layerwise`.

Each layer is quantized by `quant.sequential.quantize_blocks`, the driver behind `quant gptq`, so merge
output and `quant gptq` output share one algorithm (true-sequential groups, damping retries, act-order,
the layer log).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quant.formats.gptq import quantization_config, write_quant_config
from quant.formats.layerwise import LayerwiseEncoder
from quant.gptq import GPTQConfig
from quant.nn import QuantLinear
from quant.sequential import quantize_blocks


class GPTQEncoder(LayerwiseEncoder):
    """Turns each merged unit into GPTQ checkpoint tensors.

    `calib`: list of [1, T] token ids; None only for cfg.method == 'rtn'. Non-quantized tensors are written
    in `out_dtype` (fp16 by default: what GPTQ readers, vLLM's kernels among them, expect).
    """

    packed = QuantLinear

    def __init__(self, model, cfg: GPTQConfig, checkpoint_format: str, calib: list[torch.Tensor] | None,
                 device: torch.device, run_dtype: torch.dtype, out_dtype: torch.dtype):
        super().__init__(model, cfg.calibrated, calib, device, run_dtype, out_dtype)
        self.cfg, self.format = cfg, checkpoint_format
        self.label = f"gptq, {cfg.method}"

    def quantize_layer(self, wrapper, index_ids, head):
        return quantize_blocks(wrapper, index_ids, self.cfg, device=self.device, checkpoint_format=self.format,
                               progress=False)

    def quantization_config(self) -> dict:
        return quantization_config(self.cfg, self.format)

    def write_files(self, directory: Path) -> None:
        """quantize_config.json (format doc A6: repeated for AutoGPTQ-style readers) and the per-layer log."""
        write_quant_config(directory, None, self.quantization_config())
        (directory / "quant_log.json").write_text(json.dumps({"method": self.cfg.method, **self.log()}, indent=1))

    def describe(self) -> dict:
        return {**self.cfg.to_dict(), "checkpoint_format": self.format}

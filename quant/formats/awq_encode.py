"""AWQ requantization of a merged model, streamed one decoder layer at a time (`finetune merge --format awq`);
the streaming itself is `quant.formats.layerwise`.

Each layer is quantized by `quant.awq_blocks.quantize_blocks_awq`, the driver behind `quant awq`, so a merge
output and a `quant awq` output share one algorithm: the scale search on the layer's real (merged, requantized
up to here) inputs, folds into the layer's own norms and projections (so the written norm weights are the
folded ones), the clipping search and the layer log.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quant.awq import AWQConfig
from quant.awq_blocks import quantize_blocks_awq
from quant.formats.awq import quantization_config
from quant.formats.gptq import write_quant_config
from quant.formats.layerwise import LayerwiseEncoder
from quant.nn_awq import AWQLinear


class AWQEncoder(LayerwiseEncoder):
    """Turns each merged unit into AWQ gemm checkpoint tensors (quant/formats/AWQ.md). Non-quantized tensors
    are written in `out_dtype` (fp16 by default: what vLLM's AWQ kernels expect)."""

    packed = AWQLinear

    def __init__(self, model, cfg: AWQConfig, calib: list[torch.Tensor] | None, device: torch.device,
                 run_dtype: torch.dtype, out_dtype: torch.dtype):
        super().__init__(model, cfg.calibrated, calib, device, run_dtype, out_dtype)
        self.cfg = cfg
        self.scales: list[dict] = []
        self.label = f"awq, {cfg.method}"

    def quantize_layer(self, wrapper, index_ids, head):
        report = quantize_blocks_awq(wrapper, index_ids, self.cfg, device=self.device, progress=False)
        for entry in report.scales:
            self.scales.append({**entry, "layers": [head + n.split(".", 2)[-1] for n in entry["layers"]]})
        return report

    def quantization_config(self) -> dict:
        meta = {k: v for k, v in self.cfg.to_dict().items() if k not in ("bits", "group_size")}
        return quantization_config(self.cfg.bits, self.cfg.group_size, meta=meta)

    def write_files(self, directory: Path) -> None:
        """quantize_config.json (as `quant awq` writes it) and the per-layer log with the chosen scales."""
        write_quant_config(directory, None, self.quantization_config())
        log = {"method": self.cfg.method, **self.log(), "scales": self.scales}
        (directory / "quant_log.json").write_text(json.dumps(log, indent=1))

    def describe(self) -> dict:
        return self.cfg.to_dict()

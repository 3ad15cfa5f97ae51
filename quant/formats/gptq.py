"""The GPTQ format object (docs/quantized-formats.md section A): a training base loaded from its packed tensors
(`quant.gptq.nn.GPTQLinear`), and a merge output requantized by our GPTQ on the merged model's own activations,
one decoder layer at a time (`GPTQEncoder`, streaming through `quant.formats.layerwise`). The checkpoint layout
itself is `quant.gptq.pack`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.formats.base import METHOD_HELP, EncodeRequest, option
from quant.formats.layerwise import LayerwiseEncoder
from quant.formats.packed_base import PackedFormat, PackedRebuilder
from quant.gptq.blocks import quantize_blocks
from quant.gptq.kernels import dequantize_layer
from quant.gptq.model import check_layers_fit, load_gptq_model
from quant.gptq.nn import GPTQLinear
from quant.gptq.pack import (PARTS, QUANT_METHOD, quantization_config, read_quant_config, resolve_checkpoint_format,
                             zero_offset)
from quant.gptq.solver import METHODS, GPTQConfig
from quant.moe.convert import prepare_quantization
from quant.packed import write_quant_config


class _GPTQRebuilder(PackedRebuilder):
    """Packed layers come back dequantized (quant's reference kernel) as `<module>.weight` in fp32."""

    label, parts, in_features_of = "GPTQ", PARTS, "g_idx"

    def __init__(self, ckpt, device):
        super().__init__(ckpt, device)
        q = read_quant_config(ckpt.path)
        self.bits, self.zero_offset = q["bits"], zero_offset(q["checkpoint_format"])

    def dequantize(self, module, parts):
        return dequantize_layer(parts, self.bits, self.zero_offset)


class GPTQEncoder(LayerwiseEncoder):
    """Turns each merged unit into GPTQ checkpoint tensors with `quant.gptq.blocks.quantize_blocks`, the driver
    behind `quant gptq`, so merge output and `quant gptq` output share one algorithm (true-sequential groups,
    damping retries, act-order, the layer log).

    `calib`: list of [1, T] token ids; None only for cfg.method == 'rtn'. Non-quantized tensors are written
    in `out_dtype` (fp16 by default: what GPTQ readers, vLLM's kernels among them, expect).
    """

    packed = GPTQLinear

    def __init__(self, model, cfg: GPTQConfig, checkpoint_format: str, calib: list[torch.Tensor] | None,
                 device: torch.device, run_dtype: torch.dtype, out_dtype: torch.dtype):
        super().__init__(model, cfg.calibrated, calib, device, run_dtype, out_dtype)
        self.cfg, self.format = cfg, checkpoint_format
        self.label = f"gptq, {cfg.method}"

    def quantize_layer(self, wrapper, index_ids, head):
        return quantize_blocks(wrapper, index_ids, self.cfg, device=self.device, checkpoint_format=self.format,
                               progress=False)

    def quantization_config(self) -> dict:
        return self.keep_routers(quantization_config(self.cfg, self.format))

    def write_files(self, directory: Path) -> None:
        """quantize_config.json (format doc A6: repeated for AutoGPTQ-style readers) and the per-layer log."""
        write_quant_config(directory, None, self.quantization_config())
        (directory / "quant_log.json").write_text(json.dumps({"method": self.cfg.method, **self.log()}, indent=1))

    def describe(self) -> dict:
        return {**self.cfg.to_dict(), "checkpoint_format": self.format}


@dataclass
class GPTQOptions:
    method: str | None = option(METHOD_HELP, str, METHODS)
    # bits and group_size are shared with the AWQ output (one flag each, this help): say both formats' values.
    bits: int | None = option("default: a GPTQ/AWQ base's own, else 4 (awq: 4 only)", int, (2, 3, 4, 8))
    group_size: int | None = option("default: a GPTQ/AWQ base's own, else 128; gptq: -1 = one group per row; awq: "
                                    "32, 64 or 128", int)
    desc_act: bool | None = option("act-order; default: the GPTQ base's, else off", bool)


class GPTQFormat(PackedFormat):
    name = "gptq"
    label = "GPTQ"
    summary = ("our GPTQ on --calib data, run on the merged model's own activations layer by layer (default "
               "settings: those a GPTQ base records, else quant gptq's: 4-bit g128 symmetric, act-order, MSE clipping, "
               "decorrelate 0.25); --method rtn for round-to-nearest (no calibration). Loads with "
               "quant.load_gptq_model, transformers + GPTQModel/optimum and vLLM (docs/quantized-formats.md A).")
    quant_method = QUANT_METHOD
    options = GPTQOptions
    packed_layer = GPTQLinear
    packed_what = "GPTQ scales"
    methods = METHODS

    def declares(self, quantization_config, model_dir):
        if super().declares(quantization_config, model_dir):
            return True
        # AutoGPTQ-era directories: no config.json, only quantize_config.json.
        return (quantization_config is None and model_dir is not None and not (model_dir / "config.json").exists()
                and (model_dir / "quantize_config.json").exists())

    def settings(self, model_dir, double_quant, quant_storage, compute_dtype):
        q = read_quant_config(model_dir)
        return {"checkpoint_format": q["checkpoint_format"], **q["recorded"]}

    def load_packed(self, model_dir, device, dtype):
        return load_gptq_model(model_dir, device=device, dtype=dtype)

    def exact_route(self, quantization_config: dict) -> str | None:
        # Readers fix a symmetric grid's zero points (2^(bits-1)): only the codes can carry an update there.
        return "codes" if quantization_config.get("sym", True) else "zeros"

    def rebuilder(self, spec, ckpt, model, device):
        return _GPTQRebuilder(ckpt, device)

    def gptq_config(self, base, options: GPTQOptions | None):
        """What the merge requantizes with: GPTQConfig's defaults (`quant gptq`'s), under the settings a GPTQ base
        records (bits, group size, act-order, symmetry, damping, mse, decorrelate, ...), under the options given
        (method, bits, group size, act-order). The method is the merge's own: a base's describes the base."""
        recorded = {}
        if base.format == self.name:
            keep = {f.name for f in dataclasses.fields(GPTQConfig)} - {"method"}
            recorded = {k: v for k, v in base.settings.items() if k in keep}
        given = {k: v for k, v in dataclasses.asdict(options or GPTQOptions()).items() if v is not None}
        return GPTQConfig(**{**recorded, **given}).validate()

    def encoder(self, request: EncodeRequest):
        cfg = self.gptq_config(request.base, request.options)
        prepare_quantization(request.model, "GPTQ", skeleton=True)
        check_layers_fit(request.model, cfg)
        run_dtype = torch.float32 if request.device.type == "cpu" else torch.float16
        return GPTQEncoder(request.model, cfg, resolve_checkpoint_format(cfg.sym), request.calib, request.device,
                           run_dtype, request.dtype)

"""The AWQ format object (docs/awq-format.md): a training base loaded from its packed tensors
(`quant.awq.nn.AWQLinear`), and a merge output requantized by our AWQ on the merged model's own activations, one
decoder layer at a time (`AWQEncoder`, streaming through `quant.formats.layerwise`). The checkpoint layout itself
is `quant.awq.pack`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.arch import describe
from quant.awq.blocks import quantize_blocks_awq
from quant.awq.kernels import dequantize_layer
from quant.awq.model import check_layers_fit_awq, checkpoint_config, load_awq_model, recorded_settings
from quant.awq.nn import AWQLinear
from quant.awq.pack import BITS, GROUP_SIZES, METHODS, PARTS, QUANT_METHOD, is_awq_checkpoint, layer_group_size, \
    read_quant_config
from quant.awq.solver import AWQConfig
from quant.formats.base import METHOD_HELP, EncodeRequest, option
from quant.formats.layerwise import LayerwiseEncoder
from quant.formats.packed_base import PackedFormat, PackedRebuilder
from quant.moe.convert import prepare_quantization
from quant.packed import write_quant_config

# The one place where the merge's AWQ differs from `quant awq`: it picks codes by dithered rounding (unbiased
# stochastic rounding inside the error feedback). A merged weight is the base's grid point plus a LoRA delta far below
# half a step; nearest rounding, with or without the feedback, returns most weights to the base's codes and drops the
# adapter (quickstart retention 0.57), while dithered rounding keeps the delta in expectation.
MERGE_ROUNDING = "dithered"


class _AWQRebuilder(PackedRebuilder):
    """Packed layers come back dequantized (quant's reference kernel) as `<module>.weight` in fp32, exactly the
    weights AWQLinear computes with."""

    label, parts, in_features_of = "AWQ", PARTS, "qweight"

    def __init__(self, ckpt, device):
        super().__init__(ckpt, device)
        self.group_size = read_quant_config(ckpt.path)["group_size"]

    def dequantize(self, module, parts):
        K = parts["qweight"].shape[0]
        gs = layer_group_size(K, parts["scales"].shape[0], self.group_size, f"{self.ckpt.path}: {module}")
        return dequantize_layer(parts, gs)


class AWQEncoder(LayerwiseEncoder):
    """Turns each merged unit into AWQ gemm checkpoint tensors with `quant.awq.blocks.quantize_blocks_awq`, the
    driver behind `quant awq`, so a merge output and a `quant awq` output share one algorithm: the scale search on
    the layer's real (merged, requantized up to here) inputs, folds into the layer's own norms and projections (so
    the written norm weights are the folded ones), the clipping search and the layer log. Non-quantized tensors
    are written in `out_dtype` (fp16 by default: what vLLM's AWQ kernels expect)."""

    packed = AWQLinear

    def __init__(self, model, cfg: AWQConfig, calib: list[torch.Tensor] | None, device: torch.device,
                 run_dtype: torch.dtype, out_dtype: torch.dtype):
        super().__init__(model, cfg.calibrated, calib, device, run_dtype, out_dtype)
        self.cfg = cfg
        self.scales: list[dict] = []
        self.label = f"awq, {cfg.method}"

    def quantize_layer(self, wrapper, index_ids, head):
        report = quantize_blocks_awq(wrapper, index_ids, self.cfg, device=self.device, progress=False,
                                     norm_offset=describe(self.model.config).family.norms.offset)
        for entry in report.scales:
            self.scales.append({**entry, "layers": [head + n.split(".", 2)[-1] for n in entry["layers"]]})
        return report

    def quantization_config(self) -> dict:
        return self.keep_routers(checkpoint_config(self.cfg))

    def write_files(self, directory: Path) -> None:
        """quantize_config.json (as `quant awq` writes it) and the per-layer log with the chosen scales."""
        write_quant_config(directory, None, self.quantization_config())
        log = {"method": self.cfg.method, **self.log(), "scales": self.scales}
        (directory / "quant_log.json").write_text(json.dumps(log, indent=1))

    def describe(self) -> dict:
        return self.cfg.to_dict()


@dataclass
class AWQOptions:
    method: str | None = option(METHOD_HELP, str, METHODS)
    bits: int | None = option("default: 4, the only width of the AWQ gemm format", int, (BITS,))
    group_size: int | None = option("default: the AWQ base's, else 128 (32 or 64 for in_features like SmolLM2's "
                                    "576, which vLLM needs divisible)", int, GROUP_SIZES)


class AWQFormat(PackedFormat):
    name = "awq"
    label = "AWQ"
    summary = ("our AWQ on --calib data, run on the merged model's own activations layer by layer (default "
               "settings: those an AWQ base records, else quant awq's: 4-bit g128 with zero points; codes by dithered "
               "rounding); --method rtn for round-to-nearest on the same grid (no calibration). Loads with "
               "quant.load_awq_model, vLLM (awq, awq_marlin), transformers and GPTQModel (docs/awq-format.md).")
    quant_method = QUANT_METHOD
    options = AWQOptions
    packed_layer = AWQLinear
    packed_what = "AWQ scales"
    folds_scales = True
    methods = METHODS

    def declares(self, quantization_config, model_dir):
        if super().declares(quantization_config, model_dir):
            return True
        # AutoAWQ-era directories: no quantization_config in config.json, a quant_config.json next to it.
        return quantization_config is None and model_dir is not None and is_awq_checkpoint(model_dir)

    def settings(self, model_dir, double_quant, quant_storage, compute_dtype):
        q = read_quant_config(model_dir)
        return {"zero_point": q["zero_point"], "version": q["version"], **recorded_settings(q)}

    def load_packed(self, model_dir, device, dtype):
        return load_awq_model(model_dir, device=device, dtype=dtype)

    def exact_route(self, quantization_config: dict) -> str | None:
        return "zeros" if quantization_config.get("zero_point", True) else None  # no zero points: nothing to move

    def rebuilder(self, spec, ckpt, model, device):
        return _AWQRebuilder(ckpt, device)

    def awq_config(self, base, options: AWQOptions | None):
        """What the merge requantizes with: AWQConfig's defaults (`quant awq`'s), under the settings an AWQ base
        records (group size, search settings, decorrelate, ...), under the options given (method, bits, group
        size), with MERGE_ROUNDING. The merged weights are new, so scales are searched again unless --method rtn
        asks for plain rounding: a base's recorded method and rounding describe the base, not the merge."""
        recorded = {}
        if base.format == self.name:
            keep = {f.name for f in dataclasses.fields(AWQConfig)} - {"method", "rounding"}
            recorded = {k: v for k, v in base.settings.items() if k in keep}
        given = {k: v for k, v in dataclasses.asdict(options or AWQOptions()).items() if v is not None}
        cfg = AWQConfig(**{**recorded, **given})
        cfg.rounding = MERGE_ROUNDING if cfg.calibrated else "nearest"  # round-to-nearest rounds to nearest
        return cfg.validate()

    def encoder(self, request: EncodeRequest):
        cfg = self.awq_config(request.base, request.options)
        prepare_quantization(request.model, "AWQ", skeleton=True)
        check_layers_fit_awq(request.model, cfg)
        run_dtype = torch.float32 if request.device.type == "cpu" else torch.float16
        return AWQEncoder(request.model, cfg, request.calib, request.device, run_dtype, request.dtype)

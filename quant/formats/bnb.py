"""bitsandbytes formats: NF4/FP4 (`Linear4bit`) and LLM.int8 (`Linear8bitLt`), as training bases (quantized
while the float checkpoint loads) and as merge outputs (bitsandbytes' own serialization, which transformers loads
with no extra arguments).

A bitsandbytes base is never stored quantized, so the merge rebuilds the weight training saw one tensor at a time
from the float checkpoint, with the settings the base was loaded with: NF4/FP4 cast to the compute dtype and
quantized in blocks of `BLOCKSIZE` with the base's double quantization and storage dtype; int8 through fp16, as
`Int8Params` does. Tests compare both rebuilds bit for bit with the layers training builds.

bitsandbytes itself (imported on first use), its reference CPU layout and its quantization ops are
`quant.formats.bnb_lib`. transformers is imported where it is used, as in every format module (quant.formats.float
says why).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from quant.errors import UserError
from quant.formats.base import BaseSpec, EncodeRequest, Format, LinearEncoder, Rebuilder, dtype_name
from quant.formats.bnb_experts import (STORAGE, NF4Stack, StackWeight, encode_experts, load_experts, nf4_experts,
                                      round_trip)
from quant.formats.bnb_lib import (BLOCKSIZE, Bnb4Weight, keep_reference_layout, nn_types, quant_state_tensors,
                                   quantize_4bit, quantize_int8, rebuild_4bit, rebuild_int8)
from quant.moe.convert import architecture, defuse
from quant.moe.layout import map_fused


def storage_dtype(quant_storage: str, compute: torch.dtype) -> torch.dtype:
    """The dtype 4-bit weights are packed into: `auto` = the compute dtype (shardable by ZeRO-3/FSDP)."""
    return compute if quant_storage == "auto" else getattr(torch, quant_storage)


def bnb_linear_names(model: nn.Module, skip_modules=None) -> set[str]:
    """Linear modules that transformers replaces by bitsandbytes layers (same rule and skip list as it uses)."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = HfQuantizer.get_modules_to_not_convert(model, skip_modules, getattr(model, "_keep_in_fp32_modules", None))
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            raise UserError(f"{type(model).__name__} uses GPT-2 style Conv1D layers ({name}); merge supports "
                            "nn.Linear models")
        if type(module) is nn.Linear and should_convert_module(name, keep):
            names.add(name)
    return names


class _BnbRebuilder(Rebuilder):
    """The Linears in `names` rebuilt by `rebuild(W)`, a mixture of experts' experts by `experts(W)` per expert
    and projection (their NF4 storage, quant.formats.bnb_experts)."""

    def __init__(self, ckpt, device, names: set[str], rebuild, experts=None):
        super().__init__(ckpt, device)
        self.names, self.rebuild, self.experts = names, rebuild, experts

    @torch.no_grad()
    def load(self, keys):
        out = super().load(keys)
        for key in list(out):
            module, _, leaf = key.rpartition(".")
            if leaf == "weight" and module in self.names:
                out[key] = self.rebuild(out[key])
        if self.experts is not None and self.arch is not None and self.arch.is_moe:
            map_fused(self.arch, out, lambda _projection, W: self.experts(W))
        return out


class Bnb4Encoder(LinearEncoder):
    """bitsandbytes 4-bit serialization (docs/quantized-formats.md B1): `<m>.weight` packed uint8 plus
    `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
    `weight.quant_state.bitsandbytes__<type>`. Quantizing the weight cast to `dtype` is what
    `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` does to a `dtype`
    checkpoint, so the file equals the ecosystem's own conversion of the merged model."""

    def __init__(self, names, dtype, fmt: "Bnb4Format", arch=None):
        super().__init__(names, dtype, fmt.name)
        self.fmt, self.arch = fmt, arch

    def __call__(self, layer, tensors):
        if self.arch is None:
            return super().__call__(layer, tensors)
        tensors = dict(tensors)
        experts = encode_experts(self.arch, tensors, self.fmt.name, self.dtype)
        return {**super().__call__(layer, tensors), **experts}

    def encode_weight(self, module, weight):
        q, state = quantize_4bit(weight, self.fmt.name, True, self.dtype, torch.uint8)
        key = f"{module}.weight"
        return {key: q, **{f"{key}.{part}": value for part, value in state.as_dict(packed=True).items()}}

    def quantization_config(self):
        config = self.fmt.bnb_config(self.dtype, double_quant=True, storage=torch.uint8).to_dict()
        # bitsandbytes has no layer for experts: ours load through finetune chat/generate/eval (load_merged)
        return {**config, "experts_storage": STORAGE} if self.arch is not None else config


class Int8Encoder(LinearEncoder):
    """LLM.int8 serialization (B5): `<m>.weight` int8 row-major, `<m>.SCB` fp32, `<m>.weight_format` = 0."""

    def __init__(self, names, dtype, fmt: "Int8Format"):
        super().__init__(names, dtype, fmt.name)
        self.fmt = fmt

    def encode_weight(self, module, weight):
        CB, SCB = quantize_int8(weight)
        return {f"{module}.weight": CB, f"{module}.SCB": SCB.float(),
                f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}  # row-major, the only kind loaded

    def quantization_config(self):
        return self.fmt.bnb_config(self.dtype).to_dict()


class _BnbFormat(Format):
    base = output = True
    layer_class = ""  # its layers' class in bitsandbytes.nn

    def layer_types(self):
        return nn_types(self.layer_class)

    def storage(self, layer):
        return [layer.weight, *quant_state_tensors(getattr(layer.weight, "quant_state", None))]

    def bnb_config(self, compute: torch.dtype, double_quant: bool = True, storage: torch.dtype = torch.uint8):
        raise NotImplementedError

    def _spec_config(self, spec: BaseSpec):
        raise NotImplementedError

    def load(self, spec, device, attn_implementation=None):
        from transformers import AutoModelForCausalLM
        from transformers.integrations import is_deepspeed_zero3_enabled

        kwargs = {"dtype": spec.dtype, "attn_implementation": attn_implementation,
                  "quantization_config": self._spec_config(spec)}
        # bitsandbytes quantizes while moving weights to their device, so the map must be explicit; except
        # under DeepSpeed ZeRO-3, where transformers refuses a map and uses the current device.
        if not is_deepspeed_zero3_enabled():
            kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(spec.model_dir, **kwargs)
        # Before any forward: an eval pass would otherwise convert 4-bit weights to a CPU bf16 layout for good.
        keep_reference_layout(model)
        self._experts(model, spec)
        if torch.device(device).type == "cpu":
            _own_unquantized_tensors(model)
        return model

    def _experts(self, model, spec: BaseSpec) -> None:
        """A mixture of experts' fused expert parameters, which transformers' bitsandbytes path leaves in the compute
        dtype: quantized here (Bnb4Format) or refused (int8)."""
        arch = architecture(model)
        if arch is not None:
            raise UserError(f"base.quantization = '{self.name}': the {arch.family.title} experts cannot be stored in "
                            f"{self.title} (bitsandbytes quantizes nn.Linear only); use nf4 or fp4")

    def same_grid(self, base):
        return base is self

    def load_merged(self, out_dir: Path, device, dtype):
        from transformers import AutoModelForCausalLM

        # transformers keeps a pre-quantized bitsandbytes checkpoint's unquantized tensors in its stored dtype
        # whatever `dtype` says, so move them (never the packed weights) and the 4-bit compute dtype explicitly.
        model = AutoModelForCausalLM.from_pretrained(str(out_dir), device_map={"": str(device)})
        for m in model.modules():
            for p in m.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
            if isinstance(m, nn_types("Linear4bit")):
                m.compute_dtype = dtype
        keep_reference_layout(model)  # else eval mode computes through bitsandbytes' CPU bf16 kernel
        return model.eval()


def _own_unquantized_tensors(model: nn.Module) -> None:
    """Copy the tensors that stay unquantized (embeddings, norms, LM head) out of the checkpoint file.

    On CPU, with the file's dtype, transformers leaves them as views of the memory-mapped safetensors file, which
    then stays mapped for the whole run with every page the quantization read resident: SmolLM2's fp32 file kept
    ~400 MiB of RSS for ~110 MiB of such tensors.
    """
    quantized = nn_types("Params4bit", "Int8Params")
    for module in model.modules():
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor.is_floating_point() and not isinstance(tensor, quantized):
                tensor.data = tensor.data.clone()


class Bnb4Format(_BnbFormat):
    """NF4 or FP4 (bitsandbytes Linear4bit), with double quantization and a storage dtype."""

    def stores(self, config):
        qc = config.get("quantization_config") or {}
        return (qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))
                and qc.get("bnb_4bit_quant_type", "fp4") == self.name)

    summary = f"bitsandbytes 4-bit serialization with its quantization_config (double quant, blocksize {BLOCKSIZE})"
    layer_class = "Linear4bit"

    def layer_types(self):
        return super().layer_types() + (NF4Stack,)

    def storage(self, layer):
        return layer.storage() if isinstance(layer, NF4Stack) else super().storage(layer)

    def _experts(self, model, spec):
        """Each expert of each MoE layer quantized on its own (quant.formats.bnb_experts), as an expert-by-expert
        Linear4bit conversion would: transformers loaded the fused parameters in the compute dtype, and drops them
        layer by layer here (the load's peak holds them all once)."""
        storage = self._storage(spec)
        arch = architecture(model)
        if arch is None:
            return
        if storage != torch.uint8:
            raise UserError(f"base.quant_storage = '{dtype_name(storage)}': the {arch.family.title} experts are "
                            "stored as uint8 4-bit codes; set base.quant_storage: uint8 (expert storage is not sharded)")
        nested = bool(spec.settings.get("double_quant", True))
        defuse(model, lambda path, s, mats: nf4_experts(s, mats, self.name, nested, spec.dtype), arch)

    def __init__(self, quant_type: str):
        self.name = quant_type

    def bnb_config(self, compute, double_quant=True, storage=torch.uint8):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.name,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute,
                                  bnb_4bit_quant_storage=storage)

    def settings(self, model_dir, double_quant, quant_storage, compute_dtype):
        return {"double_quant": bool(double_quant),
                "quant_storage": dtype_name(storage_dtype(quant_storage, compute_dtype))}

    def _storage(self, spec: BaseSpec) -> torch.dtype:
        return getattr(torch, spec.settings.get("quant_storage", "uint8"))

    def _spec_config(self, spec):
        return self.bnb_config(spec.dtype, spec.settings.get("double_quant", True), self._storage(spec))

    def frozen_weight(self, layer):
        if isinstance(layer, NF4Stack):
            return StackWeight(layer)
        # bitsandbytes' dequantize op reads packed uint8 storage; a float quant_storage (for sharding) is refused
        w = layer.weight
        return Bnb4Weight(layer) if w.dtype == torch.uint8 and getattr(w, "quant_state", None) is not None else None

    def rebuilder(self, spec, ckpt, model, device):
        double_quant, storage = spec.settings.get("double_quant", True), self._storage(spec)
        return _BnbRebuilder(ckpt, device, bnb_linear_names(model),
                             lambda W: rebuild_4bit(W, self.name, double_quant, spec.dtype, storage),
                             lambda W: round_trip(W, self.name, double_quant, spec.dtype))

    def sharding_problem(self, spec, setup):
        storage = self._storage(spec)
        if setup.shards_parameters and not storage.is_floating_point:
            return (f"{setup.where} cannot shard 4-bit weights stored as {dtype_name(storage)}; "
                    "set base.quant_storage: auto (stores them in the compute dtype)")
        cast = setup.cast_dtype
        if cast is not None and storage.is_floating_point and storage != cast:
            return setup.cast_problem(f"4-bit weights stored as {dtype_name(storage)}")
        return None

    def encoder(self, request: EncodeRequest):
        return Bnb4Encoder(bnb_linear_names(request.model), request.dtype, self, architecture(request.model))

    def load_merged(self, out_dir, device, dtype):
        """A mixture of experts' output: transformers loads all but the experts (its load report, which lists them
        as missing and the stacks as unexpected, is silenced), then the experts' stacks replace them."""
        config = json.loads((Path(out_dir) / "config.json").read_text())
        if (config.get("quantization_config") or {}).get("experts_storage") != STORAGE:
            return super().load_merged(out_dir, device, dtype)
        report = logging.getLogger("transformers.modeling_utils")
        level = report.level
        report.setLevel(logging.ERROR)
        try:
            model = super().load_merged(out_dir, device, dtype)
        finally:
            report.setLevel(level)
        load_experts(model, out_dir, architecture(model), self.name, dtype, torch.device(device))
        return model


class Int8Format(_BnbFormat):
    """LLM.int8 (bitsandbytes Linear8bitLt): integer parameters, which ZeRO-3/FSDP cannot shard."""

    name = "int8"
    summary = "bitsandbytes LLM.int8 serialization (weight int8 + SCB)"
    layer_class = "Linear8bitLt"

    def stores(self, config):
        qc = config.get("quantization_config") or {}
        return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_8bit"))

    def bnb_config(self, compute, double_quant=True, storage=torch.uint8):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)

    def _spec_config(self, spec):
        return self.bnb_config(spec.dtype)

    def rebuilder(self, spec, ckpt, model, device):
        return _BnbRebuilder(ckpt, device, bnb_linear_names(model), lambda W: rebuild_int8(W, spec.dtype))

    def sharding_problem(self, spec, setup):
        if setup.shards_parameters:
            return (f"{setup.where} cannot shard bitsandbytes int8 weights (integer parameters); use "
                    "base.quantization: nf4 with base.quant_storage: auto, or DDP/ZeRO-2")
        return None

    def encoder(self, request):
        return Int8Encoder(bnb_linear_names(request.model), request.dtype, self)

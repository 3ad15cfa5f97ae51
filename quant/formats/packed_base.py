"""What the GPTQ and AWQ formats share: checkpoints of packed integer tensors that our own packed layer
(quant.packed.PackedLinear) computes with. A training base is loaded from its checkpoint, a merge output is read
back by the same loader, the merge reads a base by dequantizing each packed layer (`PackedRebuilder`), and peft
adapts the layers through its GPTQ LoRA layer, registered as a custom module (it calls the base layer and adds the
LoRA path, and never merges: docs/quantized-formats.md D).

peft is imported where it is used: importing it takes ~10 s (it imports bitsandbytes), and this module is on the
import path of `quant --help`.
"""

from __future__ import annotations

import torch

from quant.errors import UserError
from quant.formats.base import REQUIRED, Format, FrozenWeight, Rebuilder
from quant.packed import PackedLinear


class PackedWeight(FrozenWeight):
    """A packed layer's weight, dequantized by the layer itself."""

    kind = "packed"

    def __call__(self, dtype, slot=0):
        return self.layer.dequantize(dtype)


class PackedRebuilder(Rebuilder):
    """A packed-weight checkpoint (GPTQ, AWQ): the `parts` tensors of each packed Linear come back dequantized as
    its `<module>.weight`; a subclass names the parts and the tensor holding the input width, and dequantizes."""

    label = ""  # how messages name the format
    parts: tuple[str, ...] = ()
    in_features_of = ""  # the part whose first dimension is in_features

    def dequantize(self, module: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def weight_shape(self, module):
        disk = self.disk_name(module)
        if f"{disk}.qweight" in self.ckpt.file_of:
            return self.ckpt.shape(f"{disk}.scales")[1], self.ckpt.shape(f"{disk}.{self.in_features_of}")[0]
        return super().weight_shape(module)

    @torch.no_grad()
    def read(self, keys):
        out, packed = {}, {}
        for key, t in super().read(keys).items():
            module, _, leaf = key.rpartition(".")
            if leaf in self.parts:
                packed.setdefault(module, {})[leaf] = t
            else:
                out[key] = t
        for module, parts in packed.items():
            missing = [p for p in self.parts if p not in parts]
            if missing:
                raise UserError(f"{self.ckpt.path}: {self.label} layer {module} lacks {missing}")
            out[f"{module}.weight"] = self.dequantize(module, parts)
        return out




class PackedFormat(Format):
    """A format stored as packed integer tensors that our own layer computes with (GPTQ, AWQ): a training base
    loaded from its checkpoint, and a merge output read back by the same loader. Subclasses set `packed_layer`,
    `packed_what` and `methods` and implement `load_packed`."""

    base = output = True
    stored_quantized = True
    gpu_compute_dtype = torch.float16  # the packed-layer GPU kernels (ours, vLLM's) run in fp16
    default_dtype = torch.float16  # what GPTQ/AWQ readers, vLLM's kernels among them, expect
    packed_layer: type[PackedLinear] = PackedLinear  # the layer type its models hold
    packed_what = ""  # how the sharding refusal names the float tensors a cast would corrupt ("GPTQ scales")
    peft_dispatches = False
    methods: tuple[str, ...] = ()  # its quantizer's --method choices: the first needs calibration, the others not
    calib_hint = ", or use --method rtn"

    def load_packed(self, model_dir, device, dtype) -> torch.nn.Module:
        """The checkpoint in `model_dir` as an HF model with the format's packed layers."""
        raise NotImplementedError

    def load(self, spec, device, attn_implementation=None):
        model = self.load_packed(spec.model_dir, device, spec.dtype)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        return model

    def sharding_problem(self, spec, setup):
        if setup.shards_parameters:
            return (f"{setup.where} shards parameters, but the {self.title} base keeps its packed int32 weights in "
                    "buffers, which are never sharded (every rank would hold the whole base); use DDP or ZeRO-2 "
                    "(recipes/accelerate/ddp.yaml, zero2.yaml)")
        if setup.cast_dtype is not None:
            return setup.cast_problem(self.packed_what)
        return None

    def layer_types(self):
        return (self.packed_layer,)

    def frozen_weight(self, layer):
        return PackedWeight(layer)

    def storage(self, layer):
        return list(layer.packed())

    def lora_layer(self):
        from peft.tuners.lora.gptq import GPTQLoraLinear

        return GPTQLoraLinear

    def calibration(self, options):
        return REQUIRED if (getattr(options, "method", None) or self.methods[0]) == self.methods[0] else None

    def load_merged(self, out_dir, device, dtype):
        return self.load_packed(out_dir, device, dtype).eval()

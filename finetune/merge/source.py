"""The base weights, one decoder layer at a time, exactly as the adapter saw them in training.

A bitsandbytes base is never stored quantized: `load_base` quantizes the float checkpoint while loading.
So the weight the adapter was trained against is rebuilt the same way, one tensor at a time: cast to the
compute dtype, quantized by bitsandbytes with the settings `finetune.model.bnb_config` uses (NF4/FP4:
blocksize 64, the recipe's double_quant and quant_storage; int8: through fp16, as `Int8Params` does),
then dequantized. A GPTQ base is dequantized from its packed tensors with quant's reference kernel.
Tests compare both rebuilds bit for bit with the modules `load_base` builds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quant.errors import UserError

_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


class Checkpoint:
    """Tensors of a safetensors model directory by name; each `get` reads one tensor (memory-mapped files)."""

    def __init__(self, path: str | Path, what: str = "base model"):
        from safetensors import safe_open

        from quant.formats.gptq import safetensors_files

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise UserError(f"{what} {self.path}: no config.json; expected a Hugging Face model directory")
        if not any(self.path.glob("*.safetensors")):
            raise UserError(f"{what} {self.path}: no .safetensors weights (only safetensors checkpoints can be "
                            "streamed)")
        files = safetensors_files(self.path)
        self.config = json.loads((self.path / "config.json").read_text())
        self._handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in files}
        self.file_of = {k: f for f, h in self._handles.items() for k in h.keys()}

    def keys(self) -> list[str]:
        return list(self.file_of)

    def get(self, key: str, device=None) -> torch.Tensor:
        t = self._handles[self.file_of[key]].get_tensor(key)
        return t.to(device) if device is not None else t

    def shape(self, key: str) -> list[int]:
        return list(self._handles[self.file_of[key]].get_slice(key).get_shape())

    def quantization_config(self) -> dict | None:
        return self.config.get("quantization_config")


def skeleton(config: dict):
    """The model of `config` with every parameter on the meta device: names, shapes and module types for free.

    Buffers (rotary frequencies) stay real, so the embeddings + rotary part can run for GPTQ calibration.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    config.pop("quantization_config", None)
    cfg = AutoConfig.for_model(**config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def block_prefix(model) -> tuple[str, int]:
    from quant.sequential import find_blocks

    prefix, blocks = find_blocks(model)
    return prefix, len(blocks)


def bnb_linear_names(model, skip_modules=None) -> set[str]:
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


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    from finetune.model import resolve_compute_dtype

    return resolve_compute_dtype(name, device)


def rebuild_4bit(W: torch.Tensor, quant_type: str, double_quant: bool, dtype: torch.dtype,
                 quant_storage: torch.dtype = torch.uint8) -> torch.Tensor:
    """The NF4/FP4 weight a bitsandbytes Linear4bit holds for float weight W, dequantized, in `dtype`."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(W.to(dtype).contiguous(), blocksize=64, compress_statistics=double_quant,
                                  quant_type=quant_type, quant_storage=quant_storage)
    return bnbf.dequantize_4bit(q, state)


def rebuild_int8(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The LLM.int8 weight (row-wise absmax int8, quantized from fp16 as Int8Params does), dequantized in fp32
    the way peft's merge and bitsandbytes' CPU matmul do (int8_vectorwise_dequant)."""
    import bitsandbytes.functional as bnbf

    CB, SCB, _ = bnbf.int8_vectorwise_quant(W.to(dtype).to(torch.float16).contiguous())
    return bnbf.int8_vectorwise_dequant(CB, SCB)


def dequantize_gptq(parts: dict[str, torch.Tensor], bits: int, zero_offset: int) -> torch.Tensor:
    """nn.Linear-layout fp32 weight [out, in] of one GPTQ layer from qweight/qzeros/scales/g_idx."""
    from quant.kernels.torch_ref import gptq_dequantize

    return gptq_dequantize(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], bits, zero_offset,
                           out_dtype=torch.float32).T.contiguous()


@dataclass
class Unit:
    """A slice of the checkpoint processed at once: one decoder layer, or everything outside the layers."""

    index: int | None  # decoder layer index; None for embeddings, final norm, lm_head
    keys: list[str]

    @property
    def name(self) -> str:
        return "embeddings/norm/head" if self.index is None else f"layer {self.index}"


def plan_units(keys: list[str], prefix: str, n_layers: int) -> list[Unit]:
    """The non-layer tensors first (GPTQ needs the embeddings before layer 0), then the layers in order."""
    layers: list[list[str]] = [[] for _ in range(n_layers)]
    rest = []
    head = prefix + "."
    for k in keys:
        if k.startswith(head):
            idx = k[len(head):].split(".", 1)[0]
            if idx.isdigit() and int(idx) < n_layers:
                layers[int(idx)].append(k)
                continue
            raise UserError(f"checkpoint tensor {k} belongs to no layer of a {n_layers}-layer model")
        rest.append(k)
    return [Unit(None, rest)] + [Unit(i, ks) for i, ks in enumerate(layers)]


class BaseWeights:
    """Float weights of one unit at a time as the adapter was trained against (or the originals)."""

    def __init__(self, ckpt: Checkpoint, mode: str, *, quant_type: str = "nf4", double_quant: bool = True,
                 quant_storage: torch.dtype = torch.uint8, dtype: torch.dtype = torch.float32,
                 bnb_names: set[str] = frozenset(), gptq: dict | None = None, device=None):
        """`mode`: 'bnb4' / 'int8' rebuild the bitsandbytes weights of `bnb_names`; 'gptq' dequantizes packed
        layers (`gptq` is quant.formats.gptq.read_quant_config's dict); 'float' passes weights through."""
        self.ckpt, self.mode = ckpt, mode
        self.quant_type, self.double_quant, self.quant_storage = quant_type, double_quant, quant_storage
        self.dtype, self.bnb_names, self.gptq, self.device = dtype, bnb_names, gptq, device

    def weight_shape(self, module: str) -> tuple[int, int] | None:
        """[out, in] of `module`'s weight as stored, or None when the checkpoint has no such 2-D weight."""
        keys = self.ckpt.file_of
        if self.mode == "gptq" and f"{module}.qweight" in keys:
            return self.ckpt.shape(f"{module}.scales")[1], self.ckpt.shape(f"{module}.g_idx")[0]
        shape = self.ckpt.shape(f"{module}.weight") if f"{module}.weight" in keys else None
        return (shape[0], shape[1]) if shape is not None and len(shape) == 2 else None

    @torch.no_grad()
    def load(self, unit: Unit) -> dict[str, torch.Tensor]:
        """The unit's tensors by checkpoint name; GPTQ layers come back as `<module>.weight` in fp32."""
        out: dict[str, torch.Tensor] = {}
        packed: dict[str, dict[str, torch.Tensor]] = {}
        for key in unit.keys:
            module, _, leaf = key.rpartition(".")
            if self.mode == "gptq" and leaf in _GPTQ_PARTS:
                packed.setdefault(module, {})[leaf] = self.ckpt.get(key, self.device)
                continue
            t = self.ckpt.get(key, self.device)
            if leaf == "weight" and module in self.bnb_names:
                if self.mode == "bnb4":
                    t = rebuild_4bit(t, self.quant_type, self.double_quant, self.dtype, self.quant_storage)
                elif self.mode == "int8":
                    t = rebuild_int8(t, self.dtype)
            out[key] = t
        for module, parts in packed.items():
            missing = [p for p in _GPTQ_PARTS if p not in parts]
            if missing:
                raise UserError(f"{self.ckpt.path}: GPTQ layer {module} lacks {missing}")
            out[f"{module}.weight"] = dequantize_gptq(parts, self.gptq["bits"],
                                                      1 if self.gptq["checkpoint_format"] == "gptq" else 0)
        return out


def storage_dtype(name: str, compute: torch.dtype) -> torch.dtype:
    """bnb 4-bit quant_storage as `finetune.model.bnb_config` resolves it ('auto' = compute dtype)."""
    return compute if name == "auto" else getattr(torch, name)

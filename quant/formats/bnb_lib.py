"""bitsandbytes, the optional package under the nf4/fp4/int8 formats: the one module that imports it, and the
ways its layers are read and quantized (the reference CPU layout, 4-bit/int8 quantization as its layers do it, a
4-bit layer's weight as a dense tensor).

It is imported on first use, not at the top: `import bitsandbytes` takes ~6 s after torch on a 2-core box, which
`quant --help`, a GPTQ/AWQ run or a GGUF export would otherwise pay. A model can only hold bitsandbytes layers once
the package has been imported, so `loaded()` answers which layer types a model may hold without importing it.

The reference layout. bitsandbytes >= 0.49 `Linear4bit.forward`, on a CPU with AVX512-BF16, in eval mode and
on an input without grad, converts its packed weight *in place* into a CPU-specific layout for a bf16 kernel
(`_convert_weight_packed_for_cpu`) and never converts it back when the module returns to `train()`. After one
evaluation every later forward computes through that bf16 kernel (fp32 compute is no longer fp32) and the backward
runs through `bitsandbytes::gemv_4bit`, which has no autograd kernel: the input gradients, and so every LoRA
gradient below that layer, are wrong. The way back (`_convert_weight_packed_for_cpu_inverse`) is lossy: absmax
went through bf16 and double quantization is redone with a new offset. So the layers must never take that path.

`keep_reference_layout(model)` switches the conversion off per layer (`support_avx512bf16_for_cpu`, the flag the
layer reads its CPU capability into at construction) and refuses a model whose layers were already converted.
Every path that builds bitsandbytes layers for training, merging or evaluation calls it right after loading.
"""

from __future__ import annotations

import importlib
import logging
import sys

import torch

from quant.formats.base import FrozenWeight

# On an AVX512-BF16 CPU, importing bitsandbytes tries to fetch a hub kernel for that bf16 path and warns
# ("Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels") when it cannot. Our
# layers never take the path (above), so the advice would only mislead; set before bitsandbytes is imported.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# The per-layer attribute bitsandbytes' Linear4bit.forward checks before converting (bitsandbytes 0.49-0.50).
_CPU_PACKING_FLAG = "support_avx512bf16_for_cpu"
BLOCKSIZE = 64  # NF4/FP4 quantization block: what transformers' Linear4bit uses, for training and outputs


def functional():
    """bitsandbytes.functional, imported now if it was not."""
    return importlib.import_module("bitsandbytes.functional")


def loaded():
    """bitsandbytes.nn if the package has been imported (by transformers loading a model, or by us), else None:
    then no model holds its layers."""
    return sys.modules.get("bitsandbytes.nn") if "bitsandbytes" in sys.modules else None


def nn_types(*names: str) -> tuple[type, ...]:
    """The classes bitsandbytes.nn.<name> (layers, parameter types) when bitsandbytes is loaded, else ()."""
    nn = loaded()
    return tuple(getattr(nn, name) for name in names if hasattr(nn, name)) if nn is not None else ()


# ------------------------------------------------------------------------------------------ the reference layout


def is_cpu_packed(module: torch.nn.Module) -> bool:
    """True when a Linear4bit's weight has been converted to bitsandbytes' AVX512-BF16 CPU layout."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_reference_layout(model: torch.nn.Module) -> int:
    """Stop every bitsandbytes 4-bit layer in `model` from converting its weight to the CPU bf16 layout.

    Returns the number of layers switched. Raises RuntimeError if a layer was converted already: its weights can
    no longer be restored exactly, so the model must be loaded again (a bug in the caller, not a user error).
    """
    linear4bit = nn_types("Linear4bit")
    if not linear4bit:  # no bitsandbytes loaded: no bitsandbytes layers to fix
        return 0
    switched = 0
    for name, module in model.named_modules():
        if not isinstance(module, linear4bit):
            continue
        if is_cpu_packed(module):
            raise RuntimeError(f"{name}: bitsandbytes already converted this 4-bit weight to its CPU bf16 layout "
                               "(an eval-mode forward ran before keep_reference_layout); load the model again")
        if not hasattr(module, _CPU_PACKING_FLAG) and hasattr(functional(), "_convert_weight_packed_for_cpu"):
            version = getattr(sys.modules["bitsandbytes"], "__version__", "?")
            raise RuntimeError(f"bitsandbytes {version} converts 4-bit weights for its CPU bf16 kernel but its "
                               f"layers have no '{_CPU_PACKING_FLAG}' switch; this release is not supported yet")
        # Set it whatever this CPU reports: a layer moved later to another machine's process keeps it too.
        setattr(module, _CPU_PACKING_FLAG, False)
        switched += 1
    return switched


# ------------------------------------------------------------------------------------------ quantizing as the layers do


def quantize_4bit(W: torch.Tensor, quant_type: str, double_quant: bool, dtype: torch.dtype,
                  quant_storage: torch.dtype):
    """(packed weight, QuantState) of W cast to `dtype`, as a Linear4bit quantizes it."""
    return functional().quantize_4bit(W.to(dtype).contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                      quant_type=quant_type, quant_storage=quant_storage)


def rebuild_4bit(W: torch.Tensor, quant_type: str, double_quant: bool, dtype: torch.dtype,
                 quant_storage: torch.dtype = torch.uint8) -> torch.Tensor:
    """The NF4/FP4 weight a bitsandbytes Linear4bit holds for float weight W, dequantized, in `dtype`."""
    return functional().dequantize_4bit(*quantize_4bit(W, quant_type, double_quant, dtype, quant_storage))


def quantize_int8(W: torch.Tensor):
    """(CB int8, SCB) of W, quantized through fp16 as Int8Params does."""
    CB, SCB, _ = functional().int8_vectorwise_quant(W.to(torch.float16).contiguous())
    return CB, SCB


def rebuild_int8(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The LLM.int8 weight (row-wise absmax int8, quantized from fp16 as Int8Params does), dequantized in fp32
    the way peft's merge and bitsandbytes' CPU matmul do (int8_vectorwise_dequant)."""
    return functional().int8_vectorwise_dequant(*quantize_int8(W.to(dtype)))


# ------------------------------------------------------------------------------------------ a 4-bit layer's weight

_SCRATCH: dict = {}


def scratch(shape, dtype: torch.dtype, device: torch.device, slot: int) -> torch.Tensor:
    """A reused buffer per (device, dtype, slot): the dequantized weight of one projection at a time."""
    numel = 1
    for s in shape:
        numel *= s
    key = (device, dtype, slot)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors a QuantState holds besides the packed weight (block scales, code tables, nested state); none
    for None (an int8 weight has no QuantState)."""
    if state is None:
        return []
    tensors = [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if isinstance(t, torch.Tensor)]
    if getattr(state, "state2", None) is not None:
        tensors += quant_state_tensors(state.state2)
    return tensors


class Bnb4Weight(FrozenWeight):
    """An NF4/FP4 Linear4bit's weight, dequantized by bitsandbytes' own op (on CUDA into a reused `scratch` buffer
    per slot, through its out= overload; bitsandbytes has no CPU out= kernel)."""

    kind = "bnb4"

    def __init__(self, layer):
        super().__init__(layer)
        self._absmax_cache: tuple | None = None

    def _absmax(self, state) -> torch.Tensor:
        """The fp32 block scales of a 4-bit weight. With double quantization they are stored as 8-bit codes that
        bitsandbytes decodes on every dequantization (on CPU, half the time of one: 50.8 -> 24.3 ms for a 1536x576
        weight); the base is frozen, so they are decoded once and kept (4 bytes per 64 weights)."""
        if not state.nested:
            return state.absmax
        key = (state.absmax.data_ptr(), state.absmax.device)
        if self._absmax_cache is None or self._absmax_cache[0] != key:
            absmax = functional().dequantize_blockwise(state.absmax, state.state2) + state.offset
            self._absmax_cache = (key, absmax.float())
        return self._absmax_cache[1]

    def __call__(self, dtype, slot=0):
        w = self.layer.weight
        state = w.quant_state
        args = (w.data, self._absmax(state), state.blocksize, state.quant_type, state.shape, state.dtype)
        if w.is_cuda:  # the out= overload returns nothing
            out = scratch(state.shape, state.dtype, w.device, slot)
            torch.ops.bitsandbytes.dequantize_4bit.out(*args, out=out)
        else:
            out = torch.ops.bitsandbytes.dequantize_4bit.default(*args)
        return out if out.dtype == dtype else out.to(dtype)

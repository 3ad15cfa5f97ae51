"""bitsandbytes NF4/FP4 layers as we train, merge and evaluate them: always in bitsandbytes' reference layout.

Why this module exists: bitsandbytes >= 0.49 `Linear4bit.forward`, on a CPU with AVX512-BF16, in eval mode and
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

import logging

import torch

# On an AVX512-BF16 CPU, importing bitsandbytes tries to fetch a hub kernel for that bf16 path and warns
# ("Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels") when it cannot. Our
# layers never take the path (below), so the advice would only mislead; set before bitsandbytes is imported.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# The per-layer attribute bitsandbytes' Linear4bit.forward checks before converting (bitsandbytes 0.49-0.50).
_CPU_PACKING_FLAG = "support_avx512bf16_for_cpu"


def _linear4bit_type():
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes: no bitsandbytes layers to fix
        return None
    return bnb.nn.Linear4bit


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
    linear4bit = _linear4bit_type()
    if linear4bit is None:
        return 0
    switched = 0
    for name, module in model.named_modules():
        if not isinstance(module, linear4bit):
            continue
        if is_cpu_packed(module):
            raise RuntimeError(f"{name}: bitsandbytes already converted this 4-bit weight to its CPU bf16 layout "
                               "(an eval-mode forward ran before keep_reference_layout); load the model again")
        if not hasattr(module, _CPU_PACKING_FLAG) and _converts_for_cpu():
            raise RuntimeError(f"bitsandbytes {_version()} converts 4-bit weights for its CPU bf16 kernel but its "
                               f"layers have no '{_CPU_PACKING_FLAG}' switch; this release is not supported yet")
        # Set it whatever this CPU reports: a layer moved later to another machine's process keeps it too.
        setattr(module, _CPU_PACKING_FLAG, False)
        switched += 1
    return switched


def _converts_for_cpu() -> bool:
    import bitsandbytes.functional as bnbf

    return hasattr(bnbf, "_convert_weight_packed_for_cpu")


def _version() -> str:
    import bitsandbytes

    return getattr(bitsandbytes, "__version__", "?")

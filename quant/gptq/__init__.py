"""GPTQ (Frantar et al. 2022), built bottom to top:

- `pack`      the checkpoint layout: bit packing, zero points (v1/v2), quantization_config
- `kernels`   the torch reference matmul/dequantize and the choice of kernel; `triton_kernels` the fused ones
- `nn`        `GPTQLinear` (alias `QuantLinear`), the packed layer
- `solver`    `GPTQConfig`, the per-layer solver (on quant.feedback) and round-to-nearest
- `blocks`    the per-block driver (true-sequential groups, Hessians) on quant.blocks
- `model`     whole models: quantize_model, quantize, save_quantized, load_gptq_model
"""

"""AWQ (Lin et al. 2023), built bottom to top as GPTQ is:

- `pack`      the "gemm" checkpoint layout: AWQ's nibble order, encoding a layer, quantization_config
- `kernels`   the torch dequantize (CPU and GPU path, the reference)
- `nn`        `AWQLinear`, the packed layer
- `solver`    `AWQConfig`, the group grid, the scale search and the clipping search
- `blocks`    the per-block driver: folds into norms/projections, statistics, rounding (on quant.feedback)
- `model`     whole models: quantize_model_awq, quantize_awq, save_awq, load_awq_model
"""

"""GPTQ matmul kernels: a plain-PyTorch reference and a Triton version with the same signatures."""


def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None

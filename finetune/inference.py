"""What `finetune chat`, `generate` and `eval` run: a RUN_OR_MODEL argument resolved and loaded for inference.

RUN_OR_MODEL is one of
- a `finetune sft` run directory, its `adapter/` or a `checkpoint-N/`: the adapter on its quantized base,
  rebuilt exactly as in training (the base is named by the adapter's base_model.txt / the run's recipe.yaml);
- a model directory written by `finetune merge` (or any Hugging Face checkpoint): loaded by its standard
  loader, the format read from its config.json (`model_format`).

Models are loaded whole; this is inference, not the streaming merge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.errors import UserError

# What `model_format` recognises, for the one-line error on anything else.
SUPPORTED = ("run directories and adapters (the adapter on its quantized base), and model directories in "
             "bf16/fp16/fp32, bitsandbytes nf4/fp4/int8 or GPTQ (config.json quantization_config)")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FLOAT_FORMATS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass
class Loaded:
    """A model ready for generation. For an adapter, `model` is the peft model: `model.disable_adapter()` is
    its base, so a run gives the 'base' and 'adapter' rows of `finetune eval` from one load."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user passed
    kind: str  # "adapter", or the merged format (bf16, fp16, fp32, nf4, fp4, int8, gptq)
    device: torch.device
    dtype: torch.dtype
    source: object = None  # finetune.merge.adapter.AdapterSource for adapters: the run's recipe sections

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"


def is_adapter_path(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() or (path / "adapter" / "adapter_config.json").is_file()


def model_format(model_dir: Path) -> str:
    """The format of a (merged) model directory, from its config.json: bf16/fp16/fp32, nf4/fp4/int8, gptq.

    The one place that decides which model directories `chat`/`generate`/`eval` can run.
    """
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{model_dir}: not a run, adapter or model directory (no adapter_config.json or "
                        f"config.json); supported: {SUPPORTED}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file}: not valid JSON ({e})") from None
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method is None:
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
        if dtype in _FLOAT_FORMATS:
            return _FLOAT_FORMATS[dtype]
        raise UserError(f"{config_file}: unsupported dtype '{dtype}'; supported: {SUPPORTED}")
    if method == "gptq":
        return "gptq"
    if method == "bitsandbytes":
        if qc.get("load_in_4bit"):
            kind = qc.get("bnb_4bit_quant_type", "fp4")
            if kind in ("nf4", "fp4"):
                return kind
        elif qc.get("load_in_8bit"):
            return "int8"
    raise UserError(f"{model_dir}: cannot run a model quantized as quant_method '{method}'; supported: {SUPPORTED}")


def default_dtype(device: torch.device, fmt: str) -> torch.dtype:
    """Compute dtype for a merged model: fp32 on CPU (bnb/GPTQ CPU kernels are slow or absent in half
    precision), else the stored half precision (fp16 for GPTQ, whose kernels run in fp16)."""
    if device.type == "cpu":
        return torch.float32
    return {"fp16": torch.float16, "gptq": torch.float16}.get(fmt, torch.bfloat16)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device (cpu, cuda, cuda:N)") from None


def load(path: str | Path, device: torch.device, dtype: str | None = None) -> Loaded:
    """Load RUN_OR_MODEL (see the module docstring) on `device`; `dtype` overrides a merged model's compute dtype
    (an adapter always computes in its recipe's base.compute_dtype, as in training)."""
    from quant.loading import load_tokenizer

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run or model directory")
    if path.is_dir() and is_adapter_path(path):
        from finetune.merge.adapter import read_adapter
        from finetune.merge.report import load_adapter_model

        source = read_adapter(path)
        model, compute_dtype = load_adapter_model(source, device)
        tokenizer = load_tokenizer(str(source.tokenizer_dir), str(path))
        return Loaded(model, tokenizer, str(path), "adapter", device, compute_dtype, source)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; supported: {SUPPORTED}")
    from finetune.merge.report import load_merged

    fmt = model_format(path)
    compute = _DTYPES[dtype] if dtype else default_dtype(device, fmt)
    # load_merged's float branch is a plain from_pretrained, which serves any unquantized checkpoint.
    model = load_merged(path, "bf16" if fmt == "fp32" else fmt, device, compute)
    return Loaded(model, load_tokenizer(str(path), str(path)), str(path), fmt, device, compute)

"""What `finetune chat`, `generate` and `eval` run: a RUN_OR_MODEL argument resolved and loaded for inference.

RUN_OR_MODEL is one of
- a `finetune sft` run directory, its `adapter/` or a `checkpoint-N/`: the adapter on its quantized base,
  rebuilt exactly as in training (the base is named by the adapter's base.json, or base_model.txt / the run's recipe.yaml for older ones);
- a model directory written by `finetune merge` (or any Hugging Face checkpoint): loaded by its standard
  loader, the format read from its config.json (`model_format`).

Models are loaded whole; this is inference, not the streaming merge.

`load` gives what `finetune eval` scores: an adapter stays a peft model on its quantized base, so the adapter can
be switched off for the base row. `load_for_generation` gives what `chat` and `generate` run, built for speed
without changing what the model computes beyond float rounding:
- an adapter is merged once at load into dense weights in its compute dtype: the base rebuilt exactly as training
  saw it (the merge's rebuilders: a bitsandbytes base quantized again and dequantized, a GPTQ/AWQ base
  dequantized) plus scale·B@A, through the streaming merge's own code, held in memory. On CPU, bitsandbytes'
  4-bit layers dequantize every weight on every token: for SmolLM2 on a loaded 2-core box the peft model
  generated 0.5 tokens/s, the dense merge 1.0, llama.cpp on the same weights 2.7 (scripts/bench/bench_generate.py);
- a directory holding one .gguf file (a `finetune merge --format gguf` output) runs in llama.cpp where
  llama-cpp-python is installed (the `llama` extra), as its users run it; else transformers dequantizes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.generation import LlamaCppModel, llama_cpp_available
from finetune.merge.adapter import read_adapter
from finetune.merge.source import block_prefix, plan_units, skeleton
from finetune.merge.stream import check_adapter_fits, check_fits_model, stream_units
from quant.errors import UserError
from quant.formats import registry as formats
from quant.formats.base import CastEncoder
from quant.formats.registry import FORMATS, stored_output
from quant.model_checks import check_model_dir
from quant.tensorfiles import Checkpoint

# What `model_format` recognises, for the one-line error on anything else.
SUPPORTED = ("run directories and adapters (the adapter on its quantized base), and model directories stored as "
             + ", ".join(f.title for f in FORMATS if f.output) + " or unquantized fp32 (read from config.json)")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Loaded:
    """A model ready for generation. For an adapter, `model` is the peft model: `model.disable_adapter()` is
    its base, so a run gives the 'base' and 'adapter' rows of `finetune eval` from one load."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user passed
    kind: str  # "adapter", or the merged format (bf16, fp16, fp32, nf4, fp4, int8, gptq, awq, gguf)
    device: torch.device
    dtype: torch.dtype
    source: object = None  # finetune.merge.adapter.AdapterSource for adapters: the run's recipe sections
    runner: str = "transformers"  # what computes: transformers (peft for an unmerged adapter) or llama.cpp

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"


def is_adapter_path(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() or (path / "adapter" / "adapter_config.json").is_file()


def input_paths(path: str | Path) -> list[tuple[Path | str | None, str]]:
    """What RUN_OR_MODEL reads: the directory, and for a run or adapter its adapter, run and base directories
    (for the output rule: `--out` never replaces or sits inside any of them)."""
    from finetune.merge.adapter import locate

    path = Path(path)
    found: list[tuple[Path | str | None, str]] = [(path, "RUN_OR_MODEL")]
    if path.is_dir() and is_adapter_path(path):
        run = locate(path)
        found += [(run.adapter_dir, "the adapter"), (run.run_dir, "the run"),
                  *[(b, "the adapter's base model") for b in run.base_paths()]]
    return found


def model_format(model_dir: Path) -> str:
    """How a model directory is stored, as the tables name it: its output format (quant.formats.registry reads
    config.json), or the dtype of another unquantized checkpoint (fp32)."""
    fmt, config = _stored(Path(model_dir))
    if not config or fmt.stores(config):  # no config.json: the format's own file (GGUF)
        return fmt.name
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    return {"float32": "fp32"}.get(dtype, dtype)


def _stored(model_dir: Path):
    if not (model_dir / "config.json").is_file() and not any(f.output and f.holds(model_dir) for f in FORMATS):
        raise UserError(f"{model_dir}: not a run, adapter or model directory (no adapter_config.json, "
                        f"config.json or model.gguf); supported: {SUPPORTED}")
    try:
        return stored_output(model_dir)
    except UserError as e:
        raise UserError(f"{e}; supported: {SUPPORTED}") from None


def default_dtype(device: torch.device, fmt) -> torch.dtype:
    """Compute dtype for a model directory: fp32 on CPU (bnb/GPTQ CPU kernels are slow or absent in half
    precision), else the one its format computes in on GPUs (bf16; fp16 for fp16 and GPTQ)."""
    return torch.float32 if device.type == "cpu" else fmt.gpu_compute_dtype


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
        from finetune.merge.report import load_adapter_model  # it loads peft, which pulls bitsandbytes

        source = read_adapter(path)  # adapter_config.json, base.json and finite factors checked
        check_fits_model(source)  # every module there, with its shape, before any weight loads
        model, compute_dtype = load_adapter_model(source, device)
        tokenizer = load_tokenizer(str(source.tokenizer_dir), str(path))
        return Loaded(model, tokenizer, str(path), "adapter", device, compute_dtype, source)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; supported: {SUPPORTED}")
    check_model_dir(path, "RUN_OR_MODEL")  # config.json and GGUF headers as data, before a loader reads them
    fmt, _ = _stored(path)
    compute = _DTYPES[dtype] if dtype else default_dtype(device, fmt)
    model = fmt.load_merged(path, device, compute)
    return Loaded(model, fmt.load_tokenizer(path), str(path), model_format(path), device, compute)


def load_for_generation(path: str | Path, device: torch.device, dtype: str | None = None,
                        use_llama_cpp: bool = True) -> Loaded:
    """RUN_OR_MODEL for `chat` and `generate` (see the module docstring): an adapter merged into dense weights,
    a GGUF output in llama.cpp (where installed and `use_llama_cpp`, on CPU), anything else as `load`."""
    path = Path(path)
    if path.is_dir() and is_adapter_path(path):
        from quant.loading import load_tokenizer

        source = read_adapter(path, device=device)
        model = merged_adapter_model(source, device)
        tokenizer = load_tokenizer(str(source.tokenizer_dir), str(path))
        return Loaded(model, tokenizer, str(path), "adapter", device, source.base.dtype, source)
    gguf = gguf_file(path)
    if gguf is not None and use_llama_cpp and device.type == "cpu" and llama_cpp_available():
        check_model_dir(path, "RUN_OR_MODEL")  # the GGUF header as data, before llama.cpp reads it
        fmt, _ = _stored(path)
        return Loaded(LlamaCppModel(gguf), fmt.load_tokenizer(path), str(path), model_format(path), device,
                      torch.float32, runner="llama.cpp")
    return load(path, device, dtype)


def gguf_file(path: Path) -> Path | None:
    """The one .gguf file of a model directory without config.json (a GGUF merge output), else None."""
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


@torch.no_grad()
def merged_adapter_model(source, device: torch.device) -> torch.nn.Module:
    """The adapter's base, rebuilt as training saw it, with every LoRA delta added, as a plain transformers model
    in the adapter's compute dtype on `device`: the streaming merge's walk (finetune.merge.stream), kept in
    memory instead of encoded and written."""
    ckpt = Checkpoint(source.base.model_dir)
    formats.check_source(source.base, ckpt)
    model = skeleton(ckpt.config)
    prefix, n_layers = block_prefix(model)
    weights = formats.format_of(source.base).rebuilder(source.base, ckpt, model, device)
    check_adapter_fits(source.loras, weights.weight_shape, f"{weights.ckpt.path} ({n_layers} layers)",
                       f"is {source.adapter_dir / 'base.json'} naming the model the adapter was trained on?")
    state: dict[str, torch.Tensor] = {}
    stream_units(weights, plan_units(ckpt.keys(), prefix, n_layers), source.loras, CastEncoder(source.base.dtype),
                 lambda tensors: state.update({k: v.to(device) for k, v in tensors.items()}))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [k for k in missing if any(p.is_meta for n, p in model.named_parameters() if n == k)]
    if left or unexpected:
        raise RuntimeError(f"merged state does not fit the model: missing {left[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval()

"""Output checkpoints, written one unit (decoder layer) at a time.

`ShardWriter` streams tensors into safetensors shards: each tensor's bytes go to disk as soon as it is
added, and the header (which safetensors puts first) is written when a shard closes, so host memory
never holds more than the unit being written. The encoders turn a unit's merged float tensors into the
tensors of one output format:
- `FloatEncoder`: bf16/fp16 HF checkpoint.
- `Bnb4Encoder`: bitsandbytes NF4/FP4 serialization (docs/quantized-formats.md B1): `<m>.weight` packed uint8 plus
  `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
  `weight.quant_state.bitsandbytes__<type>`; config.json gets the B4 quantization_config.
- `Int8Encoder`: LLM.int8 (B5): `<m>.weight` int8 row-major, `<m>.SCB` fp32, `<m>.weight_format` = 0.
GPTQ tensors come from `finetune.merge.requant.GPTQEncoder`.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL"}
DEFAULT_SHARD_BYTES = 4 * 2**30


class _Shard:
    def __init__(self, data_path: Path):
        self.data_path = data_path
        self.file = open(data_path, "wb")
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self.file.write(memoryview(raw))
        n = t.numel() * t.element_size()
        self.entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.size, self.size + n]}
        self.size += n

    def finish(self, final: Path) -> None:
        """Header first, then the data written so far (safetensors pads the header with spaces to 8 bytes)."""
        self.file.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(final, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 64 * 2**20)
        self.data_path.unlink()


class ShardWriter:
    """safetensors shards of at most `max_shard_bytes` (a larger single tensor gets a shard of its own),
    named like save_pretrained's, plus model.safetensors.index.json when there is more than one."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.dir = Path(directory)
        self.max = max_shard_bytes
        self.done: list[_Shard] = []
        self.current: _Shard | None = None
        self.names: set[str] = set()
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name in self.names:
                raise ValueError(f"tensor {name} written twice")
            self.names.add(name)
            n = t.numel() * t.element_size()
            if self.current is not None and self.current.size and self.current.size + n > self.max:
                self.done.append(self.current)
                self.current = None
            if self.current is None:
                self.current = _Shard(self.dir / f".shard-{len(self.done):05d}.data")
            self.current.add(name, t)
            self.total += n

    def close(self) -> list[Path]:
        if self.current is not None:
            self.done.append(self.current)
            self.current = None
        n = len(self.done)
        if n == 0:
            raise ValueError("no tensors were written")
        names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map = {}
        for shard, name in zip(self.done, names):
            shard.finish(self.dir / name)
            weight_map.update({k: name for k in shard.entries})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [self.dir / name for name in names]

    def abort(self) -> None:
        for shard in self.done + ([self.current] if self.current else []):
            shard.file.close()


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


class FloatEncoder:
    """Every floating tensor in `dtype`; integer tensors (packed GPTQ) as they are."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, unit, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: _cast(t, self.dtype) for k, t in tensors.items()}


class _LinearEncoder:
    """Serializes the Linear weights in `names` with `encode_weight`; every other tensor is cast to `dtype`."""

    def __init__(self, names: set[str], dtype: torch.dtype):
        self.names, self.dtype = names, dtype

    def __call__(self, unit, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, t in tensors.items():
            module, _, leaf = key.rpartition(".")
            if leaf == "weight" and module in self.names:
                out.update(self.encode_weight(module, t))
            else:
                out[key] = _cast(t, self.dtype)
        return out

    def encode_weight(self, module: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Bnb4Encoder(_LinearEncoder):
    """bitsandbytes 4-bit serialization of the Linear weights in `names`; other tensors cast to `dtype`.

    Quantization goes through `bitsandbytes.functional.quantize_4bit` on the weight cast to `dtype`, which is
    what `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` does to a `dtype`
    checkpoint, so the file equals the ecosystem's own NF4 conversion of the merged model.
    """

    def __init__(self, names: set[str], quant_type: str, double_quant: bool, dtype: torch.dtype):
        super().__init__(names, dtype)
        self.quant_type, self.double_quant = quant_type, double_quant

    def encode_weight(self, module: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_4bit(weight.to(self.dtype).contiguous(), blocksize=64,
                                      compress_statistics=self.double_quant, quant_type=self.quant_type,
                                      quant_storage=torch.uint8)
        key = f"{module}.weight"
        return {key: q, **{f"{key}.{part}": value for part, value in state.as_dict(packed=True).items()}}


class Int8Encoder(_LinearEncoder):
    """LLM.int8 serialization of the Linear weights in `names` (quantized through fp16, as Int8Params does)."""

    def encode_weight(self, module: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        import bitsandbytes.functional as bnbf

        CB, SCB, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        return {f"{module}.weight": CB, f"{module}.SCB": SCB.float(),
                f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}  # row-major, the only kind loaded


def bnb_quantization_config(fmt: str, dtype: torch.dtype, double_quant: bool = True) -> dict:
    """config.json's quantization_config, exactly as transformers' BitsAndBytesConfig.to_dict writes it."""
    from transformers import BitsAndBytesConfig

    if fmt == "int8":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt, bnb_4bit_use_double_quant=double_quant,
                                 bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
    return cfg.to_dict()


def write_config(directory: Path, base_config: dict, dtype: torch.dtype, quantization_config: dict | None) -> None:
    config = dict(base_config)
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).replace("torch.", "")
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_extras(directory: Path, tokenizer_dir: Path, base_dir: Path) -> None:
    """Tokenizer (from the adapter, which training saved with it) and the base's generation config."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(directory))
    gen = Path(base_dir) / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, directory / "generation_config.json")

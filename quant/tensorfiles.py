"""safetensors model directories: the one streaming writer (`ShardWriter`) and the one reader (`Checkpoint`).

- `ShardWriter`: tensor bytes go to disk as they are added; the header, which safetensors puts first, is written
  when a shard closes; sharded and indexed like `save_pretrained`. It writes into a directory `quant.files.staged`
  made, which puts the finished checkpoint in place.
- `Checkpoint`: a model directory read one tensor at a time (memory-mapped), its config.json checked at the edge
  (quant.model_checks).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from quant.errors import UserError
from quant.model_checks import check_config, read_json_object

DEFAULT_SHARD_BYTES = 4 * 2**30

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL"}


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
    """safetensors shards of at most `max_shard_bytes` (a larger single tensor gets a shard of its own) in
    `directory` (a `staged` one), named like save_pretrained's, plus model.safetensors.index.json when there is
    more than one. Tensors are added a few at a time and never accumulate in memory."""

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


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a model directory, through its index when it has one."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no .safetensors weights found")
    return files


class Checkpoint:
    """Tensors of a safetensors model directory by name; each `get` reads one tensor (memory-mapped files)."""

    def __init__(self, path: str | os.PathLike, what: str = "base model"):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise UserError(f"{what} {self.path}: no config.json; expected a Hugging Face model directory")
        if not any(self.path.glob("*.safetensors")):
            raise UserError(f"{what} {self.path}: no .safetensors weights (only safetensors checkpoints can be "
                            "streamed)")
        self.config = read_json_object(self.path / "config.json")
        check_config(self.config, f"{what} {self.path / 'config.json'}", self.path)
        self._handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in safetensors_files(self.path)}
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

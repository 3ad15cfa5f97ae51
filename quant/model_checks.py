"""A model's metadata read as data, before any loader sees it: config.json and GGUF headers.

transformers builds whatever a config.json describes: `num_hidden_layers: 1000000` builds a million layers (a
hang), `num_attention_heads: 0`, `vocab_size: -5` or a size written as a string fail deep inside with a
traceback, and a NaN `rope_theta` loads silently into a model that computes NaN. The gguf package's reader
trusts a header's counts and lengths: a truncated file, a count of 2^40 or `n_dims` 2^31 end in an exception
from numpy (or an allocation of that size). Both are checked here, cheaply (the header, never the weights):

- `check_config(config, where, directory)`: every size a known key names is a positive integer within a bound no
  released model comes near (SIZES); every float anywhere in it is finite; and where the directory holds
  safetensors weights, the config describes no more layers than the weights hold and no model far larger than
  their bytes (`_fits_weights`).
- `check_gguf(path)`: the header walked with bounds: magic and version, every count and length against the
  bytes left in the file, value types, tensor dimensions (at most 4, as ggml's GGML_MAX_DIMS), tensor types and
  every tensor's data inside the file. Any failure is one line naming the file and the byte offset.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from pathlib import Path

from quant.errors import UserError

# Sizes a config.json may name, and the largest value accepted (released models: <= 128 layers, hidden 16384,
# 256k vocabularies, 10M-token contexts, 256 experts; the bounds leave room without allowing a hang).
SIZES = {
    ("num_hidden_layers", "n_layer", "num_layers", "n_layers"): 1024,
    ("hidden_size", "n_embd", "d_model"): 1 << 17,
    ("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size"): 1 << 20,
    ("num_attention_heads", "n_head", "num_key_value_heads"): 1024,
    ("head_dim",): 1 << 12,
    ("vocab_size",): 1 << 22,
    ("max_position_embeddings", "n_positions"): 1 << 24,
    ("num_experts", "num_local_experts", "n_routed_experts"): 1 << 12,
}
_BOUND = {key: bound for keys, bound in SIZES.items() for key in keys}
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def _floats(value, path: str):
    """(dotted path, value) of every float in a JSON tree."""
    if isinstance(value, float):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _floats(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _floats(v, f"{path}[{i}]")


def _sizes(config: dict, path: str = ""):
    """(dotted key, value, bound) of every size key, in nested configs too (text_config of a multimodal one)."""
    for k, v in config.items():
        if k in _BOUND:
            yield f"{path}{k}", v, _BOUND[k]
        elif isinstance(v, dict):
            yield from _sizes(v, f"{path}{k}.")


def check_config(config: dict, where: str, directory: str | os.PathLike | None = None) -> None:
    """Refuse a config.json no real model has (module docstring); `where` names it in the message."""
    for key, value, bound in _sizes(config):
        if value is None:
            continue  # "not set" (GPT-2's n_inner): the architecture's default
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise UserError(f"{where}: {key} = {json.dumps(value)[:40]} is not valid (expected an integer 1..{bound})")
    for key, value in _floats(config, ""):
        if not math.isfinite(value):
            raise UserError(f"{where}: {key} = {value} is not valid (expected a finite number)")
    theta = config.get("rope_theta")
    if isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta <= 0:
        raise UserError(f"{where}: rope_theta = {theta} is not valid (expected a number > 0)")
    if directory is not None:
        _fits_weights(config, where, Path(directory))


def _header(path: Path) -> dict:
    """A safetensors file's header (its tensors' dtypes, shapes, offsets), read without the data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        if not 2 <= n <= min(100 * 2**20, path.stat().st_size - 8):
            raise UserError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise UserError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header


def _fits_weights(config: dict, where: str, directory: Path) -> None:
    """The layers and size config.json describes against what the safetensors weights hold (headers only)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return
    layers, total = set(), 0
    for f in files:
        total += f.stat().st_size
        layers.update(int(m[1]) for name in _header(f) if (m := _LAYER.search(name)))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    n = next((text[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
              if isinstance(text.get(k), int)), None)
    if n is not None and layers and n > max(layers) + 1:
        raise UserError(f"{where}: num_hidden_layers = {n}, but the weights hold {max(layers) + 1} layers")
    hidden = next((text[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(text.get(k), int)), None)
    vocab = text.get("vocab_size") if isinstance(text.get("vocab_size"), int) else 0
    if hidden and n:
        inner = next((text[k] for k in ("intermediate_size", "n_inner", "ffn_dim") if isinstance(text.get(k), int)),
                     4 * hidden)
        params = vocab * hidden + n * (4 * hidden * hidden + 3 * hidden * inner)
        if params / 8 > total + 2**26:  # even 2-bit weights with their scales take more than 1 bit per parameter
            raise UserError(f"{where}: describes a model of about {params:.3g} parameters, but its weights hold "
                            f"{total / 2**20:.0f} MiB")


# ------------------------------------------------------------------------------------------ GGUF headers

# GGUF value types: struct format of the scalars (8: string, 9: array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
GGML_MAX_DIMS = 4


class _Reader:
    """Bounded reads from a memory-mapped file at a moving offset (SmolLM2's 100,000 vocabulary strings: ~1 s)."""

    def __init__(self, data, path: Path):
        self.data, self.path, self.size, self.pos = data, path, len(data), 0

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.path}: not a valid GGUF file: {what} at offset {self.pos}")

    def skip(self, n: int) -> int:
        if n > self.size - self.pos:
            raise self.fail(f"{n:,} bytes asked, {self.size - self.pos:,} left (truncated?)")
        self.pos += n
        return self.pos - n

    def bytes(self, n: int) -> bytes:
        start = self.skip(n)
        return bytes(self.data[start:start + n])

    def scalar(self, fmt: str):
        return struct.unpack_from("<" + fmt, self.data, self.skip(struct.calcsize(fmt)))[0]

    def count(self, what: str, least_bytes: int) -> int:
        """A uint64 count of items of at least `least_bytes` each: refused if the rest of the file cannot hold
        them."""
        n = self.scalar("Q")
        if n * least_bytes > self.size - self.pos:
            raise self.fail(f"{what} {n:,} cannot fit in the {self.size - self.pos:,} bytes left")
        return n

    def string(self, what: str) -> str:
        raw = self.bytes(self.count(f"{what} length", 1))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, kind: int, depth: int = 0):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string("string")
        if kind == _ARRAY and depth == 0:
            item = self.scalar("I")
            least = struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8
            n = self.count("array length", least)
            if item in _SCALARS:
                self.skip(n * least)  # numbers are not needed
                return None
            for _ in range(n):
                self.value(item, depth + 1)
            return None
        raise self.fail(f"value type {kind}")


def check_gguf(path: str | os.PathLike) -> None:
    """Walk the header of the GGUF file at `path` with bounds (module docstring); UserError on any fault."""
    from gguf import GGML_QUANT_SIZES

    path = Path(path)
    with open(path, "rb") as f:
        if path.stat().st_size < 24:
            raise UserError(f"{path}: not a valid GGUF file: {path.stat().st_size} bytes, shorter than a header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _walk(_Reader(data, path), GGML_QUANT_SIZES)


def _walk(r: _Reader, quant_sizes: dict) -> None:
    if r.bytes(4) != b"GGUF":
        raise r.fail("no GGUF magic")
    version = r.scalar("I")
    if version not in (2, 3):
        raise r.fail(f"version {version} (llama.cpp writes 2 or 3)")
    n_tensors = r.count("tensor count", 8 + 4 + 8 + 4 + 8)
    n_kv = r.count("metadata count", 8 + 4)
    alignment = 32
    for _ in range(n_kv):
        key = r.string("key")
        value = r.value(r.scalar("I"))
        if key == "general.alignment":
            if not isinstance(value, int) or value < 1 or value & (value - 1) or value > 1 << 16:
                raise r.fail(f"general.alignment {value}")
            alignment = value
    tensors = []
    for _ in range(n_tensors):
        name = r.string("tensor name")
        n_dims = r.scalar("I")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise r.fail(f"tensor {name[:80]} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        dims = [r.scalar("Q") for _ in range(n_dims)]
        kind, offset = r.scalar("I"), r.scalar("Q")
        if kind not in quant_sizes:
            raise r.fail(f"tensor {name[:80]} has type {kind}, which ggml does not know")
        block, type_size = quant_sizes[kind]
        if min(dims) < 1 or math.prod(dims) > 1 << 48 or dims[0] % block:
            raise r.fail(f"tensor {name[:80]} has shape {dims[::-1]}")
        tensors.append((name, offset, math.prod(dims) // block * type_size))
    start = -(-r.pos // alignment) * alignment
    for name, offset, nbytes in tensors:
        if offset % alignment or start + offset + nbytes > r.size:
            raise r.fail(f"tensor {name[:80]}'s data ({nbytes:,} bytes at {offset:,}) lies outside the file")


def check_model_dir(directory: str | os.PathLike, what: str = "model") -> None:
    """A model directory's config.json (`check_config`) and .gguf files (`check_gguf`), as a loader would read
    them; `what` names the directory's role in messages."""
    directory = Path(directory)
    config = read_json_object(directory / "config.json")
    if config is not None:
        check_config(config, f"{what}: {directory / 'config.json'}", directory)
    for gguf_file in sorted(directory.glob("*.gguf")):
        check_gguf(gguf_file)


def read_json_object(path: str | os.PathLike, max_bytes: int = 16 * 2**20) -> dict | None:
    """The JSON object in `path` (a metadata file: config.json, adapter_config.json, a report), None when there is
    no such file; a file that is not one, or is larger than `max_bytes`, is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UserError(f"{path}: {size:,} bytes; a metadata file this large is not one (limit {max_bytes:,})")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data

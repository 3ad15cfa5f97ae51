"""Training state as data: nested Python/torch/numpy values to safetensors + JSON and back, never pickle.

Checkpoints travel between people and machines, so reading one must not be able to run code. An optimizer,
scheduler or RNG state is a tree of dicts, lists, tuples, numbers, strings and tensors; `save_tree` writes its
tensors into one safetensors file and the tree's shape into that file's JSON metadata (tensors replaced by
their key), and `load_tree` rebuilds it. Neither format can name a Python callable, so loading is only parsing.

DeepSpeed writes its own ZeRO partitions with `torch.save`; `weights_only_load` reads those with torch's
weights-only unpickler, which rebuilds tensors and plain containers plus an explicit allow-list of
DeepSpeed's state classes, and refuses any other global instead of importing it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from finetune.train.optional import deepspeed_globals

_TREE_KEY = "finetune.tree"
_FORMAT = "finetune-state/1"


class StateFormatError(ValueError):
    """A state file that does not parse as what we write (torn, foreign, or tampered with)."""


def _encode(obj, tensors: dict):
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # A fresh contiguous CPU copy: safetensors refuses views and tensors that share storage.
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        # Optimizer state is keyed by parameter index: keep int keys ints.
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (only tensors, numbers, strings, "
                    "lists, tuples and dicts)")


def _decode(node, tensors: dict):
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        raise StateFormatError(f"unexpected {type(node).__name__} in the state tree")
    if len(node) == 1:
        (tag, value), = node.items()
        if tag in ("__tensor__", "__ndarray__"):
            if value not in tensors:
                raise StateFormatError(f"the state tree names tensor {value!r}, which the file does not hold")
            return tensors[value] if tag == "__tensor__" else tensors[value].numpy()
        if tag == "__float__":
            if value not in ("nan", "inf", "-inf"):
                raise StateFormatError(f"bad float {value!r} in the state tree")
            return float(value)
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in _as_list(value))
        if tag == "__items__":
            pairs = [_as_list(p) for p in _as_list(value)]
            if any(len(p) != 2 for p in pairs):
                raise StateFormatError("bad key/value pair in the state tree")
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in pairs}
    return {k: _decode(v, tensors) for k, v in node.items()}


def _as_list(value) -> list:
    if not isinstance(value, list):
        raise StateFormatError(f"expected a list in the state tree, got {type(value).__name__}")
    return value


def _hashable(key):
    if isinstance(key, (list, dict)) or isinstance(key, torch.Tensor):
        raise StateFormatError("unhashable key in the state tree")
    return key


def save_tree(obj, path: Path) -> None:
    """Write `obj` to `path` (a .safetensors file): tensors as tensors, the rest as JSON in the header."""
    tensors: dict = {}
    tree = json.dumps(_encode(obj, tensors), allow_nan=False, separators=(",", ":"))
    save_file(tensors, str(path), metadata={_TREE_KEY: tree, "format": _FORMAT})


def load_tree(path: Path):
    """Rebuild what `save_tree` wrote. Raises StateFormatError for anything else (never runs code)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise StateFormatError(f"{Path(path).name} is not a readable safetensors file ({_one_line(e)})") from None
    if meta.get("format") != _FORMAT or _TREE_KEY not in meta:
        raise StateFormatError(f"{Path(path).name} was not written by finetune (no {_TREE_KEY} metadata)")
    return _decode(_parse_json(meta[_TREE_KEY], path), tensors)


def save_json_tree(obj, path: Path) -> None:
    """`save_tree` for states without tensors (the LR scheduler): a readable JSON file."""
    tensors: dict = {}
    tree = _encode(obj, tensors)
    if tensors:
        raise TypeError(f"{Path(path).name}: state holds tensors; use save_tree")
    Path(path).write_text(json.dumps({"format": _FORMAT, "tree": tree}, allow_nan=False, indent=1))


def load_json_tree(path: Path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StateFormatError(f"{Path(path).name} is unreadable ({_one_line(e)})") from None
    data = _parse_json(text, path)
    if not isinstance(data, dict) or data.get("format") != _FORMAT or "tree" not in data:
        raise StateFormatError(f"{Path(path).name} was not written by finetune")
    return _decode(data["tree"], {})


def _parse_json(text: str, path: Path):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise StateFormatError(f"{Path(path).name} holds no valid JSON ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------- DeepSpeed


# The classes DeepSpeed pickles into its ZeRO checkpoints besides tensors and containers.
DEEPSPEED_STATE_CLASSES = (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                           ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                           ("deepspeed.utils.tensor_fragment", ("fragment_address",)))


def weights_only_load(path, map_location=None):
    """`torch.load` with the weights-only unpickler and DeepSpeed's allow-list; a file that names any other
    global raises StateFormatError naming it (nothing is imported or called)."""
    with torch.serialization.safe_globals(deepspeed_globals(DEEPSPEED_STATE_CLASSES)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # the unpickler raises UnpicklingError, RuntimeError or others for bad input
            raise StateFormatError(f"{Path(path).name} cannot be loaded as data ({_one_line(e)})") from None


class WeightsOnlyEngine:
    """Wraps a DeepSpeed checkpoint engine so that every file it loads goes through `weights_only_load`."""

    def __init__(self, inner):
        self._inner = inner

    def load(self, path, map_location=None):
        return weights_only_load(path, map_location)

    def __getattr__(self, name):
        return getattr(self._inner, name)

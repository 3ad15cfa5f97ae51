"""File types and llama.cpp's per-tensor choice of tensor type (src/llama-quant.cpp).

A file type such as Q4_K_M names a default tensor type (Q4_K) and a mix: which tensors get more bits.
For the types we write, llama.cpp decides:
- 1-D tensors and norms stay F32; float file types store every other tensor in their float type.
- The output head, or the token embedding when it doubles as the head (tied), gets Q6_K, or Q8_0 when its rows
  do not fit the default type's block (or the file is Q8_0).
- Q4_K_M / Q5_K_M: attn_v (or a fused attn_qkv) and ffn_down (ffn_down_exps too) of the layers `use_more_bits`
  picks (the first and last eighth, and every third one between) get Q6_K; in a 70B-class model (80 layers, grouped
  KV heads) the other attn_v get Q5_K.
- 8 experts (Mixtral's shape): attn_v and attn_k get Q8_0, attn_output Q5_K in Q4_K_M.
- Q4_0 with an importance matrix: ffn_down of the first eighth of the layers gets Q4_1.
- A MoE router (ffn_gate_inp) is never quantized.
- Fallback: a K-type whose 256-block does not divide the row length (SmolLM2's 576) becomes Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0; a type that still does not fit becomes F16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as G
from gguf import LlamaFileType as F

from quant.errors import UserError
from quant.ggml.types import tensor_type


@dataclass(frozen=True)
class FileType:
    name: str
    ftype: F
    default: G

    @property
    def quantized(self) -> bool:
        return tensor_type(self.default).fmt is not None


FILE_TYPES = {ft.name: ft for ft in (
    FileType("f32", F.ALL_F32, G.F32), FileType("f16", F.MOSTLY_F16, G.F16), FileType("bf16", F.MOSTLY_BF16, G.BF16),
    FileType("q8_0", F.MOSTLY_Q8_0, G.Q8_0), FileType("q4_0", F.MOSTLY_Q4_0, G.Q4_0),
    FileType("q4_k_m", F.MOSTLY_Q4_K_M, G.Q4_K), FileType("q5_k_m", F.MOSTLY_Q5_K_M, G.Q5_K),
    FileType("q6_k", F.MOSTLY_Q6_K, G.Q6_K),
)}

_FALLBACK = {G.Q4_K: G.Q5_0, G.Q5_K: G.Q5_1, G.Q6_K: G.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def file_type(name: str) -> FileType:
    try:
        return FILE_TYPES[name.lower()]
    except KeyError:
        raise UserError(f"GGUF type {name!r} is not supported; choose one of {', '.join(FILE_TYPES)}") from None


@dataclass(frozen=True)
class ModelShape:
    """What llama.cpp's mix looks at besides a tensor's name and shape."""

    n_layer: int
    tied_embeddings: bool
    large: bool = False  # llama.cpp's LLM_TYPE_70B: 80 layers with grouped KV heads
    has_importance: bool = False
    n_expert: int = 0


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name and \
        "ffn_gate_inp.weight" not in name


def _mixed(name: str, row: int, ft: FileType, model: ModelShape) -> G:
    layer = _LAYER.match(name)
    i = int(layer.group(1)) if layer else -1
    km = ft.name in ("q4_k_m", "q5_k_m")
    if name == "output.weight" or (model.tied_embeddings and name == "token_embd.weight"):
        if not tensor_type(ft.default).fits(row):
            return G.Q8_0
        return G.Q8_0 if ft.default == G.Q8_0 else G.Q6_K
    if "attn_v.weight" in name or "attn_qkv.weight" in name:
        t = G.Q6_K if km and use_more_bits(i, model.n_layer) else ft.default
        t = G.Q5_K if model.large and t in (G.Q3_K, G.Q4_K) else t
        return G.Q8_0 if model.n_expert == 8 else t
    if "attn_k.weight" in name and model.n_expert == 8:
        return G.Q8_0
    if "attn_output.weight" in name and model.n_expert == 8 and ft.name == "q4_k_m":
        return G.Q5_K
    if "ffn_down" in name:
        if km and use_more_bits(i, model.n_layer):
            return G.Q6_K
        if ft.name == "q4_0" and model.has_importance and i < model.n_layer // 8:
            return G.Q4_1
    return ft.default


def choose(name: str, shape: tuple[int, ...], ft: FileType, model: ModelShape) -> G:
    """The tensor type llama.cpp's quantizer gives GGUF tensor `name` of numpy `shape` in a file of type `ft`."""
    if not _quantizable(name, shape):
        return G.F32
    if not ft.quantized:
        return ft.default
    row = shape[-1]
    chosen = _mixed(name, row, ft, model)
    if not tensor_type(chosen).fits(row):
        chosen = _FALLBACK.get(chosen, G.F16)
        if not tensor_type(chosen).fits(row):
            chosen = G.F16
    return chosen

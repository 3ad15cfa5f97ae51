"""HF tensors -> the GGUF tensors llama.cpp reads, as the model family's description (quant.arch) says.

One HF tensor may become several GGUF tensors or none:
- fused 3-D experts become `ffn_{gate,up,down}_exps` [E, out, in]: gate/up split in halves (Qwen3-MoE, Mixtral) or
  de-interleaved from gpt-oss's transposed [E, H, 2I] (its biases likewise);
- gpt-oss's attention sinks gain `.weight`; a tied head, rotary caches and a vision tower are not stored;
- llama.cpp rotates Llama-style (NORM rope) q/k as interleaved pairs, HF as two halves, so their rows are permuted
  per head (convert_hf_to_gguf.py does the same; transformers' GGUF loader undoes it);
- Gemma's norms multiply by (1 + w), llama.cpp's by w: every Gemma norm is written as 1 + w (in fp32).
Every other name goes through gguf-py's own name map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import gguf
import torch

from quant.arch import Architecture
from quant.arch.parts import ROPE_NORM
from quant.errors import UserError

_SKIP = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Target:
    """One GGUF tensor made from an HF tensor."""

    name: str
    make: Callable[[torch.Tensor], torch.Tensor] = _same


def permute_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from halves (HF's rotate_half) to interleaved pairs (llama.cpp's NORM rope)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


class TensorMap:
    """Names and layouts of one model's tensors in GGUF (module docstring)."""

    def __init__(self, desc: Architecture, gguf_arch: gguf.MODEL_ARCH):
        self.desc = desc
        self.names = gguf.get_tensor_name_map(gguf_arch, desc.n_layer)
        self.experts = desc.family.experts
        self.sinks = desc.family.attention.sinks

    def text_name(self, hf_name: str) -> str | None:
        """The name as in a text-only model of the family ("model.layers..."), None for a vision tower's."""
        if not self.desc.is_text(hf_name):
            return None
        decoder = self.desc.decoder + "."
        return "model." + hf_name[len(decoder):] if hf_name.startswith(decoder) else hf_name

    def targets(self, hf_name: str) -> list[Target]:
        """The GGUF tensors of an HF tensor (state_dict names); [] for what GGUF does not store."""
        name = self.text_name(hf_name)
        if name is None or _SKIP.search(name) or (self.desc.tied and name == "lm_head.weight"):
            return []
        layer = _LAYER.search(name)
        special = self._experts(name, layer) or self._sinks(name, layer)
        if special is not None:
            return special
        gname = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None or "attn_rot_embd" in gname:
            raise UserError(f"tensor {hf_name!r} has no place in a GGUF {self.desc.family.gguf} model")
        return [Target(gname, self._layout(gname))]

    def _layout(self, gname: str) -> Callable[[torch.Tensor], torch.Tensor]:
        offset = self.desc.family.norms.offset
        if offset and gname.endswith("norm.weight"):
            return lambda t: t.float() + offset
        if self.desc.family.rope == ROPE_NORM and (".attn_q." in gname or ".attn_k." in gname):
            heads = self.desc.n_head if ".attn_q." in gname else self.desc.n_kv_head
            return lambda t: permute_heads(t, heads)
        return _same

    def _sinks(self, name: str, layer) -> list[Target] | None:
        if self.sinks and layer and name.endswith(f".{self.desc.family.attention.path}.{self.sinks}"):
            return [Target(f"blk.{layer.group(1)}.attn_sinks.weight")]
        return None

    def _experts(self, name: str, layer) -> list[Target] | None:
        ex = self.experts
        if ex is None or layer is None or f".{ex.path}." not in name:
            return None
        leaf = name.rsplit(".", 1)[-1]
        blk = f"blk.{layer.group(1)}"
        if leaf == ex.down:
            return [Target(f"{blk}.ffn_down_exps.weight",
                           lambda t: t.transpose(-1, -2).contiguous() if ex.transposed else t)]
        if leaf == ex.down_bias:
            return [Target(f"{blk}.ffn_down_exps.bias")]
        if leaf == ex.gate_up:
            def half(i):
                def make(t):
                    w = t.transpose(-1, -2) if ex.transposed else t
                    return (w[:, i::2] if ex.interleaved else w.chunk(2, dim=1)[i]).contiguous()
                return make
            return [Target(f"{blk}.ffn_gate_exps.weight", half(0)), Target(f"{blk}.ffn_up_exps.weight", half(1))]
        if leaf == ex.gate_up_bias:
            def bias_half(i):
                return lambda t: (t[:, i::2] if ex.interleaved else t.chunk(2, dim=1)[i]).contiguous()
            return [Target(f"{blk}.ffn_gate_exps.bias", bias_half(0)), Target(f"{blk}.ffn_up_exps.bias", bias_half(1))]
        raise UserError(f"tensor {name!r}: not a parameter of {self.desc.family.title}'s experts ({ex.parameters})")

    def expected(self) -> list[str]:
        """Every GGUF tensor llama.cpp needs for this model (biases are optional and not listed)."""
        d, fam = self.desc, self.desc.family
        hf = ["model.embed_tokens.weight", f"model.{fam.norms.final}.weight"] + ([] if d.tied else ["lm_head.weight"])
        att = fam.attention
        for i in range(d.n_layer):
            block = f"model.layers.{i}."
            hf += [block + n + ".weight" for n in fam.norms.names]
            hf += [f"{block}{att.path}.{n}.weight" for n in att.projections + tuple(p for p in (att.q_norm, att.k_norm)
                                                                                     if p)]
            hf += [f"{block}{att.path}.{att.sinks}"] if att.sinks else []
            if d.moe_layers[i]:
                hf += [f"{block}{fam.experts.path}.{fam.experts.gate_up}", f"{block}{fam.experts.path}.{fam.experts.down}",
                       f"{block}{fam.router.path}.{fam.router.weight}"]
            else:
                hf += [f"{block}{fam.mlp.path}.{n}.weight" for n in fam.mlp.projections]
        return [t.name for n in hf for t in self.targets(n)]

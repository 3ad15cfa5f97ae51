"""The base checkpoint's layout for the streaming merge: its model skeleton (names, shapes, module types at no
memory cost) and the units it is walked in, one decoder layer at a time.

The weights of each unit, exactly as the adapter saw them in training, come from the base's format
(quant.formats: `Format.rebuilder`): a bitsandbytes base is quantized again from its float checkpoint with the
settings of its record and dequantized, a GPTQ base is dequantized from its packed tensors. Tests compare both
rebuilds bit for bit with the modules `load_base` builds.
"""

from __future__ import annotations

from dataclasses import dataclass

from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from quant.arch.layout import to_disk_tensors
from quant.blocks import find_blocks
from quant.errors import UserError


def skeleton(config: dict):
    """The model of `config` with every parameter on the meta device: names, shapes and module types for free.

    Buffers (rotary frequencies) stay real, so the embeddings + rotary part can run for GPTQ calibration.
    """
    config = dict(config)
    config.pop("quantization_config", None)
    cfg = AutoConfig.for_model(**config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def block_prefix(model) -> tuple[str, int]:
    prefix, blocks = find_blocks(model)
    return prefix, len(blocks)


@dataclass
class Unit:
    """A slice of the checkpoint processed at once: one decoder layer, or everything outside the layers."""

    index: int | None  # decoder layer index; None for embeddings, final norm, lm_head
    keys: list[str]

    @property
    def name(self) -> str:
        return "embeddings/norm/head" if self.index is None else f"layer {self.index}"


def plan_units(keys: list[str], prefix: str, n_layers: int, arch=None) -> list[Unit]:
    """The non-layer tensors first (GPTQ needs the embeddings before layer 0), then the layers in order. `keys` are
    the checkpoint's names, `prefix` the model's own (state_dict) name of the block list; `arch` (the description)
    maps the one to the other."""
    layers: list[list[str]] = [[] for _ in range(n_layers)]
    rest = []
    head = prefix + "."
    for k in keys:
        name = arch.to_memory(k) if arch is not None else k
        if name.startswith(head):
            idx = name[len(head):].split(".", 1)[0]
            if idx.isdigit() and int(idx) < n_layers:
                layers[int(idx)].append(k)
                continue
            raise UserError(f"checkpoint tensor {k} belongs to no layer of a {n_layers}-layer model")
        rest.append(k)
    return [Unit(None, rest)] + [Unit(i, ks) for i, ks in enumerate(layers)]


def disk_tensors(arch, tensors: dict) -> dict:
    """Tensors under the model's own names as transformers writes them to disk (per-expert weights, Mixtral's v4
    names, a multimodal prefix: quant.arch.layout); as they are without a description."""
    if arch is None:
        return tensors
    return {k: v for key, t in tensors.items() for k, v in to_disk_tensors(arch, key, t)}

"""Per-column activation energy of every Linear, from the model's own forward passes on calibration text.

This is the idea behind llama.cpp's importance matrix: a weight column that multiplies large activations matters
more, so the K-quant scale search weights each column's error by the mean of x² over the calibration tokens
(only relative values matter: the searches are invariant to scaling all weights). Collected with forward
pre-hooks on the layer types the caller names (nn.Linear, and a quantized model's own layer types, which the
format registry knows), so a float model, a GPTQ or AWQ model or a peft model (base + adapter: the base layer sees
the same input as the merged layer will) all work; names are the plain HF weight names
("model.layers.0.self_attn.q_proj.weight").
"""

from __future__ import annotations

import re

import torch
from torch import nn
from tqdm.auto import tqdm

from quant.errors import UserError

_PEFT = re.compile(r"^(base_model\.model\.)|(\.base_layer)(?=$)")


def weight_name(module_name: str) -> str:
    """The HF weight name a module's input energy belongs to (peft's wrapper prefixes removed)."""
    return _PEFT.sub("", module_name) + ".weight"


def _layers(model: nn.Module, layer_types: tuple[type, ...]) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, layer_types) and ".lora_" not in n and not n.startswith("lora_")}


@torch.no_grad()
def collect_importance(model: nn.Module, chunks: list[torch.Tensor], device=None, progress: bool = True,
                       layer_types: tuple[type, ...] = (nn.Linear,)) -> dict[str, torch.Tensor]:
    """Mean x² per input column of every layer of `layer_types` over all calibration tokens: {HF weight name:
    fp32 [in]} on CPU.

    `chunks`: [1, T] token-id tensors (quant.calibration.calibration_chunks). The model runs where it is (its
    inputs are moved to `device`, default the model's device).
    """
    if not chunks:
        raise UserError("calibration data gave no token windows to collect activation statistics from")
    layers = _layers(model, layer_types)
    if not layers:
        raise UserError(f"{type(model).__name__} has no Linear layers to collect activation statistics for")
    device = device or next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(_mod, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums[name] + x.pow(2).sum(0) if name in sums else x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for ids in tqdm(chunks, desc="activation energy", unit="window", disable=not progress):
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {weight_name(n): (s / counts[n]).cpu() for n, s in sums.items()}

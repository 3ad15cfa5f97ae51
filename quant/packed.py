"""What every packed-weight checkpoint (GPTQ, AWQ) shares: building an HF model around packed layers from
a checkpoint directory, and writing such a model back as safetensors + config.

The format-specific parts come in as plain arguments: which modules are packed, and a function that
makes the packed layer for one nn.Linear.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from quant.errors import UserError
from quant.files import safetensors_files
from quant.formats.gptq import write_checkpoint

log = logging.getLogger(__name__)


def local_dir(path, what: str) -> Path:
    """A checkpoint spec (local dir, pkg:..., hub id) as a local directory."""
    from quant.loading import resolve_model_path

    local = Path(resolve_model_path(str(path), what=what))
    if local.exists():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path)))


def read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state = {}
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                state[k] = fh.get_tensor(k)
    return state


def load_packed_model(path: Path, raw_qconfig: dict, make_layer: Callable[[str, nn.Linear, dict], nn.Module],
                      what: str, device=None, dtype=None) -> nn.Module:
    """The HF model of `path`'s config.json with every Linear that has a `qweight` in the checkpoint replaced by
    make_layer(name, linear, state) (built on the meta device), and the safetensors assigned directly (no
    random init, no copy). Tensors outside the packed layers are cast to `dtype` (default fp32 on CPU, fp16 on
    GPU); `make_layer` may adjust `state` for its layer. The model is returned on `device`, in eval mode.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device) if device else torch.device("cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)
    state = read_state(path)
    qnames = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not qnames:
        raise UserError(f"{path}: no '*.qweight' tensors, so no {what} layers to load")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # otherwise transformers would hand the model to its own quantizer
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in qnames:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{path}: tensor {name}.qweight names no module of {type(model).__name__}") from None
        if not isinstance(old, nn.Linear):
            raise UserError(f"{path}: {name} is a {type(old).__name__}, not a Linear; cannot hold {what} weights")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make_layer(name, old, state))
    packed = set(qnames)
    for k, t in state.items():
        if t.is_floating_point() and k.rpartition(".")[0] not in packed:
            state[k] = t.to(dtype)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise UserError(f"{path}: tensors do not match the config: {str(e).splitlines()[-1].strip()}") from None
    if result.unexpected_keys:
        log.warning("%s: ignored %d tensors not in the model, e.g. %s", path, len(result.unexpected_keys),
                    result.unexpected_keys[:3])
    model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise UserError(f"{path}: checkpoint lacks {len(still_meta)} tensors, e.g. {still_meta[:3]}")
    model.config.quantization_config = raw_qconfig
    model.to(device)
    model.eval()
    return model


def save_packed(model: nn.Module, out_dir, qconfig: dict, packed_types: tuple[type, ...], tokenizer=None,
                dtype=torch.float16, report: dict | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` as a checkpoint directory: tensors of `packed_types` modules keep their format dtypes,
    every other float tensor is written in `dtype`; tied tensors (lm_head = embed_tokens) are written once,
    as transformers does. `qconfig` goes to config.json and quantize_config.json; `report` to quant_log.json."""
    qnames = {n for n, m in model.named_modules() if isinstance(m, packed_types)}
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            continue
        seen.add(ident)
        if key.rpartition(".")[0] not in qnames and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = str(dtype).replace("torch.", "")
    config_dict.pop("torch_dtype", None)
    if not config_dict.get("architectures"):
        config_dict["architectures"] = [type(model).__name__]

    def extras(tmp: Path) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if report is not None:
            (tmp / "quant_log.json").write_text(json.dumps(report, indent=1))

    return write_checkpoint(out_dir, tensors, config_dict, qconfig, extras, max_shard_bytes)

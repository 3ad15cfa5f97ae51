"""Load a base model (bitsandbytes on the fly, GPTQ checkpoint, or unquantized) and attach LoRA with peft."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from finetune.recipe import BaseConfig, LoraConfig
from quant.errors import UserError
from quant.formats.bnb import keep_reference_layout
from quant.loading import load_tokenizer, materialize

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.

    CPU bitsandbytes backward is ~15x slower with bf16 compute than fp32, so auto never picks bf16 there.
    """
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def checkpoint_quant_method(model_dir: str) -> str | None:
    """The `quant_method` a checkpoint declares in its config.json, if it is a local directory."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{config}: not valid JSON ({type(e).__name__}); the model directory is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{config}: not a JSON object; the model directory is damaged")
    qc = data.get("quantization_config") or {}
    return qc.get("quant_method") if isinstance(qc, dict) else None


def resolve_quantization(base: BaseConfig, model_dir: str) -> str:
    """`auto` means GPTQ when the checkpoint is GPTQ, else NF4 (the QLoRA default)."""
    declared = checkpoint_quant_method(model_dir)
    if base.quantization == "auto":
        return "gptq" if declared == "gptq" else "nf4"
    if declared == "gptq" and base.quantization != "gptq":
        raise UserError(
            f"base.quantization = '{base.quantization}' but {base.model} is a GPTQ checkpoint; "
            "use 'gptq' or 'auto'"
        )
    if base.quantization == "gptq" and declared != "gptq":
        raise UserError(f"base.quantization = 'gptq' but {base.model} has no GPTQ quantization_config in config.json")
    return base.quantization


def bnb_config(quantization: str, base: BaseConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = compute_dtype if base.quant_storage == "auto" else getattr(torch, base.quant_storage)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=base.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage,
    )


@dataclass
class LoadedBase:
    model: torch.nn.Module
    tokenizer: object
    quantization: str  # resolved: nf4 | fp4 | int8 | gptq | none
    compute_dtype: torch.dtype
    model_dir: str  # the local directory the weights came from (GGUF is converted into a cache dir)


def check_attn_implementation(name: str, device: torch.device) -> None:
    if name != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError("base.attn_implementation = 'flash_attention_2' needs the flash-attn package "
                        "(pip install flash-attn, on a CUDA machine); use 'sdpa' or 'auto'")
    if device.type != "cuda":
        raise UserError(f"base.attn_implementation = 'flash_attention_2' runs on CUDA GPUs only (this run is on "
                        f"{device.type}); use 'sdpa' or 'auto'")


@contextlib.contextmanager
def _loading(spec: str):
    """A base that transformers cannot read is the user's to fix: one line naming base.model."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"base.model = '{spec}': cannot load it ({_one_line(e)})") from None
    except (ValueError, KeyError, SafetensorError) as e:
        raise UserError(f"base.model = '{spec}': not a model transformers can load ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def load_base(base: BaseConfig, device: torch.device) -> LoadedBase:
    """Build the frozen base on `device`; embeddings, norms and lm_head stay unquantized."""
    check_attn_implementation(base.attn_implementation, device)
    model_dir = materialize(base.model, "base.model")
    quantization = resolve_quantization(base, model_dir)
    compute_dtype = resolve_compute_dtype(base.compute_dtype, device)
    with _loading(base.model):
        tokenizer = load_tokenizer(model_dir, "base.model")
    model = _load_model(base, model_dir, quantization, compute_dtype, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedBase(model, tokenizer, quantization, compute_dtype, model_dir)


def _load_model(base: BaseConfig, model_dir: str, quantization: str, compute_dtype: torch.dtype,
                device: torch.device):
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    attn = None if base.attn_implementation == "auto" else base.attn_implementation
    if quantization == "gptq":
        from quant.model import load_gptq_model

        model = load_gptq_model(model_dir, device=device, dtype=compute_dtype)
        if attn:
            model.set_attn_implementation(attn)
    else:
        kwargs = {"dtype": compute_dtype, "attn_implementation": attn}
        if quantization != "none":
            kwargs["quantization_config"] = bnb_config(quantization, base, compute_dtype)
            # bitsandbytes quantizes while moving weights to their device, so the map must be explicit;
            # except under DeepSpeed ZeRO-3, where transformers refuses a map and uses the current device.
            if not is_deepspeed_zero3_enabled():
                kwargs["device_map"] = {"": device}
        with _loading(base.model):
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        if quantization == "none":
            model.to(device)
        # Before any forward: an eval pass would otherwise convert 4-bit weights to a CPU bf16 layout for good.
        keep_reference_layout(model)
    return model


def attach_lora(model: torch.nn.Module, lora: LoraConfig, gradient_checkpointing: bool):
    """Wrap `model` with trainable LoRA adapters (peft) in fp32 master weights."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no requires_grad on the inputs and works with frozen bases.
        # Newer transformers renamed the method (the old name warns); older releases only have the old one.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    targets = lora.target_modules
    gptq = _has_quantlinear(model)
    if gptq and targets == "all-linear":
        # peft's 'all-linear' only knows nn.Linear and bitsandbytes layers; spell out our GPTQ layers' names.
        from quant.nn import QuantLinear

        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, QuantLinear)})
    _check_target_modules(model, targets)
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if gptq:
        from quant.peft_support import register_quantlinear

        register_quantlinear(config)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft refuses a matched module it cannot adapt (a whole decoder layer, ...)
        raise UserError(f"lora.target_modules = {targets!r}: {_one_line(e)}") from None


def _has_quantlinear(model: torch.nn.Module) -> bool:
    from quant.nn import QuantLinear

    return any(isinstance(m, QuantLinear) for m in model.modules())


def load_adapter(base_model: torch.nn.Module, adapter_dir, is_trainable: bool = False):
    """`PeftModel.from_pretrained` that also works on GPTQ bases (peft needs our layer registered first)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel

    config = PeftLoraConfig.from_pretrained(str(adapter_dir))
    if _has_quantlinear(base_model):
        from quant.peft_support import register_quantlinear

        register_quantlinear(config)
    return PeftModel.from_pretrained(base_model, str(adapter_dir), config=config, is_trainable=is_trainable)


def _check_target_modules(model: torch.nn.Module, targets) -> None:
    names = [name for name, _ in model.named_modules()]
    if targets == "all-linear":
        return
    if isinstance(targets, str):
        # peft matches a string target against the full module names with re.fullmatch.
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        leaf_names = {name.rsplit(".", 1)[-1] for name in names}
        missing = [t for t in targets if t not in leaf_names and not any(n.endswith(t) for n in names)]
    if missing:
        linear_like = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "in_features")} - {"lm_head"}
        )
        raise UserError(f"lora.target_modules: {missing} not found in the model; its linear layers are {linear_like}")


def memory_report(model: torch.nn.Module) -> dict:
    """Bytes held by parameters and buffers, split into quantized storage, other frozen, and trainable."""
    quantized = frozen = trainable = 0
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        if getattr(t, "requires_grad", False):
            trainable += nbytes
        elif t.dtype in (torch.uint8, torch.int8, torch.int32) or type(t).__name__ in ("Params4bit", "Int8Params"):
            quantized += nbytes
        else:
            frozen += nbytes
        # Quant-state tensors hang off Params4bit and are not parameters or buffers.
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            quantized += _quant_state_bytes(qs)
    total = quantized + frozen + trainable
    return {"total_mb": total / 2**20, "quantized_mb": quantized / 2**20, "frozen_mb": frozen / 2**20,
            "trainable_mb": trainable / 2**20}


def _quant_state_bytes(qs) -> int:
    total = 0
    for name in ("absmax", "code"):
        t = getattr(qs, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    if getattr(qs, "state2", None) is not None:
        total += _quant_state_bytes(qs.state2)
    return total


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting packed 4-bit storage as two weights per byte and a GPTQ
    layer's packed int32 buffer (not a parameter) as its in x out weights."""
    from quant.nn import QuantLinear

    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        total += n
        if p.requires_grad:
            trainable += n
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return trainable, total

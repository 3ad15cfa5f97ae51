"""Resolve the base once (a `BaseSpec`), load it through its format (quant.formats), attach LoRA with peft.

Which layers are frozen quantized layers, what peft needs registered for them and what counts as quantized storage
is asked of the format registry. peft is imported where it is used: it takes ~10 s to import (it imports
bitsandbytes), and the finetune CLI imports this module for every command.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from finetune.exact import target as exact_target
from finetune.recipe import BaseConfig, LoraConfig
from quant.arch import Architecture, describe
from quant.errors import UserError
from quant.formats import registry as formats
from quant.formats.base import BaseSpec, resolve_compute_dtype
from quant.loading import load_tokenizer, materialize
from quant.model_checks import read_json_object
from quant.moe.convert import architecture
from quant.peft_support import register_lora_layers

log = logging.getLogger(__name__)


def resolve_base(base: BaseConfig, device: torch.device) -> BaseSpec:
    """The recipe's base section resolved once into the record that loading, the run's checks, the adapter
    directory (base.json) and the merge share: local weights (a GGUF is converted once), format (`auto`: as the
    checkpoint is stored, else NF4) with its settings, compute dtype on `device`."""
    model_dir = materialize(base.model, "base.model")
    return formats.resolve_base(base.model, model_dir, base.quantization, base.double_quant, base.quant_storage,
                                resolve_compute_dtype(base.compute_dtype, device))


@dataclass
class LoadedBase:
    model: torch.nn.Module
    tokenizer: object
    spec: BaseSpec

    @property
    def quantization(self) -> str:
        return self.spec.format

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.spec.dtype

    @property
    def model_dir(self) -> str:
        return self.spec.model_dir


def load_base(base: BaseConfig | BaseSpec, device: torch.device, attn_implementation: str = "auto") -> LoadedBase:
    """Build the frozen base on `device` from its record (or resolve a recipe section first, whose own
    attn_implementation then applies); embeddings, norms and lm_head stay unquantized."""
    if isinstance(base, BaseConfig):
        base, attn_implementation = resolve_base(base, device), base.attn_implementation
    check_attn_implementation(attn_implementation, device)
    check_architecture(base.model_dir)
    with _loading(base.model):
        tokenizer = load_tokenizer(base.model_dir, "base.model")
        attn = None if attn_implementation == "auto" else attn_implementation
        model = formats.format_of(base).load(base, device, attn)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedBase(model, tokenizer, base)


def check_architecture(model_dir: str) -> Architecture | None:
    """The base's architecture from its config.json, before any weights load: one we do not describe is refused,
    and so is a multimodal class transformers cannot load as a causal LM (Mistral 3's)."""
    config = read_json_object(Path(model_dir) / "config.json")
    if config is None:
        return None  # transformers' own error names what is missing
    arch = describe(config)
    if arch.hf_class == "Mistral3ForConditionalGeneration":
        raise UserError(f"base.model: {arch.hf_class} loads in transformers only as an image-text-to-text model; train "
                        "its text part from a text-only checkpoint (Ministral3ForCausalLM / MistralForCausalLM)")
    return arch


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
    arch = describe(model.config)
    targets, experts = _expert_targets(model, lora, arch)
    if experts is None:  # no expert layers: the description's projections
        targets, experts = lora.target_modules, []
        if targets == "all-linear":
            targets = all_linear(model, arch)
        _check_target_modules(model, targets, arch)
    custom = _has_custom_lora_layers(model)
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    _register_layers(config, model, lora.merge_target, custom)
    try:
        with _quiet_peft_checkpointing_probe():
            peft_model = get_peft_model(model, config)
    except ValueError as e:  # peft refuses a matched module it cannot adapt (a whole decoder layer, ...)
        raise UserError(f"lora.target_modules = {targets!r}: {_one_line(e)}") from None
    if experts:  # recorded for adapter_config.json: where peft puts the same adapters (finetune.lora_experts)
        peft_model.peft_config["default"].target_parameters = experts
    if lora.merge_target != exact_target.NONE:
        exact_target.check_layers(peft_model, lora.merge_target)
    return peft_model


def _expert_targets(model: torch.nn.Module, lora: LoraConfig, arch: Architecture):
    """A mixture of experts held as MoEExperts (every base we load): (peft's target_modules, spelled out without
    the experts and the router, and the target_parameters names of the expert adapters, attached here:
    finetune.lora_experts); (targets, None) for any other model."""
    if not arch.is_moe:
        return lora.target_modules, None
    from peft.utils.constants import DUMMY_TARGET_MODULES

    from finetune import lora_experts  # imports peft (see the module docstring)

    if not lora_experts.experts_modules(model):
        return lora.target_modules, None
    linear, params = lora_experts.resolve_targets(model, arch, lora.target_modules)
    if params:
        lora_experts.attach(model, params, lora.r, lora.alpha)
    return linear or DUMMY_TARGET_MODULES, lora_experts.target_parameters(arch, params)


def all_linear(model: torch.nn.Module, arch: Architecture) -> list[str] | str:
    """`all-linear` resolved from the family's description: the projections of the decoder blocks (whatever layer
    type holds them: nn.Linear, 4-bit, GPTQ, AWQ), never the LM head, the router or 3-D expert parameters.

    peft's own 'all-linear' takes a MoE router where it is an nn.Linear, and its transformers-4 name shim turns any
    target it resolves to `gate_proj`/`up_proj`/`down_proj` (or w1/w2/w3) in a Qwen3-MoE or Mixtral model into LoRA
    on the fused expert parameters, even a regex naming only a dense layer's MLP. So in a family with experts the
    dense MLP layers some configs have (Qwen3-MoE's mlp_only_layers) take no LoRA here; the experts are adapted
    by our own per-expert LoRA. In a multimodal class (Gemma 3's) the vision tower has projections of the same
    names: there the targets are one regex over the language model's blocks."""
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if arch.wrapper is not None:
        att, mlp = arch.family.attention, arch.family.mlp
        return (rf"(.*\.)?{re.escape(arch.blocks)}\.\d+\.({re.escape(att.path)}\.({'|'.join(att.projections)})|"
                rf"{re.escape(mlp.path)}\.({'|'.join(mlp.projections)}))")
    if arch.family.experts is not None:
        names = arch.family.attention.projections
        if not all(arch.moe_layers):
            log.warning("all-linear: the dense MLP layers of this %s model take no LoRA (peft would put it on the "
                        "experts instead)", arch.family.title)
    else:
        names = tuple(dict.fromkeys(arch.linear_names()))
    return [n for n in names if n in leaves]


def _register_layers(config, model, merge_target: str, custom: bool) -> None:
    """The LoRA layers peft has no dispatcher for: an exact-merge adapter's (finetune.exact), else the formats'."""
    if merge_target != exact_target.NONE:
        from finetune.exact.lora import register

        register(config, exact_target.model_route(model, merge_target))
    elif custom:
        register_lora_layers(config)


def _has_custom_lora_layers(model: torch.nn.Module) -> bool:
    """Whether the model holds layers peft has no dispatcher for (they must be registered with it)."""
    types = formats.custom_lora_types()
    return any(isinstance(m, types) for m in model.modules())


def load_adapter(base_model: torch.nn.Module, adapter_dir, is_trainable: bool = False):
    """`PeftModel.from_pretrained` that also works on GPTQ/AWQ bases (peft needs our layers registered first)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel

    config = PeftLoraConfig.from_pretrained(str(adapter_dir))
    expert_targets = _attach_saved_experts(base_model, config)
    _register_layers(config, base_model, exact_target.target_of(adapter_dir), _has_custom_lora_layers(base_model))
    with _quiet_peft_checkpointing_probe():
        model = PeftModel.from_pretrained(base_model, str(adapter_dir), config=config, is_trainable=is_trainable)
    if expert_targets:
        model.peft_config["default"].target_parameters = expert_targets
        for name, p in model.named_parameters():
            if ".lora_" in name and "experts" in name:
                p.requires_grad_(is_trainable)
    return model


def _attach_saved_experts(base_model: torch.nn.Module, config) -> list[str]:
    """An adapter with expert adapters (`target_parameters`, ours or peft's): the same adapter layers attached to
    the base's MoEExperts before peft loads the file (peft would look for the fused parameters); returns the
    target_parameters, taken off the config peft sees."""
    saved = list(config.target_parameters or [])
    if not saved:
        return []
    arch = architecture(base_model)
    if arch is None:
        return []
    from peft.utils.constants import DUMMY_TARGET_MODULES

    from finetune import lora_experts  # imports peft (see the module docstring)

    if not lora_experts.experts_modules(base_model):
        return []  # a 16-bit transformers model: peft adapts the fused parameters itself

    params = lora_experts.parameters_of(arch, saved)
    lora_experts.attach(base_model, params, config.r, config.lora_alpha, bool(config.use_rslora),
                        init_lora_weights=False)
    config.target_parameters = None
    if not config.target_modules:
        config.target_modules = DUMMY_TARGET_MODULES
    return saved


@contextlib.contextmanager
def _quiet_peft_checkpointing_probe():
    """peft's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers (5.17 and later) deprecates
    with a FutureWarning on every read: a message about peft's code that no user of ours can act on. Likewise its
    warning that the model already holds tuner layers, when they are our expert adapters."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        # The expert adapters (finetune.lora_experts) are peft tuner layers attached before peft wraps the model.
        warnings.filterwarnings("ignore", message="You are trying to modify a model with PEFT for a second time")
        yield


def _check_target_modules(model: torch.nn.Module, targets, arch: Architecture) -> None:
    names = [name for name, _ in model.named_modules()]
    router = arch.family.router
    if router is not None:
        leaf = router.path.rsplit(".", 1)[-1]
        hit = [t for t in ([targets] if isinstance(targets, str) else targets)
               if t in (leaf, router.path) or (isinstance(targets, str) and any(
                   re.fullmatch(targets, n) and n.endswith("." + router.path) for n in names))]
        if hit:
            raise UserError(f"lora.target_modules: {hit[0]!r} is the {arch.family.title} router ({router.path}), which "
                            "stays in full precision and takes no LoRA; target the attention/expert projections")
    experts = arch.family.experts
    if experts is not None and not isinstance(targets, str):
        fused = set(arch.family.mlp.projections if arch.family.mlp else ()) | set(experts.disk or ())
        hit = [t for t in targets if t.rsplit(".", 1)[-1] in fused]
        if hit:
            raise UserError(f"lora.target_modules: {hit[0]!r} in a {arch.family.title} model would put one LoRA on "
                            f"the fused 3-D expert parameters ({experts.path}) through peft; use 'all-linear' or "
                            "the attention projections")
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
    """Bytes held by parameters and buffers, split into quantized storage (the tensors holding the formats' frozen
    layers' weights, quant-state tensors included), other frozen, and trainable."""
    quantized = frozen = trainable = 0
    seen = set()
    for m in model.modules():
        for t in formats.quantized_storage(m):
            if id(t) not in seen:
                seen.add(id(t))
                quantized += t.numel() * t.element_size()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        if getattr(t, "requires_grad", False):
            trainable += nbytes
        else:
            frozen += nbytes
    total = quantized + frozen + trainable
    return {"total_mb": total / 2**20, "quantized_mb": quantized / 2**20, "frozen_mb": frozen / 2**20,
            "trainable_mb": trainable / 2**20}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting a quantized layer's weight (4-bit bytes, a GPTQ or AWQ
    layer's packed int32 buffers) as its in x out weights."""
    trainable = total = 0
    counted = set()
    for m in model.modules():
        storage = formats.quantized_storage(m)
        if storage:
            counted.update(id(t) for t in storage)
            total += m.in_features * m.out_features * getattr(m, "num_experts", 1)
    for p in model.parameters():
        if id(p) in counted:
            continue
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total

"""The training stacks `bench_train.py` compares, each built from the same saved bf16 model directory.

Every builder returns (model, optimizer, loss_of) where loss_of(ids, position_ids=None) is the mean next-token
loss of one micro-batch (position_ids given: packed rows, labels hidden at every example's first token).
Stacks:
  hf-doc    the QLoRA docs: NF4 + double quant, prepare_model_for_kbit_training (fp32 norms/embeddings),
            fp32 adapters, bf16 autocast, HF loss
  hf-lean   the same without the fp32 upcasts: bf16 model and bf16 adapters, no autocast
  liger     hf-lean with Liger-Kernel's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (class-level
            patches: runs in its own process)
  unsloth   unsloth's FastLanguageModel QLoRA path (its own forward, kernels and offloaded checkpointing;
            imported before transformers, in its own process)
  ours      `finetune sft`'s own path: load_base + attach_lora + install_fast_path, our loss and optimizer;
            `ours[KEY=VALUE,...]` applies recipe overrides (levers off: ours[train.fused_lora=false], ...)
All: LoRA r on all 7 projections (a mixture of experts: attention and every expert's gate_up and down), alpha = r,
no dropout, non-reentrant (or the stack's own) checkpointing, SDPA attention where the stack uses transformers',
fused AdamW at a constant learning rate.
Each builder imports its own libraries: liger and unsloth patch transformers for the whole process, and unsloth
must be imported before it, so nothing here imports transformers at the top.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ISOLATED = ("liger", "unsloth")  # patch libraries globally: each runs in a process of its own


def expert_parameters(config) -> list[str] | None:
    """A mixture of experts' fused expert parameters as peft's `target_parameters` (transformers 5 holds Qwen3-MoE's
    experts as 3-D parameters, not Linears; bitsandbytes leaves them in bf16)."""
    return ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if getattr(config, "num_experts", 0) else None


def packed_positions(batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """Position ids of rows packed with examples of 64-1024 tokens (the last one cut to fit), restarting at 0."""
    pos = torch.empty((batch, seq), dtype=torch.long)
    for r in range(batch):
        t = 0
        while t < seq:
            n = min(int(torch.randint(64, 1025, (1,), generator=g)), seq - t)
            pos[r, t:t + n] = torch.arange(n)
            t += n
    return pos


def parse_stack(name: str) -> tuple[str, list[str], bool]:
    """'ours[a=b,c=d]@packed' -> ('ours', ['a=b', 'c=d'], True)."""
    m = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?(@packed)?", name)
    if not m or m.group(1) not in ("hf-doc", "hf-lean", "liger", "unsloth", "ours"):
        raise SystemExit(f"unknown stack {name!r}: hf-doc, hf-lean, liger, unsloth, ours, ours[key=value,...], "
                         "each optionally with @packed")
    return m.group(1), [o for o in (m.group(2) or "").split(",") if o], bool(m.group(3))


def _hf_loss(model, autocast: bool):
    def loss_of(ids, position_ids=None):
        labels = ids if position_ids is None else ids.masked_fill(position_ids == 0, -100)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=ids, labels=labels, position_ids=position_ids, use_cache=False).loss
    return loss_of


def hf_stack(model_dir: Path, lean: bool, rank: int, liger: bool = False):
    if liger:
        import liger_kernel.transformers as lk

        model_type = __import__("json").loads((model_dir / "config.json").read_text())["model_type"]
        getattr(lk, f"apply_liger_kernel_to_{model_type}")(rope=True, rms_norm=True, swiglu=True,
                                                           cross_entropy=False, fused_linear_cross_entropy=True)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    ckpt = {"use_reentrant": False}
    if lean:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=ckpt)
    model.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS,
                                             target_parameters=expert_parameters(model.config),
                                             task_type="CAUSAL_LM"), autocast_adapter_dtype=not lean)
    params = [p for p in model.parameters() if p.requires_grad]
    if lean:
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    return model, opt, _hf_loss(model, autocast=not lean)


def unsloth_stack(model_dir: Path, rank: int, max_seq: int):
    import unsloth  # noqa: F401  (must come before transformers)
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=max_seq,
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    return model, opt, _hf_loss(model, autocast=False)


def our_stack(model_dir: Path, rank: int, overrides: list[str], base_kind: str):
    from finetune.kernels import install_fast_path
    from finetune.model import attach_lora, load_base
    from finetune.recipe import apply_overrides, recipe_from_dict
    from finetune.train.loss import causal_lm_loss, fusable_head
    from finetune.train.optim import build_optimizer

    data = {"base": {"model": str(model_dir), "quantization": base_kind, "compute_dtype": "bfloat16",
                     "attn_implementation": "sdpa"},
            "lora": {"r": rank, "alpha": rank, "dropout": 0.0, "target_modules": "all-linear"},
            "data": {"train": str(model_dir / "config.json")},
            "train": {"max_steps": 1, "learning_rate": 1e-4, "lr_scheduler": "constant",
                      "gradient_checkpointing": True}}
    recipe = recipe_from_dict(apply_overrides(data, overrides))
    loaded = load_base(recipe.base, torch.device("cuda"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, recipe.lora, recipe.train.gradient_checkpointing)
    report = install_fast_path(model, recipe.train)
    print(f"  fast path: {report.summary()}", flush=True)
    opt = build_optimizer(model.parameters(), recipe.train, torch.device("cuda"))
    head = fusable_head(model, sharded=False)[0] if recipe.train.fused_cross_entropy else None
    autocast = torch.bfloat16 if recipe.train.autocast else None

    def loss_of(ids, position_ids=None):
        batch = {"input_ids": ids, "labels": ids}
        if position_ids is not None:
            batch = {"input_ids": ids, "labels": ids.masked_fill(position_ids == 0, -100),
                     "position_ids": position_ids}
        s, n = causal_lm_loss(model, batch, head, autocast)
        return s / n

    return model, opt, loss_of


def build(name: str, dirs: dict, rank: int, max_seq: int):
    kind, overrides, _ = parse_stack(name)
    if kind in ("hf-doc", "hf-lean", "liger"):
        return hf_stack(dirs["bf16"], kind != "hf-doc", rank, liger=kind == "liger")
    if kind == "unsloth":
        return unsloth_stack(dirs["bf16"], rank, max_seq)
    from quant.formats.registry import DEFAULT_BASE, base_format

    base = next((o.split("=", 1)[1] for o in overrides if o.startswith("base.quantization=")), DEFAULT_BASE)
    return our_stack(dirs["quantized" if base_format(base).stored_quantized else "bf16"], rank, overrides, base)


def release() -> None:
    """Drop buffers our kernels keep between calls, so the next stack's peak starts from nothing of ours."""
    from quant.formats.bnb_lib import _SCRATCH

    _SCRATCH.clear()

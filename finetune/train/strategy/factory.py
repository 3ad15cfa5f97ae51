"""The one place that reads accelerate's distributed type: it sets accelerate up and picks the engine's
strategy once; everything after asks the strategy object, never the type."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from finetune.train.strategy.base import Strategy
from finetune.train.strategy.ddp import DDP
from finetune.train.strategy.deepspeed import DeepSpeed
from finetune.train.strategy.fsdp import FSDP
from finetune.train.strategy.single import Single
from quant.errors import UserError

# accelerate falls back to plain data parallelism without a word; a sharded run that silently is not sharded
# would only show up as running out of memory.
_ASKED = {"DEEPSPEED": "ACCELERATE_USE_CPU=true turns DeepSpeed off; unset it",
          "FSDP": "accelerate runs FSDP on GPUs only; on CPU use ddp.yaml, zero2.yaml or zero3.yaml"}


def _asked(engine: str) -> bool:
    return os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"


def create_strategy() -> Strategy:
    """Set accelerate up from the environment `accelerate launch` gives (none: one process) and return the
    strategy for the engine it chose; an engine asked for but not set up, or one we do not train with, is
    refused in one line."""
    # Every buffer here is a frozen constant (rotary tables; a GPTQ base's packed weights), so DDP's
    # per-forward buffer broadcast would only move the GPTQ base around. LoRA uses all its parameters.
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=False)]
    cpu = not torch.cuda.is_available()
    if cpu and _asked("DEEPSPEED"):
        # accelerate turns DeepSpeed on only when not on CPU; DeepSpeed's CPU accelerator runs over gloo.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        cpu = False
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=handlers)
    kind = accelerator.distributed_type.value
    for engine, hint in _ASKED.items():
        if _asked(engine) and kind != engine:
            raise UserError(f"the accelerate config asks for {engine} but accelerate set up {kind} ({hint})")
    if kind == "NO":
        return Single(accelerator)
    if kind == "DEEPSPEED":
        return DeepSpeed(accelerator)
    if kind == "FSDP":
        return FSDP(accelerator)
    if kind.startswith("MULTI_"):  # torch DDP over the device's backend (nccl, gloo, xccl, ...)
        return DDP(accelerator, kind)
    raise UserError(f"accelerate set up {kind}; finetune trains in one process or with DDP (MULTI_GPU, "
                    "MULTI_CPU), DeepSpeed or FSDP (recipes/accelerate/)")

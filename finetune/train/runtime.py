"""The process's place in a (possibly multi-process) run, through accelerate.

The loop talks to this small surface instead of to accelerate directly, so the loop reads the same for
one CPU process, one GPU, DDP, DeepSpeed ZeRO-2/3 or FSDP2 ranks. What differs between them lives here:

- DDP (and accelerate's MULTI_CPU/gloo): replicated model; gradients averaged by an all-reduce.
- DeepSpeed: the engine owns accumulation boundaries, clipping, the optimizer step and the (sharded)
  optimizer state; our LR scheduler stays outside it and steps the same param groups.
- ZeRO-3 and FSDP2 shard the parameters themselves: every forward is a collective, the adapter must be
  gathered before it is saved, and 4-bit weights must be stored in a float dtype to be shardable.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.train import checkpoint as ckpt
from finetune.train.diskspace import disk_space_guard, tensor_bytes
from finetune.train.guard import finite_norm
from finetune.train.state_io import StateFormatError, WeightsOnlyEngine
from quant.errors import UserError
from quant.formats.base import MIXED_PRECISION, BaseSpec, ShardingSetup
from quant.formats.registry import sharding_problem


def fill_deepspeed_config(config: dict, cfg, world_size: int) -> None:
    """Put the recipe's batch shape and clipping (`cfg`: TrainConfig) into a DeepSpeed config, in place.

    The recipe decides; a DeepSpeed config that says otherwise is refused rather than silently obeyed.
    """
    want = {
        "train_micro_batch_size_per_gpu": (cfg.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (cfg.gradient_accumulation, "train.gradient_accumulation"),
        "train_batch_size": (cfg.micro_batch_size * cfg.gradient_accumulation * world_size,
                             "micro_batch_size x gradient_accumulation x processes"),
        "gradient_clipping": (float(cfg.max_grad_norm), "train.max_grad_norm"),
    }
    for key, (value, source) in want.items():
        have = config.get(key, "auto")
        # accelerate writes gradient_accumulation_steps: 1 into a JSON config that lacks it: not a choice.
        default = key == "gradient_accumulation_steps" and have == 1
        if have not in ("auto", None) and float(have) != value and not default:
            raise UserError(f"DeepSpeed config: {key} = {have} but the recipe gives {value} ({source}); "
                            f"set {key} to \"auto\" so the recipe decides")
        config[key] = value


@dataclass
class Runtime:
    accelerator: object
    device: torch.device
    rank: int
    world_size: int
    distributed_type: str = "NO"  # accelerate's DistributedType value: NO, MULTI_CPU, MULTI_GPU, DEEPSPEED, FSDP
    zero_stage: int = 0
    engine: object = None  # the DeepSpeed engine, once prepared

    @classmethod
    def create(cls) -> "Runtime":
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        # Every buffer here is a frozen constant (rotary tables; a GPTQ base's packed weights), so DDP's
        # per-forward buffer broadcast would only move the GPTQ base around. LoRA uses all its parameters.
        handlers = [DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=False)]
        cpu = not torch.cuda.is_available()
        if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            # accelerate turns DeepSpeed on only when not on CPU; DeepSpeed's CPU accelerator runs over gloo.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
            cpu = False
        acc = Accelerator(cpu=cpu, kwargs_handlers=handlers)
        kind = acc.distributed_type.value
        # accelerate falls back to plain data parallelism without a word; a sharded run that silently is not
        # sharded would only show up as running out of memory.
        hints = {"DEEPSPEED": "ACCELERATE_USE_CPU=true turns DeepSpeed off; unset it",
                 "FSDP": "accelerate runs FSDP on GPUs only; on CPU use ddp.yaml, zero2.yaml or zero3.yaml"}
        for asked, hint in hints.items():
            if os.environ.get(f"ACCELERATE_USE_{asked}", "false").lower() == "true" and kind != asked:
                raise UserError(f"the accelerate config asks for {asked} but accelerate set up {kind} ({hint})")
        stage = int(acc.state.deepspeed_plugin.zero_stage) if kind == "DEEPSPEED" else 0
        return cls(acc, acc.device, acc.process_index, acc.num_processes, kind, stage)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3/FSDP: each rank holds a slice of every parameter; forwards gather them collectively."""
        return ShardingSetup(self.distributed_type, self.zero_stage).shards_parameters

    @property
    def eval_split(self) -> tuple[int, int]:
        """(rank, world size) to split eval batches by. With sharded parameters every forward is a collective,
        so all ranks must run the same forwards: each runs every batch (the loss ratio is unchanged)."""
        return (0, 1) if self.shards_parameters else (self.rank, self.world_size)

    def describe(self) -> str:
        kind = f"DeepSpeed ZeRO-{self.zero_stage}" if self.distributed_type == "DEEPSPEED" else self.distributed_type
        return f"{kind}, {self.world_size} process{'es' if self.world_size > 1 else ''} on {self.device.type}"

    def check_base(self, base_cfg) -> BaseSpec:
        """Resolve the base once (its record: format, settings, local weights) and refuse, before loading any
        weight, one that this distributed setup cannot train (its format says why).

        The main process converts a GGUF base (or fetches a hub one) into the cache before the other ranks look
        for it. Loading itself must not be serialised: ZeRO-3 partitions while it loads.
        """
        from finetune.model import resolve_base

        with self.main_process_first():
            spec = resolve_base(base_cfg, self.device)
        if self.distributed_type in ("DEEPSPEED", "FSDP"):
            problem = sharding_problem(spec, self.sharding_setup())
            if problem:
                raise UserError(problem)
        return spec

    def sharding_setup(self) -> ShardingSetup:
        return ShardingSetup(self.distributed_type, self.zero_stage, self._fsdp_version(), self._mixed_precision())

    def _fsdp_version(self) -> int:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return int(getattr(plugin, "fsdp_version", 1) or 1) if plugin is not None else 0

    def _mixed_precision(self) -> str:
        if self.distributed_type == "DEEPSPEED":
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            for name in MIXED_PRECISION:
                if str(ds.get(name, {}).get("enabled", False)).lower() == "true":
                    return name
            return "no"
        return self.accelerator.mixed_precision

    def main_process_first(self):
        return self.accelerator.main_process_first() if self.world_size > 1 else contextlib.nullcontext()

    def seed_everything(self, seed: int) -> None:
        # Same seed on every rank: LoRA init must match across ranks; data order is sharded, not reseeded.
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)

    def prepare(self, model, optimizer, cfg):
        """Wrap for the distributed setup; `cfg` (TrainConfig) fills DeepSpeed's batch/clipping settings."""
        if self.distributed_type == "NO":
            return model, optimizer  # nothing to wrap; keeps the peft model's own type for save/load
        if self.distributed_type == "DEEPSPEED":
            fill_deepspeed_config(self.accelerator.state.deepspeed_plugin.deepspeed_config, cfg, self.world_size)
        elif self.distributed_type in ("MULTI_GPU", "MULTI_CPU"):
            # Frozen weights are identical on every rank (same file, deterministic quantization): skip DDP's
            # start-up broadcast of the whole base; only the trainable LoRA weights are synced and reduced.
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in model.named_buffers()]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        # The LR scheduler is not prepared: it steps our own optimizer's param groups, which DeepSpeed's
        # ZeRO optimizer and accelerate's wrapper both use, so it behaves the same under every setup.
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.distributed_type == "DEEPSPEED":
            self.engine = model
        return model, optimizer

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model) if self.distributed_type != "NO" else model

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def no_sync(self, model, last: bool):
        """Skip the gradient reduction on all but the last micro-batch of a step (DeepSpeed: mark the boundary)."""
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last)
            return contextlib.nullcontext()
        if self.world_size == 1 or last or self.distributed_type == "FSDP":
            # FSDP2 reduce-scatters every micro-batch: LoRA gradients are small, and skipping would need
            # unsharded gradient buffers per rank.
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            # The loss is already normalised by the label tokens of the whole global batch.
            self.engine.backward(loss, scale_wrt_gas=False)
        elif self.distributed_type == "NO":
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def step(self, model, optimizer, scheduler, max_grad_norm: float) -> float:
        """Clip, step the optimizer and the LR schedule, zero the gradients; return the pre-clip grad norm."""
        if self.engine is not None:
            self.engine.step()  # clips to gradient_clipping (= max_grad_norm), steps, zeroes
            norm = finite_norm(self.engine.get_global_grad_norm())
        else:
            # Checked before stepping: a NaN/inf gradient would be written into every LoRA weight.
            norm = finite_norm(self._clip_grad_norm(model, max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return norm if norm is not None else float("nan")

    def _clip_grad_norm(self, model, max_norm: float):
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return 0.0
        limit = max_norm if max_norm > 0 else float("inf")
        if self.distributed_type == "NO":
            return torch.nn.utils.clip_grad_norm_(params, limit)
        return self.accelerator.clip_grad_norm_(params, limit)

    def full_adapter_state(self, model) -> dict | None:
        """Full LoRA tensors (CPU) where parameters are sharded, else None (the model's own tensors are
        whole). A collective under ZeRO-3/FSDP: every rank must call it."""
        if not self.shards_parameters:
            return None
        inner = self.unwrap(model)
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        if self.distributed_type == "DEEPSPEED":
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {n: p.detach().cpu().clone() for n, p in named}
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for n, p in named}

    def save_checkpoint(self, out_dir: Path, model, optimizer, scheduler, state, keep: int,
                        recipe_text: str | None = None) -> None:
        """Write `checkpoint-<step>` all or nothing; every rank calls this (ranks write their own shards).

        A checkpoint that already exists under that name (the one this run resumed from) is complete and is
        never written again."""
        final = Path(out_dir) / f"checkpoint-{state.step}"
        if self.from_main(int(final.is_dir())):
            if self.is_main:
                ckpt.prune_checkpoints(Path(out_dir), keep)
            self.barrier()
            return
        adapter = self.full_adapter_state(model)
        optimizer_state = self._full_optimizer_state(model, optimizer)
        trainable = [p for p in self.unwrap(model).parameters() if p.requires_grad]
        needed = 3 * tensor_bytes(trainable) + 2**16  # adapter + two Adam moments + small files
        with disk_space_guard(final, needed):
            seal = lambda tmp: ckpt.write_manifest(tmp, state.step)  # noqa: E731
            with ckpt.shared_atomic_dir(final, self.is_main, self.barrier, seal=seal) as tmp:
                ckpt.write_rng(tmp, self.rank, self.world_size)
                if self.engine is not None:
                    # ZeRO partitions the optimizer state (and master weights) per rank; DeepSpeed writes each
                    # part with torch.save, and load_checkpoint reads them back weights-only.
                    self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False,
                                                exclude_frozen_parameters=True)
                if self.is_main:
                    ckpt.write_state_files(tmp, self.unwrap(model), optimizer_state, scheduler, state, adapter,
                                           recipe_text)
            if self.is_main:
                ckpt.prune_checkpoints(Path(out_dir), keep)
        self.barrier()

    def _full_optimizer_state(self, model, optimizer) -> dict | None:
        if self.engine is not None:
            return None
        if self.distributed_type == "FSDP":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            # LoRA optimizer state is small: gather it whole, so the file is the same as without sharding.
            return get_optimizer_state_dict(model, optimizer.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def load_checkpoint(self, path: Path, model, optimizer, scheduler):
        """Restore everything `save_checkpoint` wrote into this rank; refuses a different world size."""
        ckpt.check_world_size(path, self.world_size)
        if self.engine is not None:
            # Restores the LoRA weights (fp32 masters included) and the per-rank optimizer partitions.
            # DeepSpeed would unpickle its files with weights_only=False; ours reads them as data only.
            inner = self.engine.checkpoint_engine
            self.engine.checkpoint_engine = WeightsOnlyEngine(inner)
            try:
                loaded, _ = self.engine.load_checkpoint(str(Path(path) / "deepspeed"), tag="state",
                                                        load_module_strict=False, load_lr_scheduler_states=False)
            except StateFormatError as e:
                raise UserError(f"{path}/deepspeed: {e}") from None
            finally:
                self.engine.checkpoint_engine = inner
            if loaded is None:
                raise UserError(f"{path}: DeepSpeed found no state to load in {path}/deepspeed")
            return ckpt.load_checkpoint(path, None, None, scheduler, self.rank)
        if self.distributed_type == "FSDP":
            return self._load_fsdp(path, model, optimizer, scheduler)
        return ckpt.load_checkpoint(path, self.unwrap(model), optimizer, scheduler, self.rank)

    def _load_fsdp(self, path: Path, model, optimizer, scheduler):
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        # The adapter file holds peft's names (no adapter name); map them onto this model's parameter names.
        weights = load_file(str(Path(path) / "adapter" / "adapter_model.safetensors"))
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        full = {}
        for name in names:
            key = name.replace(".default.", ".")
            if key not in weights:
                raise UserError(f"{path}/adapter: no tensor for {name}")
            full[name] = weights[key]
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, full, options=options)
        optim = ckpt.load_optimizer_state(Path(path))
        set_optimizer_state_dict(model, optimizer.optimizer, optim_state_dict=optim, options=options)
        return ckpt.load_checkpoint(path, None, None, scheduler, self.rank)

    def sum_across(self, value: float, count: int) -> tuple[float, int]:
        """Sum a (float, int) pair over ranks; exact for the int."""
        if self.world_size == 1:
            return value, count
        t = torch.tensor([float(value), float(count)], dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="sum")
        return float(t[0]), int(round(float(t[1])))

    def from_main(self, value: int) -> int:
        """The main process's `value` on every rank (a collective: every rank must call it)."""
        return self.sum_across(0.0, value if self.is_main else 0)[1]

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_mb(self) -> float:
        """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024

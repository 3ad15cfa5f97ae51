"""FSDP2: every parameter is sharded across the ranks (the frozen 4-bit base too, stored in a float dtype), so
every forward is a collective, and the adapter and the optimizer state are gathered whole before they are
saved (LoRA's are small) so that a checkpoint is the same files as without sharding."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from finetune.train import checkpoint as ckpt
from finetune.train.strategy.base import Strategy
from quant.errors import UserError
from quant.formats.base import ShardingSetup


class FSDP(Strategy):
    kind = "FSDP"
    shards_parameters = True

    def sharding_setup(self) -> ShardingSetup:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        version = int(getattr(plugin, "fsdp_version", 1) or 1) if plugin is not None else 0
        return ShardingSetup(self.kind, fsdp_version=version, mixed_precision=self.accelerator.mixed_precision)

    def full_adapter_state(self, model) -> dict | None:
        named = [(n, p) for n, p in self.unwrap(model).named_parameters() if p.requires_grad]
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for n, p in named}

    def full_optimizer_state(self, model, optimizer) -> dict | None:
        return get_optimizer_state_dict(model, optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load(self, path: Path, model, optimizer, scheduler) -> ckpt.TrainState:
        # The adapter file holds peft's names (no adapter name); map them onto this model's parameter names.
        weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
        full = {}
        for name in [n for n, p in model.named_parameters() if p.requires_grad]:
            key = name.replace(".default.", ".")
            if key not in weights:
                raise UserError(f"{path}/adapter: no tensor for {name}")
            full[name] = weights[key]
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, full, options=options)
        optim = ckpt.load_optimizer_state(path)
        set_optimizer_state_dict(model, optimizer.optimizer, optim_state_dict=optim, options=options)
        return ckpt.load_checkpoint(path, None, None, scheduler, self.rank)

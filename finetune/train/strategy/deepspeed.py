"""DeepSpeed ZeRO 0-3: the engine owns accumulation boundaries, clipping, the optimizer step and the optimizer
state, partitioned per rank (ZeRO-3 partitions the parameters too); our LR scheduler stays outside it.

`deepspeed` itself is imported only where ZeRO-3 gathers the adapter (finetune.train.optional): it is an
optional package, and accelerate has already imported it whenever this engine runs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from finetune.train import checkpoint as ckpt
from finetune.train.guard import finite_norm
from finetune.train.optional import deepspeed
from finetune.train.state_io import StateFormatError, WeightsOnlyEngine
from finetune.train.strategy.base import Strategy
from quant.errors import UserError
from quant.formats.base import MIXED_PRECISION, ShardingSetup


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


class DeepSpeed(Strategy):
    kind = "DEEPSPEED"

    def __init__(self, accelerator):
        super().__init__(accelerator)
        self.zero_stage = int(accelerator.state.deepspeed_plugin.zero_stage)
        self.shards_parameters = self.zero_stage == 3
        self.engine = None  # the DeepSpeed engine, once prepared

    @property
    def config(self) -> dict:
        """The DeepSpeed config accelerate holds (and hands the engine when it prepares)."""
        return self.accelerator.state.deepspeed_plugin.deepspeed_config

    @property
    def title(self) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage}"

    def sharding_setup(self) -> ShardingSetup:
        precision = next((name for name in MIXED_PRECISION
                          if str(self.config.get(name, {}).get("enabled", False)).lower() == "true"), "no")
        return ShardingSetup(self.kind, self.zero_stage, mixed_precision=precision)

    def prepare(self, model, optimizer, cfg):
        fill_deepspeed_config(self.config, cfg, self.world_size)
        self.engine, optimizer = super().prepare(model, optimizer, cfg)
        return self.engine, optimizer

    def no_sync(self, model, last: bool):
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already normalised by the label tokens of the whole global batch.
        self.engine.backward(loss, scale_wrt_gas=False)

    def _apply(self, model, optimizer, max_grad_norm: float) -> float | None:
        self.engine.step()  # clips to gradient_clipping (= max_grad_norm), steps, zeroes
        return finite_norm(self.engine.get_global_grad_norm())

    def full_adapter_state(self, model) -> dict | None:
        if not self.shards_parameters:
            return None
        named = [(n, p) for n, p in self.unwrap(model).named_parameters() if p.requires_grad]
        with deepspeed().zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named}

    def full_optimizer_state(self, model, optimizer) -> dict | None:
        return None  # partitioned: each rank writes its own part (_save_rank_state)

    def _save_rank_state(self, tmp: Path) -> None:
        # ZeRO partitions the optimizer state (and master weights) per rank; DeepSpeed writes each part with
        # torch.save, and _load reads them back weights-only.
        self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=True)

    def _load(self, path: Path, model, optimizer, scheduler) -> ckpt.TrainState:
        # Restores the LoRA weights (fp32 masters included) and the per-rank optimizer partitions.
        # DeepSpeed would unpickle its files with weights_only=False; ours reads them as data only.
        inner = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = WeightsOnlyEngine(inner)
        try:
            loaded, _ = self.engine.load_checkpoint(str(path / "deepspeed"), tag="state",
                                                    load_module_strict=False, load_lr_scheduler_states=False)
        except StateFormatError as e:
            raise UserError(f"{path}/deepspeed: {e}") from None
        finally:
            self.engine.checkpoint_engine = inner
        if loaded is None:
            raise UserError(f"{path}: DeepSpeed found no state to load in {path}/deepspeed")
        return ckpt.load_checkpoint(path, None, None, scheduler, self.rank)

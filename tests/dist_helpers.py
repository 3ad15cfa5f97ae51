"""Run under `torchrun --nproc_per_node 2`: our FSDP2 code paths on CPU/gloo, where accelerate will not shard.

accelerate sets up FSDP only on GPUs, so this script shards the model the way accelerate's FSDP2 prepare
does (`fully_shard` on every decoder layer, then the root) and drives finetune's FSDP strategy as the run does:
backward/step, gathering the adapter, and a checkpoint saved and loaded into a freshly sharded model.
Everything else is real: FSDP2 over gloo, bitsandbytes NF4 stored as float32, peft LoRA.

    torchrun --standalone --nproc_per_node 2 tests/dist_helpers.py MODEL_DIR OUT_DIR
Rank 0 writes OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def build(model_dir: str, shard: bool, mesh=None):
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_quant_storage=torch.float32, bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": "cpu"},
                                                 dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)  # same LoRA init on every rank and in the reference
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    if shard:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def main(model_dir: str, out_dir: str) -> None:
    from accelerate import Accelerator
    from torch.distributed.device_mesh import init_device_mesh

    from finetune.recipe import TrainConfig
    from finetune.train.checkpoint import TrainState
    from finetune.train.optim import build_optimizer, build_scheduler
    from finetune.train.strategy.fsdp import FSDP

    acc = Accelerator(cpu=True)
    rt = FSDP(acc)
    mesh = init_device_mesh("cpu", (rt.world_size,))
    cfg = TrainConfig(max_steps=3, learning_rate=1e-2, lr_scheduler="constant", max_grad_norm=1.0)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))

    def trained(shard: bool):
        model = build(model_dir, shard, mesh)
        optimizer = build_optimizer(model.parameters(), cfg, rt.device)
        scheduler = build_scheduler(optimizer, cfg, 3)
        if shard:
            optimizer = acc.prepare_optimizer(optimizer)
        norms = []
        for _ in range(3):  # every rank feeds the same batch: the averaged gradient is the one-process gradient
            loss = model(input_ids=ids, labels=ids).loss
            if shard:
                rt.backward(loss)
                norms.append(rt.step(model, optimizer, scheduler, cfg.max_grad_norm))
            else:
                loss.backward()
                norms.append(float(torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)))
                optimizer.step()
                optimizer.zero_grad()
                scheduler.step()
        return model, optimizer, scheduler, norms

    sharded, optimizer, scheduler, norms = trained(shard=True)
    plain, _, _, plain_norms = trained(shard=False)
    gathered = rt.full_adapter_state(sharded)
    reference = {n: p.detach() for n, p in plain.named_parameters() if p.requires_grad}
    train_diff = max(float((gathered[n] - reference[n]).abs().max()) for n in reference)

    out = Path(out_dir)
    rt.save_checkpoint(out, sharded, optimizer, scheduler, TrainState(step=3, world_size=rt.world_size), keep=2)
    fresh = build(model_dir, True, mesh)
    fresh_opt = acc.prepare_optimizer(build_optimizer(fresh.parameters(), cfg, rt.device))
    fresh_sched = build_scheduler(fresh_opt, cfg, 3)
    state = rt.load_checkpoint(out / "checkpoint-3", fresh, fresh_opt, fresh_sched)
    restored = rt.full_adapter_state(fresh)
    load_diff = max(float((restored[n] - gathered[n]).abs().max()) for n in gathered)
    before = rt.full_optimizer_state(sharded, optimizer)  # gathered whole on rank 0 only
    after = rt.full_optimizer_state(fresh, fresh_opt)
    if rt.is_main:
        before, after = before["state"], after["state"]
        optim_diff = max(float((before[k][s] - after[k][s]).abs().max())
                         for k in before for s in ("exp_avg", "exp_avg_sq"))
        (out / "result.json").write_text(json.dumps({
            "world_size": rt.world_size, "train_diff": train_diff, "load_diff": load_diff, "optim_diff": optim_diff,
            "norms": norms, "plain_norms": plain_norms, "step": state.step,
            "sharded_weight": type(sharded.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight).__name__,
            "files": sorted(p.name for p in (out / "checkpoint-3").iterdir())}))
    rt.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])

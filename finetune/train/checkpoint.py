"""Checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically; resume; rotation.

A checkpoint directory is complete exactly when it exists under its final name `checkpoint-<step>`:
everything is written into a hidden temporary directory first (quant.files.staged) and renamed in one step, so
an interrupted save leaves only a `.tmp-` directory, which resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # epoch of the next micro-batch
    batch_offset: int = 0  # micro-batches of `epoch` already consumed (global order, all ranks together)
    tokens_seen: int = 0
    world_size: int = 1


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_state_files(tmp: Path, model, optimizer_state: dict | None, scheduler, state: TrainState,
                      adapter_state: dict | None = None) -> None:
    """The main process's part of a checkpoint. `adapter_state`: full LoRA tensors gathered from sharded
    parameters (ZeRO-3/FSDP), where the model's own tensors are only this rank's shards; `optimizer_state`
    None: the optimizer state is sharded and each rank writes its own part."""
    model.save_pretrained(tmp / "adapter", state_dict=adapter_state)
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))


def rng_file(rank: int, world_size: int) -> str:
    # Each rank draws its own dropout masks, so each rank's generators are saved for an exact resume.
    return "rng.pt" if world_size == 1 else f"rng-{rank}.pt"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not Path(out_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    for stale in Path(out_dir).glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_train_state(path: Path) -> TrainState:
    return TrainState(**json.loads((Path(path) / "trainer_state.json").read_text()))


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> TrainState:
    """Restore adapter weights, optimizer, scheduler and RNG from `path`; return the training position.

    `model`/`optimizer` None: their state lives in per-rank shards that the caller restores itself.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if model is not None:
        adapter = path / "adapter"
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"{adapter}: adapter keys do not match the model: {unexpected[:3]}")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    own = path / f"rng-{rank}.pt"
    set_rng_state(torch.load(own if own.exists() else path / "rng.pt", weights_only=False))
    return read_train_state(path)

"""What `--resume` may change: the stored recipe of a checkpoint against the one given now.

A resumed run must end where the uninterrupted run would have. Each recipe key is one of three kinds:

- `never`: the checkpoint's state or data position means nothing under the new value (the base, the LoRA
  shape, the data and how it is cut into sequences, the seed, the batch geometry, the optimizer): refused.
- `force`: the saved state stays meaningful but the rest of the trajectory changes (learning rate, schedule,
  clipping, step count under a decaying schedule, ...): refused unless `--resume --force`, then applied.
- `free`: no effect on the numbers (logging, eval, checkpoint cadence, tracking, samples): always allowed.

Keys not listed (new recipe fields) count as `force`: a change is allowed only when asked for.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from finetune.recipe import Recipe, TrainConfig
from finetune.recipe_checks import read_yaml
from finetune.train.optim import lr_lambda
from quant.errors import UserError

NEVER = {
    "base.model", "base.quantization", "base.double_quant",
    "lora.r", "lora.target_modules", "lora.merge_target",
    "data.train", "data.eval_fraction", "data.format", "data.max_length", "data.packing", "data.train_on_prompt",
    "data.split", "data.max_examples",
    "train.seed", "train.micro_batch_size", "train.gradient_accumulation", "train.optimizer",
    "preference", "preference.objective",
}
FREE = {
    "base.quant_storage", "data.eval", "output.dir", "description",
    "train.log_every", "train.eval_every", "train.save_every", "train.save_total_limit", "train.eval_max_batches",
    "train.gradient_checkpointing",  # recomputation gives the same numbers (RNG state preserved)
    "preference.reference",  # the same reference log-probs, computed before training or at every step
}
FREE_PREFIXES = ("tracking.", "samples.")
# Changing these is applied to the restored optimizer/scheduler (which would otherwise keep the saved values).
SCHEDULE = {"train.learning_rate", "train.weight_decay", "train.lr_scheduler", "train.warmup_steps",
            "train.max_steps", "train.epochs"}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _same_path(a, b) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def kind(key: str, old: dict, new: dict) -> str:
    if key in NEVER:
        return "never"
    if key in FREE or key.startswith(FREE_PREFIXES):
        return "free"
    if key in ("train.max_steps", "train.epochs") and old.get("train.lr_scheduler") == "constant" == new.get(
            "train.lr_scheduler"):
        return "free"  # a constant schedule does not depend on the run's length
    return "force"


def changes(stored: dict, current: dict) -> list[tuple[str, object, object, str]]:
    """(key, stored value, current value, kind) for every key whose value differs."""
    old, new = flatten(stored), flatten(current)
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or _same_path(a, b):
            continue
        found.append((key, a, b, kind(key, old, new)))
    return found


def _describe(found) -> str:
    return ", ".join(f"{key} {_short(a)} -> {_short(b)}" for key, a, b, _ in found)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def stored_recipe(checkpoint: Path) -> dict | None:
    path = Path(checkpoint) / "recipe.yaml"
    if not path.is_file():
        return None
    data = read_yaml(path, "a checkpoint's recipe")  # bounded in size and alias expansion
    return data if isinstance(data, dict) else None


def check_changes(checkpoint: Path, recipe: Recipe, force: bool, warn) -> list[str]:
    """Refuse recipe changes --resume cannot honour; return the keys changed under --force."""
    stored = stored_recipe(checkpoint)
    if stored is None:
        warn(f"--resume: {checkpoint.name} holds no recipe.yaml; cannot check that the recipe is unchanged")
        return []
    found = changes(stored, recipe.to_dict())
    never = [c for c in found if c[3] == "never"]
    forced = [c for c in found if c[3] == "force"]
    if never:
        raise UserError(f"--resume: {checkpoint.name} was trained with other values of keys that decide what "
                        f"it already learned: {_describe(never)}; resume with the stored values "
                        f"({checkpoint / 'recipe.yaml'}) or start a new run in another output.dir")
    if forced and not force:
        raise UserError(f"--resume: changed since {checkpoint.name}: {_describe(forced)}; the rest of the run "
                        f"would differ from the run that was interrupted; pass --force to resume with them")
    if forced:
        warn(f"--resume --force: continuing {checkpoint.name} with {_describe(forced)}")
    return [c[0] for c in forced]


def reapply_schedule(optimizer, scheduler, cfg: TrainConfig, total_steps: int) -> None:
    """After a forced change of learning rate / schedule / weight decay: a restored optimizer and scheduler
    keep the saved values, so put the recipe's in, at the restored step."""
    fn = lr_lambda(cfg, total_steps)
    scheduler.base_lrs = [cfg.learning_rate for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
        group["lr"] = cfg.learning_rate * fn(scheduler.last_epoch)
        group["weight_decay"] = cfg.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def data_fingerprint(sequences) -> str:
    """sha256 over every training example's tokens, in order: SFT's tokens, labels and positions; a preference
    example's prompt, answers, KTO label and mismatched completion."""
    h = hashlib.sha256()
    for ex in sequences:
        for key in ("input_ids", "labels", "position_ids", "prompt", "answers", "kl_answer", "desirable"):
            value = ex.get(key)
            if value is None:
                continue
            h.update(key.encode())
            for part in value if key == "answers" else [value]:
                if key == "answers":  # each answer's length: the same tokens cut elsewhere are other answers
                    h.update(len(part).to_bytes(8, "little"))
                h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def check_data(checkpoint: Path, saved: str, now: str) -> None:
    if saved and saved != now:
        raise UserError(f"--resume: the training sequences differ from those {checkpoint.name} was trained on "
                        "(data.train's file changed, or the tokenizer did); resume with the same data, or "
                        "start a new run in another output.dir")

"""A run never ends "successfully" with NaN: a non-finite loss, gradient norm or adapter weight stops it.

The loss and gradient norm are checked every step before the optimizer applies them, so the newest
checkpoint (written only from finite weights) is the last good state; the message names the step, the value
and the recipe key most likely responsible.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from finetune.recipe import Recipe
from finetune.train.checkpoint import list_checkpoints
from quant.errors import UserError


class NonFiniteGradient(ArithmeticError):
    """The gradient norm of a step is NaN or infinite; raised before the optimizer applies it (DeepSpeed: after,
    since its engine clips and steps in one call)."""

    def __init__(self, norm: float):
        super().__init__(f"gradient norm {norm}")
        self.norm = norm


def finite_norm(norm) -> float | None:
    """A gradient norm (tensor, DTensor or number; None where unknown) as a float; NonFiniteGradient if NaN/inf."""
    if norm is None:
        return None
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not math.isfinite(norm):
        raise NonFiniteGradient(norm)
    return norm


def likely_cause(recipe: Recipe) -> str:
    t, lora, base = recipe.train, recipe.lora, recipe.base
    if t.learning_rate > 1e-3:
        return f"train.learning_rate = {t.learning_rate:g} is high for LoRA (1e-5 to 5e-4 is usual)"
    if base.compute_dtype == "float16":
        return "base.compute_dtype = float16 overflows easily; use bfloat16 or float32"
    if lora.alpha / lora.r > 16:
        return f"lora.alpha / lora.r = {lora.alpha / lora.r:g} scales the adapter very strongly"
    if t.max_grad_norm == 0:
        return "train.max_grad_norm = 0 turns clipping off; set it to 1.0"
    return f"train.learning_rate = {t.learning_rate:g} (try a lower one) or the data (a degenerate row)"


def stop(recipe: Recipe, out_dir: Path, step: int, what: str, value: float) -> UserError:
    done = list_checkpoints(out_dir)
    kept = f"{done[-1].name} is the last good checkpoint" if done else "no checkpoint was written"
    return UserError(f"step {step}: {what} is {value} (not finite); stopped without saving ({kept}); "
                     f"likely cause: {likely_cause(recipe)}")


def check_loss(recipe: Recipe, out_dir: Path, step: int, loss: float) -> None:
    if not math.isfinite(loss):
        raise stop(recipe, out_dir, step, "the training loss", loss)


def check_weights(recipe: Recipe, out_dir: Path, step: int, model) -> None:
    """Before anything is saved: every trainable weight finite (this rank's shard, where sharded)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if p.requires_grad and not bool(torch.isfinite(local).all()):
                raise stop(recipe, out_dir, step, f"adapter weight {name}", float("nan"))

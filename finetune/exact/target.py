"""`lora.merge_target`: the quantized format an adapter is trained to merge into exactly, checked against the base.

Built: the zero-point route (finetune.exact.lora) for `gptq` on a GPTQ base with an asymmetric grid and for `awq`
on an AWQ base (with zero points), merged into the base's own format. Every other pair is refused in one line
before anything loads: a target other than the base's own format would have to requantize (what the plain merge
does), and a symmetric GPTQ grid has no zero points to carry an update (readers fix them at 2^(b-1)).

The adapter's record is the run's recipe (its `lora.merge_target`, saved with the final adapter and with every
checkpoint's run) together with base.json (the grid: format, bits, group size, symmetry); `target_of` reads it back.
"""

from __future__ import annotations

from pathlib import Path

from finetune.recipe_checks import read_yaml
from quant.errors import UserError
from quant.formats.base import BaseSpec

NONE = "none"
TARGETS = (NONE, "gptq", "awq")  # the values lora.merge_target takes
BUILT = "gptq on an asymmetric GPTQ base (sym: false), awq on an AWQ base"


def check(merge_target: str, spec: BaseSpec) -> None:
    """Refuse, in one line naming the key, a base/target pair whose merge this version cannot make exact."""
    if merge_target == NONE:
        return
    where = f"lora.merge_target = {merge_target!r}"
    if spec.format != merge_target:
        raise UserError(f"{where}: the exact merge keeps the base's integer weights and scales, so the target must "
                        f"be the base's own format, and this base is {spec.format}; exact targets: {BUILT}")
    if spec.format == "gptq" and spec.settings.get("sym", True):
        raise UserError(f"{where}: the base's GPTQ grid is symmetric (sym: true), whose zero points readers fix at "
                        f"2^(bits-1), so no update can be folded into them; exact targets: {BUILT}")
    if spec.format == "awq" and not spec.settings.get("zero_point", True):
        raise UserError(f"{where}: the AWQ base has no zero points (zero_point: false) to fold an update into; "
                        f"exact targets: {BUILT}")


def check_layers(model, merge_target: str) -> None:
    """Every adapted layer of `model` (a peft model) carries a zero-point adapter: a LoRA on a layer stored in
    float would merge by rounding, not exactly."""
    from finetune.exact.lora import ZeroPointLoraLinear
    from peft.tuners.lora.layer import LoraLayer

    other = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, ZeroPointLoraLinear)]
    if other:
        raise UserError(f"lora.merge_target = {merge_target!r}: {len(other)} targeted modules are not {merge_target} "
                        f"quantized layers (e.g. {other[0]}); an exact merge only adapts quantized layers: narrow "
                        "lora.target_modules")


def _recipe_of(adapter_dir: Path) -> Path | None:
    """The run's recipe.yaml: in the final adapter, else in the run directory above a checkpoint's adapter."""
    for p in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent):
        if (p / "recipe.yaml").is_file():
            return p / "recipe.yaml"
    return None


def target_of(adapter_dir: str | Path, recipe: dict | None = None, recipe_path: Path | None = None) -> str:
    """The merge target an adapter was trained for (`recipe`: the run's recipe already read, else found next to
    or above `adapter_dir`); 'none' for a plain adapter. A value this version does not know is refused."""
    if recipe is None:
        recipe_path = _recipe_of(Path(adapter_dir))
        recipe = (read_yaml(recipe_path, "a run's recipe") if recipe_path else None) or {}
    lora = recipe.get("lora") if isinstance(recipe, dict) else None
    value = lora.get("merge_target", NONE) if isinstance(lora, dict) else NONE
    if value not in TARGETS:
        raise UserError(f"{recipe_path or adapter_dir}: lora.merge_target = {value!r} is not one this version "
                        f"builds ({', '.join(TARGETS)})")
    return value

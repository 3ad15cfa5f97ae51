"""`lora.merge_target`: the quantized format an adapter is trained to merge into exactly, checked against the base.

Built, merged into the base's own format (finetune.exact.lora): the zero-point route for `gptq` on a GPTQ base
with an asymmetric grid and for `awq` on an AWQ base with zero points; the code route (merge-aware training
through the merge's own requantization) for `gptq` on a symmetric GPTQ base, whose zero points readers fix.
Every other pair is refused in one line before anything loads: a target other than the base's own format would
have to requantize with a search (what the plain merge does); NF4 and GGUF K-quant targets are not built.

The adapter's record is the run's recipe (its `lora.merge_target`, saved with the final adapter and with every
checkpoint's run) together with base.json (the grid: format, bits, group size, symmetry); `target_of` reads it back.
"""

from __future__ import annotations

from pathlib import Path

from finetune.recipe_checks import read_yaml
from quant.errors import UserError
from quant.formats import registry as formats
from quant.formats.base import BaseSpec

NONE = "none"
TARGETS = (NONE, *formats.exact_targets())  # the values lora.merge_target takes: formats with an exact route
BUILT = "gptq on a GPTQ base, awq on an AWQ base with zero points"


def check(merge_target: str, spec: BaseSpec) -> None:
    """Refuse, in one line naming the key, a base/target pair whose merge this version cannot make exact."""
    if merge_target == NONE:
        return
    where = f"lora.merge_target = {merge_target!r}"
    if spec.format != merge_target:
        raise UserError(f"{where}: the exact merge keeps the base's integer weights and scales, so the target must "
                        f"be the base's own format, and this base is {spec.format}; exact targets: {BUILT}")
    if formats.base_format(spec.format).exact_route(spec.settings) is None:  # an AWQ base without zero points
        raise UserError(f"{where}: the {spec.format} base has no zero points (zero_point: false) to fold an update "
                        f"into; exact targets: {BUILT}")


def route(merge_target: str, quantization_config: dict | None) -> str:
    """'zeros' where the grid has zero points to carry the update (asymmetric GPTQ, AWQ), else 'codes' (the target
    format's Format.exact_route)."""
    q = quantization_config if isinstance(quantization_config, dict) else {}
    return formats.base_format(merge_target).exact_route(q)


def model_route(model, merge_target: str) -> str:
    """The route for a loaded packed model (its config holds the checkpoint's quantization_config)."""
    q = getattr(model.config, "quantization_config", None)
    return route(merge_target, q.to_dict() if hasattr(q, "to_dict") else q)


def check_layers(model, merge_target: str) -> None:
    """Every adapted layer of `model` (a peft model) carries a zero-point adapter: a LoRA on a layer stored in
    float would merge by rounding, not exactly."""
    from finetune.exact.lora import CLASSES
    from peft.tuners.lora.layer import LoraLayer

    exact = tuple(CLASSES.values())
    other = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, exact)]
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

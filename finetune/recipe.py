"""Recipe YAML -> typed `Recipe`, validated once, here.

Every section of the YAML maps one-to-one onto a dataclass below; a field's type annotation is its
schema (`Literal[...]` for choices, `metadata` for ranges, a hint, and a `check` for what a type cannot
say, such as a regex or a path). Every number must be finite. This is the one place where validation
errors are worded: each names the file, the dotted key, the bad value and what is allowed.

Why dataclasses and not pydantic: these are the typed config objects the whole code base passes around
(and builds in tests); the checks pydantic would add (ranges, finiteness, types, the failing location)
are a few declarative lines here, with error wording we control, and no second model of the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

# RecipeError lives with the checks that raise it and is imported from here by the rest of the code.
from finetune.recipe_checks import (DuplicateKey, RecipeError, TooLarge, encodable, parse_yaml,  # noqa: F401
                                    path_or_id, read_yaml, short, target_modules)
from finetune.exact.target import TARGETS as MERGE_TARGETS
from finetune.recipe_preference import PreferenceConfig, check_section, command_objective
from quant.formats.registry import AUTO, base_names

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _range(lo=None, hi=None, lo_open=False, hint=None, check=None):
    """Field metadata: `lo`/`hi` bounds (`lo_open`: exclusive), a `hint` appended to a range error, and a
    `check(value, where, source)` that raises RecipeError for what a type and a range cannot express."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hint": hint, "check": check}


# The training formats of quant.formats.registry; `auto`: as the checkpoint is stored (GPTQ), else NF4.
BaseQuantization = Literal[(AUTO,) + base_names()]


@dataclass
class BaseConfig:
    model: str = field(default="", metadata=_range(check=path_or_id))
    quantization: BaseQuantization = "auto"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # bnb 4-bit storage dtype; "auto" stores in the compute dtype so DeepSpeed/FSDP can shard the packed weights.
    quant_storage: Literal["uint8", "auto", "bfloat16", "float16", "float32"] = "uint8"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"


@dataclass
class LoraConfig:
    r: int = field(default=16, metadata=_range(1, 4096))
    alpha: float = field(default=32, metadata=_range(0, 16384, lo_open=True))
    dropout: float = field(default=0.05, metadata=_range(0, 1))
    target_modules: Union[str, list[str]] = field(default="all-linear", metadata=_range(check=target_modules))
    # The quantized format the adapter is trained to merge into exactly (finetune.exact, docs/exact-merge.md).
    merge_target: Literal[MERGE_TARGETS] = "none"


@dataclass
class DataConfig:
    train: str = field(default="", metadata=_range(check=path_or_id))
    eval: Optional[str] = field(default=None, metadata=_range(check=path_or_id))
    eval_fraction: float = field(default=0.0, metadata=_range(0, 0.9))
    format: Literal["auto", "chat", "sharegpt", "alpaca", "completion", "text"] = "auto"
    max_length: int = field(default=1024, metadata=_range(8, 1 << 20))
    packing: bool = True
    train_on_prompt: bool = False
    # Hub datasets / multi-split files: which split to read.
    split: str = "train"
    max_examples: Optional[int] = field(default=None, metadata=_range(1, 10**12))


@dataclass
class TrainConfig:
    max_steps: Optional[int] = field(default=None, metadata=_range(1, 10**9))
    epochs: Optional[float] = field(default=None, metadata=_range(0, 10**6, lo_open=True))
    micro_batch_size: int = field(default=4, metadata=_range(1, 1 << 20))
    gradient_accumulation: int = field(default=1, metadata=_range(1, 1 << 20))
    # An Adam step moves every weight by about the learning rate: far above 1e-3 a LoRA run only diverges.
    learning_rate: float = field(default=2.0e-4, metadata=_range(
        0, 0.1, lo_open=True, hint="LoRA learning rates are usually 1e-5 to 5e-4"))
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = field(default=0, metadata=_range(0, 10**9))
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    weight_decay: float = field(default=0.0, metadata=_range(0, 10))
    max_grad_norm: float = field(default=1.0, metadata=_range(0, hint="0 turns clipping off"))
    gradient_checkpointing: bool = True
    # Loss computed from the final hidden states in chunks, never holding full-vocabulary logits (same numbers;
    # turned off automatically where it cannot apply: sharded parameters, a trained or non-Linear LM head).
    fused_cross_entropy: bool = True
    # Forward under torch.autocast in the compute dtype: the fp32 LoRA master weights are used in bf16/fp16
    # (no fp32 copies of every adapted layer's input). Off on CPU, where compute is fp32 anyway.
    autocast: bool = True
    # The fast path (finetune/kernels): LoRA + quantized linear fused per projection group (q/k/v, o, the whole
    # MLP), Triton RMSNorm/rotary/SwiGLU with hand-written backward, attention straight to PyTorch's fused
    # kernels (cuDNN; flash varlen for packed rows, no T x T mask). Same numbers up to rounding order; false
    # restores transformers' + peft's modules.
    fused_lora: bool = True
    triton_kernels: bool = True
    fused_attention: bool = True
    # Long context: the MLP in 16k-token tiles, checkpointed layer inputs in pinned host memory. "auto": from 32k
    # tokens per micro-batch (offload in one process only).
    tiled_mlp: Union[bool, Literal["auto"]] = "auto"
    offload_checkpoints: Union[bool, Literal["auto"]] = "auto"
    seed: int = field(default=42, metadata=_range(0, 2**32 - 1))  # numpy's seed range
    log_every: int = field(default=1, metadata=_range(1))
    eval_every: int = field(default=0, metadata=_range(0))
    save_every: int = field(default=0, metadata=_range(0))
    save_total_limit: int = field(default=2, metadata=_range(1))
    # Caps eval cost on large eval sets; None evaluates every eval batch.
    eval_max_batches: Optional[int] = field(default=None, metadata=_range(1))


@dataclass
class OutputConfig:
    dir: str = field(default="runs/default", metadata=_range(check=path_or_id))


@dataclass
class WandbConfig:
    project: Optional[str] = None
    name: Optional[str] = None
    entity: Optional[str] = None
    mode: Literal["online", "offline", "disabled"] = "online"
    dir: Optional[str] = None  # where W&B writes its run files; default: output.dir


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class SamplesConfig:
    """Greedy generations for the first `count` eval prompts, before and after training."""

    count: int = field(default=0, metadata=_range(0, 64))
    max_new_tokens: int = field(default=64, metadata=_range(1, 4096))


@dataclass
class Recipe:
    base: BaseConfig = field(default_factory=BaseConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Preference training (DPO, ORPO, KTO; finetune/recipe_preference.py); absent: SFT.
    preference: Optional[PreferenceConfig] = None
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    # Free text shown in logs: what the recipe is for.
    description: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- building


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _closest_choice(value, tp) -> str:
    """' (did you mean 'sharegpt'?)' for a string close to one of a field's choices, as for keys."""
    choices = [str(c) for arg in (typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,))
               if typing.get_origin(arg) is Literal for c in typing.get_args(arg)]
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value, tp):
    """Return `value` as type `tp`, or raise TypeError. Ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML follows YAML 1.1, where `2e-4` (no dot) is a string; users mean a number.
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _check_value(value, meta, where: str, source: str):
    """What every value must be (finite numbers, strings without NUL or invalid Unicode), then the field's
    own range and check."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, float) and not math.isfinite(item):
            raise RecipeError(f"{source}: {where} = {item!r} is not a finite number")
        if isinstance(item, str) and ("\0" in item or not encodable(item)):
            raise RecipeError(f"{source}: {where} = {short(item)} holds a NUL or an invalid Unicode character")
    if value is None or not meta:
        return
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open")
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        lower = f"> {lo}" if lo_open else f">= {lo}"
        allowed = lower if hi is None else f"{lower} and <= {hi}"
        hint = f"; {meta['hint']}" if meta.get("hint") else ""
        raise RecipeError(f"{source}: {where} = {short(value)} is out of range (must be {allowed}{hint})")
    if meta.get("check"):
        meta["check"](value, where, source)


def _build(cls, data, where: str, source: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where or 'the recipe'} must be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(fields)})"
            raise RecipeError(f"{source}: unknown key {short(full)}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        full = f"{where}.{name}" if where else name
        tp = hints[name]
        section = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)  # Optional[section]
        if dataclasses.is_dataclass(section):
            kwargs[name] = _build(section, data[name] if data[name] is not None else {}, full, source)
            continue
        try:
            value = _coerce(data[name], tp)
        except TypeError:
            raise RecipeError(f"{source}: {full} = {short(data[name])} is not valid "
                              f"(expected {_type_name(tp)}){_closest_choice(data[name], tp)}") from None
        _check_value(value, f.metadata, full, source)
        kwargs[name] = value
    return cls(**kwargs)


def build_section(cls, data: dict | None, key: str, source: str):
    """One section (e.g. `data` of a run's recipe.yaml) typed and validated as load_recipe does, without the
    cross-field checks and files that must exist: a merge may run elsewhere, after the training data moved."""
    return _build(cls, data if data is not None else {}, key, source)


def _check_semantics(recipe: Recipe, source: str) -> None:
    """Cross-field rules and files that must exist; run after the typed build."""
    if not recipe.base.model:
        raise RecipeError(f"{source}: base.model is required (an HF directory, a hub id or a .gguf file)")
    if not recipe.data.train:
        raise RecipeError(f"{source}: data.train is required (a jsonl/json/parquet/csv file or a hub dataset id)")
    t = recipe.train
    if t.max_steps is None and t.epochs is None:
        raise RecipeError(f"{source}: set train.max_steps or train.epochs (both are null)")
    if t.warmup_steps and t.max_steps and t.warmup_steps > t.max_steps:
        raise RecipeError(f"{source}: train.warmup_steps = {t.warmup_steps} exceeds train.max_steps = {t.max_steps}")
    if recipe.data.eval and recipe.data.eval_fraction:
        raise RecipeError(f"{source}: set data.eval or data.eval_fraction, not both")
    for key in ("train", "eval"):
        value = getattr(recipe.data, key)
        if value and _looks_like_path(value) and not value.startswith("pkg:") and not _exists(value):
            raise RecipeError(f"{source}: data.{key} = '{value}': file not found")
    model = recipe.base.model
    if _looks_like_path(model) and not model.startswith("pkg:") and not _exists(model):
        raise RecipeError(f"{source}: base.model = '{model}': path not found")
    if not recipe.output.dir.strip():
        raise RecipeError(f"{source}: output.dir is empty; name the run's directory, e.g. runs/my-run")
    if recipe.preference is not None:
        check_section(recipe.preference, t.micro_batch_size, source)


def _exists(value: str) -> bool:
    try:
        return Path(value).expanduser().exists()
    except (OSError, ValueError, RuntimeError):
        return False


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).suffix in {
        ".json", ".jsonl", ".parquet", ".csv", ".txt", ".gguf", ".md"
    }


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (['train', 'max_steps'], 10); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set '{text}': expected KEY=VALUE, e.g. --set train.max_steps=10")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except (DuplicateKey, TooLarge) as e:
        raise RecipeError(f"--set {short(text)}: {e}") from None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:  # `train:` with nothing under it is an empty section
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise RecipeError(f"--set '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    return data


def _resolve_paths(data: dict, base_dir: Path) -> None:
    """Relative file paths in a recipe are relative to the recipe's own directory, unless they exist from cwd."""
    for section, key in (("data", "train"), ("data", "eval"), ("base", "model")):
        block = data.get(section)
        value = block.get(key) if isinstance(block, dict) else None  # a non-mapping section is refused later
        if isinstance(value, str) and _looks_like_path(value) and not value.startswith(("pkg:", "~", "/")):
            candidate = base_dir / value
            if not _exists(value) and _exists(str(candidate)):
                data[section][key] = str(candidate)


def load_recipe(path: str | Path, overrides: list[str] | None = None, command: str | None = None) -> Recipe:
    """Read, override, build and validate a recipe. Raises RecipeError (one line) on any problem.

    `command`: the `finetune` command that runs it (sft, dpo, orpo, kto; recipe_preference.command_objective)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(f"{source}: recipe file not found")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe must be a mapping with sections base, lora, data, train, output")
    data = apply_overrides(data, overrides or [])
    if command is not None:
        command_objective(data, command, source)
    _resolve_paths(data, path.parent)
    return recipe_from_dict(data, source)


def recipe_from_dict(data: dict, source: str = "<recipe>") -> Recipe:
    recipe = _build(Recipe, data, "", source)
    _check_semantics(recipe, source)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.to_dict()
    if data["preference"] is None:  # an SFT recipe reads as it did before preference training existed
        del data["preference"]
    return yaml.safe_dump(data, sort_keys=False)

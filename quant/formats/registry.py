"""The one list of weight formats, and the lookups everything else goes through.

Nothing outside `quant/formats/` compares format names: callers look a format up here (`base_format`,
`output_format`, `resolve_base`, `declared_format`) and ask the object. Nothing outside keeps a list of layer
types either: what a loaded model's frozen layers are, how to read one's weight densely, what peft needs registered
and what counts as quantized storage is asked here too (`layer_format`, `frozen_weight`, `linear_types`,
`custom_lora_types`, `lora_layers`, `quantized_storage`). The recipe's `base.quantization`
choices, `finetune merge --format` and its per-format flags, `quant eval --quantization` and the sharding check
are all derived from `FORMATS`.

Adding a format (GGUF output next) is one module in `quant/formats/` plus one entry in `FORMATS`. The module
defines a `quant.formats.base.Format` subclass (see its docstrings for the exact signatures) that sets
    name, label, summary   registry name (a base.quantization and/or --format value), how messages name it,
                           one line for `finetune merge --help`
    base / output          which roles it plays
and implements, for a training base (`base = True`):
    quant_method, declares()  the quantization_config.quant_method of checkpoints stored in this format, so
                           `auto` picks it and a mismatch is refused (stored_quantized = True for such formats:
                           the merge then needs --base-original to merge into the original weights)
    settings()             its settings as JSON values, stored in BaseSpec.settings (adapter/base.json)
    load()                 the base on a device for training, exactly as the BaseSpec says
    rebuilder()            a `Rebuilder` whose load() gives a decoder layer's weights as training saw them
    sharding_problem()     why DDP / DeepSpeed ZeRO-2/3 / FSDP2 / mixed precision cannot train it, or None
    layer_types(), frozen_weight(), storage()   its frozen layers in a loaded model, how the fused LoRA kernels
                           read one's weight, the tensors holding its quantized weight; peft_dispatches / lora_layer()
                           when peft has no dispatcher for those layers
and, for a merge output (`output = True`):
    options                a dataclass of `option(...)` fields: its `finetune merge` flags (shared names such as
                           --bits must keep one meaning), validated by the merge config
    calibration(), calib_hint   whether calibration data is required/optional (the merge then tokenizes --calib
                           with the training data pipeline and passes token ids), and the hint when it is missing
    default_dtype, fixed_dtype       dtype of unquantized tensors; whether --dtype applies
    same_grid()            True when requantizing a base's own dequantized weights (merge-into auto -> original)
    encoder()              an `Encoder`: merged float tensors of each layer -> the format's tensors, its
                           quantization_config, extra files (write_files) and report entry (describe)
    load_merged()          the written output loaded as its users would (the fidelity report's model c)
A format that writes something other than safetensors shards (a single .gguf file) has its encoder return its
own writer from `sink()` and set `hf_layout = False` (no config.json/tokenizer files next to it); the request
carries the model's config (`request.model.config`) and the tokenizer directory for its metadata.

GPTQ and AWQ (`gptq.py`, `awq.py`) share `packed_base.PackedFormat` (load, load_merged, sharding_problem,
calibration() and the layer questions around their packed layer and its loader); each adds its rebuilder, options
(bits, group_size) and an encoder that runs its quantizer layer by layer on the calibration ids (`layerwise.py`). GGUF output
is `gguf.py`: output = True, options (gguf_type -> `--gguf-type`), calibration() OPTIONAL (--calib weights the
K-quant scale search), an encoder whose sink() writes the .gguf, load_merged() through transformers' gguf_file.
tests/test_formats.py then holds every format to its contract: its output round-trips through its own loader
(give it a TOLERANCE line) and a training format's sharding answers are the README's Multi-GPU table (give it a
row).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quant.errors import UserError
from quant.formats.awq import AWQFormat
from quant.formats.base import BaseSpec, Format, FrozenWeight, ShardingSetup, dtype_name
from quant.formats.bnb import Bnb4Format, Int8Format
from quant.formats.float import FloatBase, FloatOutput
from quant.formats.gguf import GGUFFormat
from quant.formats.gptq import GPTQFormat

AUTO = "auto"

FORMATS: tuple[Format, ...] = (
    FloatOutput("bf16", torch.bfloat16),
    FloatOutput("fp16", torch.float16),
    Bnb4Format("nf4"),
    Bnb4Format("fp4"),
    Int8Format(),
    GPTQFormat(),
    AWQFormat(),
    GGUFFormat(),
    FloatBase(),
)
DEFAULT_BASE = "nf4"  # what `auto` trains on when the checkpoint is not stored quantized (the QLoRA default)
UNQUANTIZED = FloatBase.name  # what `quant eval` evaluates a float checkpoint as

_BY_NAME = {f.name: f for f in FORMATS}
assert len(_BY_NAME) == len(FORMATS), "format names must be unique"


def base_names() -> tuple[str, ...]:
    return tuple(f.name for f in FORMATS if f.base)


def exact_targets() -> tuple[str, ...]:
    """The formats an adapter can be trained to merge into exactly (`lora.merge_target`; Format.exact_route)."""
    return tuple(f.name for f in FORMATS if type(f).exact_route is not Format.exact_route)


def output_names() -> tuple[str, ...]:
    return tuple(f.name for f in FORMATS if f.output)


def _lookup(name: str, names: tuple[str, ...], what: str) -> Format:
    if name not in names:
        raise UserError(f"{what} must be one of {', '.join(names)} (got {name!r})")
    return _BY_NAME[name]


def base_format(name: str, what: str = "base.quantization") -> Format:
    return _lookup(name, base_names(), what)


def output_format(name: str, what: str = "--format") -> Format:
    return _lookup(name, output_names(), what)


def declared_format(model_dir: str | Path) -> Format | None:
    """The format a local checkpoint directory is stored in (its quantization_config), or None: a float
    checkpoint, a hub id, or a quantization no format here reads."""
    path = Path(model_dir)
    if not path.is_dir():
        return None
    config = path / "config.json"
    qc = _quantization_config(config) if config.is_file() else None
    return next((f for f in FORMATS if f.base and f.declares(qc, path)), None)


def stored_output(model_dir: str | Path) -> tuple[Format, dict]:
    """The output format a model directory (a merge output, or any checkpoint in one of our formats) is stored
    in, and its config.json ({} for a format whose output has none: GGUF); an unquantized checkpoint of another float dtype (fp32) is served by the first
    float output's loader, in the dtype the caller asks for. UserError for anything else, naming what is."""
    config_file = Path(model_dir) / "config.json"
    readable = ", ".join(f.name for f in FORMATS if f.output)
    if not config_file.is_file():
        held = next((f for f in FORMATS if f.output and f.holds(Path(model_dir))), None)
        if held is not None:
            return held, {}
        raise UserError(f"{model_dir}: no config.json; not a model directory (readable: {readable})")
    _quantization_config(config_file)  # a damaged file: one line
    config = json.loads(config_file.read_text(encoding="utf-8"))
    found = next((f for f in FORMATS if f.output and f.stores(config)), None)
    if found is None and not config.get("quantization_config"):
        found = next(f for f in FORMATS if f.output and f.fixed_dtype)
    if found is None:
        method = (config.get("quantization_config") or {}).get("quant_method")
        raise UserError(f"{model_dir}: weights quantized as quant_method '{method}', which no format here "
                        f"reads (readable: {readable})")
    return found, config


def _quantization_config(config: Path) -> dict | None:
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{config}: not valid JSON ({type(e).__name__}); the model directory is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{config}: not a JSON object; the model directory is damaged")
    qc = data.get("quantization_config") or None
    return qc if isinstance(qc, dict) else None


def resolve_format(asked: str, model_dir: str | Path, model: str, what: str = "base.quantization",
                   default: str = DEFAULT_BASE) -> Format:
    """`auto`: the format the checkpoint is stored in, else `default`. A checkpoint stored quantized trains only
    as what it is, and a stored-quantized format needs such a checkpoint."""
    if asked != AUTO and asked not in base_names():
        raise UserError(f"{what} must be one of {', '.join((AUTO,) + base_names())} (got {asked!r})")
    declared = declared_format(model_dir)
    if asked == AUTO:
        return declared or base_format(default, what)
    fmt = base_format(asked, what)
    if declared is not None and declared is not fmt:
        raise UserError(f"{what} = '{asked}' but {model} is a {declared.title} checkpoint; use '{declared.name}' "
                        f"or '{AUTO}'")
    if fmt.stored_quantized and declared is not fmt:
        raise UserError(f"{what} = '{asked}' but {model} has no {fmt.title} quantization_config in config.json")
    return fmt


def resolve_base(model: str, model_dir: str, quantization: str = AUTO, double_quant: bool = True,
                 quant_storage: str = "uint8", compute_dtype: torch.dtype = torch.float32,
                 what: str = "base.quantization", default: str = DEFAULT_BASE) -> BaseSpec:
    """The base record: `model` as asked, its local `model_dir`, the resolved format and its settings."""
    fmt = resolve_format(quantization, model_dir, model, what, default)
    settings = fmt.settings(str(model_dir), double_quant, quant_storage, compute_dtype)
    return BaseSpec(model=model, model_dir=str(model_dir), format=fmt.name, compute_dtype=dtype_name(compute_dtype),
                    settings=settings, asked_format=quantization)


def format_of(spec: BaseSpec) -> Format:
    return base_format(spec.format, f"base format {spec.format!r}")


def sharding_problem(spec: BaseSpec, setup: ShardingSetup) -> str | None:
    """Why `spec` cannot train under `setup`, or None; decided before any weight is loaded."""
    if setup.distributed_type == "FSDP" and setup.fsdp_version != 2:
        return (f"{setup.where}: only FSDP2 is supported with quantized bases; set fsdp_version: 2 in the "
                "accelerate config (recipes/accelerate/fsdp.yaml)")
    return format_of(spec).sharding_problem(spec, setup)


def check_source(spec: BaseSpec, ckpt) -> None:
    """The checkpoint the merge streams for `spec` holds that format's weights (a quant.tensorfiles.Checkpoint)."""
    fmt = format_of(spec)
    declared = next((f for f in FORMATS if f.base and f.declares(ckpt.quantization_config(), ckpt.path)), None)
    if fmt.stored_quantized:
        if declared is not fmt:
            raise UserError(f"the adapter was trained on a {fmt.title} base but {ckpt.path} is not a {fmt.title} "
                            "checkpoint")
    elif declared is not None:
        raise UserError(f"the adapter was trained on a {fmt.name} base but {ckpt.path} is a {declared.title} "
                        "checkpoint")
    elif ckpt.quantization_config():
        raise UserError(f"{ckpt.path} is stored quantized ({ckpt.quantization_config().get('quant_method')}); the "
                        f"{fmt.name} base is rebuilt from full-precision weights: pass --base with those")


# ------------------------------------------------------------------------------------------ layers of a loaded model


def layer_format(module: nn.Module) -> Format | None:
    """The format whose frozen layer `module` is (nf4 and fp4 share one layer type: the first answers), or None
    for a plain nn.Linear or any other module."""
    return next((f for f in FORMATS if isinstance(module, f.layer_types())), None)


def frozen_weight(module: nn.Module) -> FrozenWeight | None:
    """How the fused LoRA kernels read a base layer's weight as a dense tensor: its format's way, a plain
    nn.Linear's weight, or None when they cannot take the layer."""
    fmt = layer_format(module)
    if fmt is not None:
        return fmt.frozen_weight(module)
    return FrozenWeight(module) if type(module) is nn.Linear else None


def linear_types() -> tuple[type, ...]:
    """nn.Linear and every format's layer types: the modules that hold a projection's weight in any loaded model
    (what the GGUF importance statistics hook)."""
    return (nn.Linear, *(t for f in FORMATS for t in f.layer_types()))


def custom_lora_types() -> tuple[type, ...]:
    """The layer types peft has no dispatcher for: they are registered with peft as custom modules, and peft's
    'all-linear' does not find them."""
    return tuple(t for f in FORMATS if not f.peft_dispatches for t in f.layer_types())


def lora_layers() -> dict[type, type]:
    """{layer type: peft LoRA layer class} for `custom_lora_types` (imports peft)."""
    return {t: f.lora_layer() for f in FORMATS if not f.peft_dispatches for t in f.layer_types()}


def quantized_storage(module: nn.Module) -> list[torch.Tensor]:
    """The tensors holding `module`'s quantized weight when it is a format's frozen layer, else []."""
    fmt = layer_format(module)
    return fmt.storage(module) if fmt is not None else []

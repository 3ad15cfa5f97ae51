"""What every format object is asked (`Format`), and the typed records it is asked with.

- `BaseSpec`: a base model resolved once: what was asked, where the weights are, the resolved format with its
  settings, the compute dtype. Training loads from it, the run checks it, the adapter stores it as `base.json`,
  the merge reads it back.
- `ShardingSetup`: the accelerate setup a base would train under (plain values, no accelerate import).
- `Rebuilder`: a base checkpoint's tensors, one decoder layer at a time, as training saw them (the merge's input).
- `EncodeRequest` / `Encoder`: merged float tensors -> the tensors, quantization_config and extra files of an
  output format, one decoder layer at a time.

The registry (`quant.formats.registry`) lists the formats and says what a new one implements.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quant.arch import describe
from quant.errors import UserError
from quant.model_checks import read_json_object
from quant.tensorfiles import ShardWriter
from quant.loading import load_tokenizer
from quant.moe.layout import memory_tensors
from quant.settings import setting

REQUIRED, OPTIONAL = "required", "optional"  # Format.calibration
# --method, shared by the GPTQ and AWQ outputs: each format's own choices, one flag.
METHOD_HELP = "gptq / awq: the format's own solver on --calib (default); rtn: round-to-nearest, no calibration"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# What accelerate's mixed_precision (and DeepSpeed's config sections of the same names) makes DeepSpeed/FSDP cast
# every float parameter to.
MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.

    CPU bitsandbytes backward is ~15x slower with bf16 compute than fp32, so auto never picks bf16 there.
    """
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ------------------------------------------------------------------------------------------ the base record


@dataclass(frozen=True)
class BaseSpec:
    """A base model resolved once (see the module docstring); JSON-serializable."""

    model: str  # what was asked: HF dir, hub id, .gguf file or pkg:...
    model_dir: str  # the local directory the weights are read from (a GGUF file is converted into one)
    format: str  # the resolved format's registry name, never 'auto'
    compute_dtype: str  # resolved: bfloat16 | float16 | float32
    settings: dict = field(default_factory=dict)  # the format's own settings (Format.settings)
    asked_format: str = "auto"  # the quantization that was asked for

    FILE = "base.json"
    VERSION = 1

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    def to_dict(self) -> dict:
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    def save(self, directory: str | Path) -> Path:
        """Write `base.json` into `directory` (a staged one: the caller renames it into place)."""
        path = Path(directory) / self.FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "BaseSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        version = data.pop("version", None)
        if version != cls.VERSION:
            raise UserError(f"{where}: version {version!r}; this finetune reads version {cls.VERSION}")
        unknown = sorted(set(data) - names)
        missing = sorted(n for n in ("model", "model_dir", "format", "compute_dtype") if n not in data)
        if unknown or missing:
            raise UserError(f"{where}: " + (f"unknown keys {unknown}" if unknown else f"missing keys {missing}"))
        if data["compute_dtype"] not in DTYPES:
            raise UserError(f"{where}: compute_dtype {data['compute_dtype']!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(data.get("settings", {}), dict):
            raise UserError(f"{where}: settings must be a mapping")
        return cls(**data)

    @classmethod
    def read(cls, directory: str | Path) -> "BaseSpec | None":
        """The record saved in `directory`, or None when there is none."""
        path = Path(directory) / cls.FILE
        data = read_json_object(path)
        return None if data is None else cls.from_dict(data, str(path))


# ------------------------------------------------------------------------------------------ sharding


@dataclass(frozen=True)
class ShardingSetup:
    distributed_type: str = "NO"  # accelerate's DistributedType value: NO, MULTI_CPU, MULTI_GPU, DEEPSPEED, FSDP
    zero_stage: int = 0
    fsdp_version: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16

    @property
    def where(self) -> str:
        stage = f" (ZeRO-{self.zero_stage})" if self.distributed_type == "DEEPSPEED" else ""
        return f"accelerate distributed_type {self.distributed_type}{stage}"

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3 and FSDP shard the parameters themselves, the frozen base included."""
        return self.distributed_type == "FSDP" or (self.distributed_type == "DEEPSPEED" and self.zero_stage == 3)

    @property
    def cast_dtype(self) -> torch.dtype | None:
        """What DeepSpeed/FSDP cast every float parameter to under mixed precision (DDP casts nothing)."""
        if self.mixed_precision == "no" or self.distributed_type not in ("DEEPSPEED", "FSDP"):
            return None
        return MIXED_PRECISION[self.mixed_precision]

    def cast_problem(self, what: str) -> str:
        return (f"{self.where} with mixed_precision {self.mixed_precision} casts every float parameter to "
                f"{dtype_name(self.cast_dtype)}, which would corrupt the {what}; set mixed_precision: no "
                "(base.compute_dtype is the precision)")


# ------------------------------------------------------------------------------------------ merge input


class Rebuilder:
    """A checkpoint's tensors, one unit (decoder layer) at a time, as training saw them, under the model's own
    (state_dict) names: `read` gives the checkpoint's tensors by their names on disk, a quantized Linear as its
    float `<module>.weight` (formats override it), and `load` renames them (Mixtral's v4 names, a multimodal
    prefix) and stacks per-expert weights into a mixture of experts' fused parameters (quant.moe.layout). This base
    class reads every tensor unchanged (an unquantized base, or the original weights).

    `ckpt` is a `quant.tensorfiles.Checkpoint`.
    """

    def __init__(self, ckpt, device=None):
        self.ckpt, self.device = ckpt, device
        self.arch = _described(ckpt.config)

    def disk_name(self, name: str) -> str:
        """A module or tensor name of the model as the checkpoint writes it."""
        return self.arch.to_disk(name) if self.arch is not None else name

    def weight_shape(self, module: str) -> tuple[int, int] | None:
        """[out, in] of `module`'s weight as training saw it, or None when the checkpoint has no such weight."""
        key = f"{self.disk_name(module)}.weight"
        shape = self.ckpt.shape(key) if key in self.ckpt.file_of else None
        return (shape[0], shape[1]) if shape is not None and len(shape) == 2 else None

    @torch.no_grad()
    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `keys` (checkpoint names) as training saw them, by checkpoint name."""
        return {k: self.ckpt.get(k, self.device) for k in keys}

    @torch.no_grad()
    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `keys` (checkpoint names) as training saw them, by the model's own names."""
        return memory_tensors(self.arch, self.read(keys))


def _described(config: dict):
    """The checkpoint's architecture description, None for an architecture the description does not know (its
    names are taken as they are)."""
    try:
        return describe(config)
    except UserError:
        return None


# ------------------------------------------------------------------------------------------ merge output


def option(help: str, type=str, choices=None):
    """A format option of `finetune merge` (a field of the format's `options` dataclass, made by
    quant.settings.setting): `--name-with-dashes` on the command line, `options={"name": ...}` from Python. None
    means the format's own default."""
    return setting(None, help, type=type, choices=choices)


@dataclass
class EncodeRequest:
    model: torch.nn.Module  # the model's skeleton (meta parameters): module names, types and shapes
    base: BaseSpec  # the base the adapter was trained on
    dtype: torch.dtype  # dtype of the unquantized tensors written (norms, embeddings, head)
    device: torch.device
    options: Any = None  # an instance of the format's `options` dataclass, or None
    calib: list[torch.Tensor] | None = None  # calibration token ids [1, T], where the format uses them
    tokenizer_dir: Path | None = None  # the tokenizer the output ships with (the adapter's copy)


def cast_floats(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}


class Encoder:
    """Turns the merged float tensors of one unit into the output format's tensors (called unit by unit, the
    tensors outside the decoder layers first with `layer` None)."""

    label = ""  # how the merge report names the output
    hf_layout = True  # the merge writes config.json, tokenizer and generation config next to the weights

    def sink(self, directory: Path, max_shard_bytes: int):
        """Where the encoded tensors go (add/close/abort, `total` bytes): safetensors shards by default; a
        single-file format returns its own writer."""
        return ShardWriter(directory, max_shard_bytes)

    def __call__(self, layer: int | None, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quantization_config(self) -> dict | None:
        """config.json's quantization_config, or None for an unquantized output."""
        return None

    def write_files(self, directory: Path) -> None:
        """Extra files of the format (written after the weights, before the directory is renamed into place)."""

    def describe(self) -> dict | None:
        """What the merge report records about the encoding (settings, calibration), or None."""
        return None


class CastEncoder(Encoder):
    """Every floating tensor in `dtype`; integer tensors as they are."""

    def __init__(self, dtype: torch.dtype, label: str = ""):
        self.dtype, self.label = dtype, label

    def __call__(self, layer, tensors):
        return cast_floats(tensors, self.dtype)


class LinearEncoder(CastEncoder):
    """Serializes the Linear weights in `names` with `encode_weight`; every other tensor is cast to `dtype`."""

    def __init__(self, names: set[str], dtype: torch.dtype, label: str = ""):
        super().__init__(dtype, label)
        self.names = names

    def __call__(self, layer, tensors):
        out = {}
        for key, t in tensors.items():
            module, _, leaf = key.rpartition(".")
            if leaf == "weight" and module in self.names:
                out.update(self.encode_weight(module, t))
            else:
                out.update(cast_floats({key: t}, self.dtype))
        return out

    def encode_weight(self, module: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ a loaded layer


class FrozenWeight:
    """A frozen layer's weight [out, in] as a dense tensor, made on demand in the dtype asked and never kept: how
    the fused LoRA kernels (finetune.kernels) read a base layer in forward and again in backward. This one reads a
    plain `weight`; a format whose layers hold something else gives its own (Format.frozen_weight)."""

    kind = "dense"

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer

    def __call__(self, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        """`slot`: which reusable buffer to write into, where the format keeps some (one per weight held at once)."""
        w = self.layer.weight
        return w if w.dtype == dtype else w.to(dtype)


# ------------------------------------------------------------------------------------------ the interface


class Format:
    """One quantized (or plain) weight format. See quant.formats.registry for what a new format implements;
    the defaults here are those of a format that needs nothing special."""

    name = ""  # registry name: a value of base.quantization and/or finetune merge --format
    label = ""  # how messages name it ("GPTQ"); default: the name
    summary = ""  # one line for `finetune merge --help`
    base = False  # a training base (base.quantization)
    output = False  # a merge output (--format)
    quant_method: str | None = None  # quantization_config.quant_method of checkpoints stored in this format
    stored_quantized = False  # True: trained from quantized files; False: quantized while loading float weights

    def __repr__(self) -> str:
        return f"<format {self.name}>"

    @property
    def title(self) -> str:
        return self.label or self.name

    # ---- base side
    def declares(self, quantization_config: dict | None, model_dir: Path | None) -> bool:
        """Whether a checkpoint (its config.json quantization_config, its directory) is stored in this format."""
        return self.quant_method is not None and (quantization_config or {}).get("quant_method") == self.quant_method

    def settings(self, model_dir: str, double_quant: bool, quant_storage: str, compute_dtype: torch.dtype) -> dict:
        """The format's settings for BaseSpec.settings (JSON values), from the request and the checkpoint."""
        return {}

    def load(self, spec: BaseSpec, device: torch.device, attn_implementation: str | None = None) -> torch.nn.Module:
        """The base model for training on `device`, exactly as `spec` says (frozen by the caller)."""
        raise NotImplementedError(f"{self.name} is not a training base")

    def rebuilder(self, spec: BaseSpec, ckpt, model: torch.nn.Module, device) -> Rebuilder:
        """Reads `ckpt` (a quant.tensorfiles.Checkpoint of this format) unit by unit as training saw it; `model` is
        its skeleton."""
        return Rebuilder(ckpt, device)

    def sharding_problem(self, spec: BaseSpec, setup: ShardingSetup) -> str | None:
        """Why a base in this format cannot train under `setup`, or None (decided before any weight loads)."""
        return None

    # ---- its layers in a loaded model (fused LoRA kernels, peft, parameter counts, importance statistics)
    peft_dispatches = True  # peft adapts this format's layers itself; False: register `lora_layer()` with peft

    def layer_types(self) -> tuple[type, ...]:
        """The module types of this format's frozen layers in a loaded model; () when they are plain nn.Linear."""
        return ()

    def frozen_weight(self, layer: torch.nn.Module) -> FrozenWeight | None:
        """How the fused LoRA kernels read `layer`'s weight as a dense tensor; None: they cannot take this layer."""
        return None

    def storage(self, layer: torch.nn.Module) -> list[torch.Tensor]:
        """The tensors holding `layer`'s quantized weight (what a memory report counts as quantized storage)."""
        return []

    def lora_layer(self) -> type:
        """The peft LoRA layer class for this format's layers, where peft has no dispatcher for them."""
        raise NotImplementedError(f"peft adapts {self.title} layers itself")

    # ---- output side
    options = None  # a dataclass of `option(...)` fields, or None
    default_dtype = torch.bfloat16  # dtype of unquantized tensors unless --dtype says otherwise
    fixed_dtype = False  # True: the format is a dtype (--dtype does not apply)
    # True: the format moves per-channel scales between a decoder layer's tensors (AWQ folds them into norms and
    # projections): each tensor may change, the layer's function is what is kept. A LoRA trained on such a base
    # is in the folded coordinates, so it cannot be merged into the original weights.
    folds_scales = False
    calib_hint = ""  # appended to the "needs calibration data" error

    def calibration(self, options) -> str | None:
        """REQUIRED / OPTIONAL: the encoder is given calibration token ids (required ones, or when --calib is
        given); None: calibration data does not apply with these options."""
        return None

    def accepts_calibration(self) -> bool:
        """Whether --calib means anything for this format (with its default options)."""
        return self.calibration(self.options() if self.options else None) is not None

    def same_grid(self, base: "Format") -> bool:
        """True when requantizing weights dequantized from `base` lands on the very grid they came from, where
        a LoRA delta (far below half a step) would round away: the merge then adds it to the original weights."""
        return False

    def encoder(self, request: EncodeRequest) -> Encoder:
        raise NotImplementedError(f"{self.name} is not a merge output")

    def exact_route(self, quantization_config: dict) -> str | None:
        """How an adapter trained for this format (`lora.merge_target`, finetune.exact) merges into a base stored in
        it without requantizing: 'zeros' (its update moves the grid's integer zero points), 'codes' (training computes
        with the merge's own requantization onto the base's grid), or None (no exact merge into this format)."""
        return None

    def unreadable(self, config: dict) -> str | None:
        """Why `load_merged` cannot read this format's output of a model with `config` (the fidelity report is then
        skipped), or None."""
        return None

    def load_merged(self, out_dir: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """A merged output, loaded the way its users would, computing in `dtype` (the fidelity report)."""
        raise NotImplementedError(f"{self.name} is not a merge output")

    # ---- reading a model directory (chat, generate, eval)
    gpu_compute_dtype = torch.bfloat16  # what a model of this format computes in on a GPU, unless told otherwise

    def stores(self, config: dict) -> bool:
        """Whether a model directory with this config.json (our merge output or any checkpoint in the format)
        holds weights in this output format, so that `load_merged` runs it."""
        return self.declares(config.get("quantization_config"), None)

    def holds(self, model_dir: Path) -> bool:
        """Whether a directory without config.json is this format's output all the same (GGUF: one .gguf file)."""
        return False

    def load_tokenizer(self, model_dir: Path):
        """The tokenizer of a model directory in this format (tokenizer files beside the weights)."""
        return load_tokenizer(str(model_dir), str(model_dir))

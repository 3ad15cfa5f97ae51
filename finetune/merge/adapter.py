"""What an adapter directory holds: its LoRA factors with their scaling, and the base it was trained on.

Accepted inputs: a run directory (`runs/x`, holding `adapter/`), a final adapter directory (`runs/x/adapter`),
or a checkpoint (`runs/x/checkpoint-20` or its `adapter/`). The base comes from `base_model.txt` (written next
to the final adapter: recipe spec, local model dir, resolved quantization) or else from the run's
`recipe.yaml`; `--base` replaces the model directory but never the quantization the adapter was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from finetune.recipe import BaseConfig, DataConfig, TrackingConfig, TrainConfig, WandbConfig
from quant.errors import UserError

PEFT_PREFIX = "base_model.model."
# LoRA variants whose merged form is not W + scale·B@A, or that carry weights outside lora_A/lora_B.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales the merged weight by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias",
    "layer_replication": "layer_replication changes the layer structure",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "modules_to_save": "modules_to_save stores fully trained modules",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "alora_invocation_tokens": "aLoRA only activates after its invocation tokens, which a merged weight cannot do",
    "use_qalora": "QA-LoRA pools inputs per quantization group",
    "use_bdlora": "BD-LoRA",
}


@dataclass
class LoraFactors:
    """One adapted module: delta W = scale · B @ A in nn.Linear layout [out, in]."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    def delta(self, device=None) -> torch.Tensor:
        A = self.A.to(device=device, dtype=torch.float32)
        B = self.B.to(device=device, dtype=torch.float32)
        return (B @ A).mul_(self.scale)

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]


@dataclass
class BaseInfo:
    spec: str  # what the recipe named (HF dir, hub id, .gguf, pkg:...)
    model_dir: str  # local directory the merge reads
    quantization: str  # nf4 | fp4 | int8 | gptq | none, as trained
    double_quant: bool
    quant_storage: str
    compute_dtype: str  # the recipe's value, may be "auto"


@dataclass
class AdapterSource:
    adapter_dir: Path
    run_dir: Path | None
    config: dict  # adapter_config.json
    base: BaseInfo
    loras: dict[str, LoraFactors]  # module name in the base model -> factors
    data: DataConfig | None  # the run's data section (default eval data of the report)
    train: TrainConfig | None
    tracking: TrackingConfig | None
    tokenizer_dir: Path

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))


def find_adapter_dir(path: Path) -> Path:
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise UserError(f"{path}: no adapter_config.json here or in {path / 'adapter'}; pass a run directory, its "
                    "adapter/ or a checkpoint-N/ directory")


def _find_upwards(start: Path, name: str, levels: int = 2) -> Path | None:
    p = start
    for _ in range(levels + 1):
        if (p / name).is_file():
            return p / name
        p = p.parent
    return None


def _dataclass_from(cls, values: dict | None, where: str):
    """A recipe section from a run's machine-written recipe.yaml, without re-checking that its files exist
    (a merge may run from another directory or after the training data moved)."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown}; was it written by another version of finetune?")
    if cls is TrackingConfig and isinstance(values.get("wandb"), dict):
        values["wandb"] = _dataclass_from(WandbConfig, values["wandb"], where)
    return cls(**values)


def _read_recipe(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a recipe mapping")
    return data


def _resolve_base(adapter_dir: Path, recipe: dict, recipe_path: Path | None, base_override: str | None) -> BaseInfo:
    from finetune.model import resolve_quantization
    from quant.loading import materialize

    base_cfg = _dataclass_from(BaseConfig, recipe.get("base"), f"{recipe_path}: base")
    lines_file = adapter_dir / "base_model.txt"
    lines = lines_file.read_text().splitlines() if lines_file.is_file() else []
    if len(lines) >= 3:
        spec, trained_dir, quantization = lines[0], lines[1], lines[2]
    elif base_cfg.model:
        spec, trained_dir, quantization = base_cfg.model, "", ""
    else:
        raise UserError(f"{adapter_dir}: neither base_model.txt nor a run recipe.yaml says which base the adapter "
                        "was trained on; merge works on adapters written by `finetune sft`")
    if base_override:
        model_dir = materialize(base_override, "--base")
    elif trained_dir and Path(trained_dir).exists():
        model_dir = trained_dir
    else:
        model_dir = materialize(spec, "the adapter's base model")
    if not quantization:
        quantization = resolve_quantization(dataclasses.replace(base_cfg, model=spec), model_dir)
    return BaseInfo(spec=spec if not base_override else base_override, model_dir=str(model_dir),
                    quantization=quantization, double_quant=base_cfg.double_quant,
                    quant_storage=base_cfg.quant_storage, compute_dtype=base_cfg.compute_dtype)


def _check_config(config: dict, adapter_dir: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter_dir}: peft_type is {config.get('peft_type')}; only LoRA adapters can be merged")
    for key, why in _UNSUPPORTED.items():
        value = config.get(key)
        if value not in (None, False, [], {}, "none"):
            raise UserError(f"{adapter_dir}: cannot merge: {why} ({key} = {value!r})")
    if config.get("bias", "none") != "none":
        raise UserError(f"{adapter_dir}: cannot merge: bias = {config['bias']!r} trains base biases; only "
                        "bias: none adapters are supported")
    if config.get("fan_in_fan_out"):
        raise UserError(f"{adapter_dir}: fan_in_fan_out adapters (GPT-2 style Conv1D bases) are not supported")


def _scale(config: dict, module: str) -> tuple[int, float]:
    """peft's rank and alpha for `module`, with rank_pattern/alpha_pattern, and its scaling factor."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(ranks.keys(), module), config["r"])
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config["lora_alpha"])
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _load_factors(adapter_dir: Path, config: dict) -> dict[str, LoraFactors]:
    from safetensors.torch import load_file

    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        hint = " (only the legacy adapter_model.bin; re-save it with safetensors)" \
            if (adapter_dir / "adapter_model.bin").exists() else ""
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors{hint}")
    tensors = load_file(str(weights_file))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part in (".lora_A.weight", ".lora_B.weight"):
            if name.endswith(part):
                pairs.setdefault(name[: -len(part)], {})[part[6]] = t
                break
        else:
            if "lora_embedding" in name:
                raise UserError(f"{adapter_dir}: LoRA on embeddings ({name}) is not supported by merge")
            raise UserError(f"{adapter_dir}: unexpected tensor {key} in adapter_model.safetensors")
    loras = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{adapter_dir}: {module} has lora_{'A' if 'A' in ab else 'B'} but not its partner")
        A, B = ab["A"], ab["B"]
        r, scale = _scale(config, module)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise UserError(f"{adapter_dir}: {module}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not "
                            f"match rank {r} from adapter_config.json")
        loras[module] = LoraFactors(A, B, scale)
    if not loras:
        raise UserError(f"{adapter_dir}: adapter_model.safetensors holds no LoRA weights")
    return loras


def read_adapter(path: str | Path, base: str | None = None) -> AdapterSource:
    """Everything the merge needs to know about the adapter at `path` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such adapter or run directory")
    adapter_dir = find_adapter_dir(path)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    _check_config(config, adapter_dir)
    recipe_path = _find_upwards(adapter_dir, "recipe.yaml")
    recipe = _read_recipe(recipe_path)
    base_info = _resolve_base(adapter_dir, recipe, recipe_path, base)
    where = str(recipe_path)
    data = _dataclass_from(DataConfig, recipe["data"], f"{where}: data") if recipe.get("data") else None
    train = _dataclass_from(TrainConfig, recipe["train"], f"{where}: train") if recipe.get("train") else None
    tracking = _dataclass_from(TrackingConfig, recipe["tracking"], f"{where}: tracking") if recipe.get("tracking") \
        else None
    has_tokenizer = any((adapter_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return AdapterSource(
        adapter_dir=adapter_dir,
        # The final adapter carries its own copy of the recipe; the run directory is the one above it.
        run_dir=(adapter_dir.parent if recipe_path.parent == adapter_dir else recipe_path.parent) if recipe_path
        else None,
        config=config,
        base=base_info,
        loras=_load_factors(adapter_dir, config),
        data=data,
        train=train,
        tracking=tracking,
        tokenizer_dir=adapter_dir if has_tokenizer else Path(base_info.model_dir),
    )


def recipe_base_config(source: AdapterSource) -> BaseConfig:
    """The BaseConfig that rebuilds the trained base from `source.base.model_dir` (for the fidelity report)."""
    b = source.base
    return BaseConfig(model=b.model_dir, quantization=b.quantization, double_quant=b.double_quant,
                      compute_dtype=b.compute_dtype, quant_storage=b.quant_storage)



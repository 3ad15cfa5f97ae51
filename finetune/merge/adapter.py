"""What an adapter directory holds: its LoRA factors with their scaling, and the base it was trained on.

Accepted inputs: a run directory (`runs/x`, holding `adapter/`), a final adapter directory (`runs/x/adapter`),
or a checkpoint (`runs/x/checkpoint-20` or its `adapter/`). The base is the record training saved next to the
final adapter (`base.json`, a quant.formats BaseSpec), else resolved again from an older adapter's positional
`base_model.txt` (recipe spec, local model dir, resolved quantization) with the run's `recipe.yaml`, else from
the recipe alone. `--base` replaces the model directory but never the format the adapter was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file

from finetune.exact.factors import exact_factors
from finetune.exact.target import NONE, target_of
from finetune.merge.experts import ExpertFactors, expert_factors
from finetune.recipe import BaseConfig, DataConfig, PreferenceConfig, TrackingConfig, TrainConfig, build_section
from finetune.recipe_checks import read_yaml, short
from quant.arch import describe
from quant.errors import UserError
from quant.formats import registry as formats
from quant.formats.base import BaseSpec, resolve_compute_dtype
from quant.loading import local_path, materialize
from quant.model_checks import read_json_object

PEFT_PREFIX = "base_model.model."
MAX_RANK = 16384  # bound of r and lora_alpha (the recipe allows r <= 4096)
MERGES_DIR = "merges"  # RUN/merges/NAME: where a run's merges go (finetune report finds them there)
LEGACY_BASE_FILE = "base_model.txt"  # written by finetune before base.json; still read
# LoRA variants whose merged form is not W + scale·B@A, or that carry weights outside lora_A/lora_B.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales the merged weight by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias",
    "layer_replication": "layer_replication changes the layer structure",
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
class AdapterSource:
    adapter_dir: Path
    run_dir: Path | None
    config: dict  # adapter_config.json
    base: BaseSpec  # the base as trained; model_dir is the directory the merge reads
    loras: dict[str, LoraFactors]  # module name in the base model -> factors
    data: DataConfig | None  # the run's data section (default eval data of the report)
    train: TrainConfig | None
    tracking: TrackingConfig | None
    tokenizer_dir: Path
    preference: PreferenceConfig | None = None  # the run's preference section: a DPO/ORPO/KTO-trained adapter

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


def _read_recipe(path: Path | None) -> dict:
    if path is None:
        return {}
    data = read_yaml(path, "a run's recipe") or {}  # bounded in size and alias expansion
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a recipe mapping")
    return data


def _legacy_base(adapter_dir: Path, base_cfg: BaseConfig, device: torch.device) -> BaseSpec:
    """The record of an adapter written before base.json: `base_model.txt` (spec, trained directory, resolved
    quantization) or else the run recipe's base section, resolved now as training resolved it."""
    lines_file = adapter_dir / LEGACY_BASE_FILE
    lines = lines_file.read_text().splitlines() if lines_file.is_file() else []
    if len(lines) >= 3:
        spec, trained_dir, quantization = lines[0], lines[1], lines[2]
    elif base_cfg.model:
        spec, trained_dir, quantization = base_cfg.model, "", base_cfg.quantization
    else:
        raise UserError(f"{adapter_dir}: neither base.json, {LEGACY_BASE_FILE} nor a run recipe.yaml says which "
                        "base the adapter was trained on; merge works on adapters written by `finetune sft`")
    model_dir = trained_dir if trained_dir and Path(trained_dir).exists() else \
        materialize(spec, "the adapter's base model")
    return formats.resolve_base(spec, model_dir, quantization, base_cfg.double_quant, base_cfg.quant_storage,
                                resolve_compute_dtype(base_cfg.compute_dtype, device))


def _check_base_record(adapter_dir: Path) -> None:
    """base.json's fields have the types BaseSpec reads (it checks names, version and dtype), so a damaged or
    hand-edited record is one line naming the field, never a TypeError deep in loading."""
    path = adapter_dir / BaseSpec.FILE
    data = read_json_object(path)
    if data is None:
        return
    for key in ("model", "model_dir", "format", "compute_dtype", "asked_format"):
        if key in data and not (isinstance(data[key], str) and data[key].strip() and "\0" not in data[key]):
            raise UserError(f"{path}: {key} = {short(data[key])} is not valid (expected a non-empty string)")
    settings = data.get("settings", {})
    for key, value in (settings.items() if isinstance(settings, dict) else ()):
        if not (value is None or isinstance(value, (str, int, bool)) or
                isinstance(value, float) and math.isfinite(value)):
            raise UserError(f"{path}: settings.{key} = {short(value)} is not valid (expected a string, number or "
                            "boolean)")


def _resolve_base(adapter_dir: Path, base_cfg: BaseConfig, base_override: str | None,
                  device: torch.device) -> BaseSpec:
    _check_base_record(adapter_dir)
    base = BaseSpec.read(adapter_dir) or _legacy_base(adapter_dir, base_cfg, device)
    formats.base_format(base.format, f"{adapter_dir / BaseSpec.FILE}: format")  # one this version knows
    if base_override:
        return replace(base, model=base_override, model_dir=materialize(base_override, "--base"))
    if not Path(base.model_dir).exists():  # e.g. the GGUF conversion cache was cleared: convert again
        return replace(base, model_dir=materialize(base.model, "the adapter's base model"))
    return base


def _check_number(config: dict, key: str, where: Path, integer: bool, required: bool = True) -> None:
    value = config.get(key)
    if value is None and not required:
        return
    kind = int if integer else (int, float)
    if value is None or isinstance(value, bool) or not isinstance(value, kind) or \
            not (isinstance(value, int) or math.isfinite(value)) or not 0 < value <= MAX_RANK:
        what = f"an integer 1..{MAX_RANK}" if integer else f"a finite number > 0 and <= {MAX_RANK}"
        shown = key if key.isprintable() else repr(key)  # a rank_pattern key is the file's text: one line
        raise UserError(f"{where}: {shown} = {short(value) if key in config else 'missing'} is not valid (expected "
                        f"{what})")


def _check_config(config: dict | None, adapter_dir: Path) -> None:
    """adapter_config.json: the keys the merge and peft read, typed and in range (peft's own loading would fail
    deep inside, or load a partial adapter, on a wrong one)."""
    where = adapter_dir / "adapter_config.json"
    if config is None:
        raise UserError(f"{where}: not found")
    _check_number(config, "r", where, integer=True)
    _check_number(config, "lora_alpha", where, integer=False)
    for pattern, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        table = config.get(pattern) or {}
        if not isinstance(table, dict):
            raise UserError(f"{where}: {pattern} = {short(table)} is not valid (expected a mapping)")
        for name in table:
            _check_number(table, name, Path(f"{where}: {pattern}"), integer)
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str) or
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise UserError(f"{where}: target_modules = {short(targets)} is not valid (expected a name, a list of "
                        "names or a regex)")
    if not isinstance(config.get("use_rslora", False), bool):
        raise UserError(f"{where}: use_rslora = {short(config['use_rslora'])} is not valid (expected true or false)")
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
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(ranks.keys(), module), config["r"])
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config["lora_alpha"])
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _load_factors(adapter_dir: Path, config: dict, arch=None) -> dict[str, LoraFactors | ExpertFactors]:
    """{module: LoraFactors} of the Linear adapters and, for a mixture of experts' expert adapters
    (`target_parameters`, described by `arch`), {fused parameter key: ExpertFactors} (finetune.merge.experts)."""
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        hint = " (only the legacy adapter_model.bin; re-save it with safetensors)" \
            if (adapter_dir / "adapter_model.bin").exists() else ""
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors{hint}")
    try:
        tensors = load_file(str(weights_file))
    except (OSError, SafetensorError) as e:
        raise UserError(f"{weights_file}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") \
            from None
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
    if config.get("target_parameters"):
        loras.update(expert_factors(pairs, config, arch, lambda key: _scale(config, key), adapter_dir))
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{adapter_dir}: {module} has lora_{'A' if 'A' in ab else 'B'} but not its partner")
        A, B = ab["A"], ab["B"]
        for part, t in (("lora_A", A), ("lora_B", B)):
            if not t.is_floating_point():
                raise UserError(f"{weights_file}: {module}.{part} holds {t.dtype} values, not LoRA weights")
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise UserError(f"{weights_file}: {module}.{part} holds {bad} NaN or infinite values of {t.numel()}; "
                                "a diverged or damaged adapter cannot be merged or run")
        r, scale = _scale(config, module)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise UserError(f"{adapter_dir}: {module}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not "
                            f"match rank {r} from adapter_config.json")
        loras[module] = LoraFactors(A, B, scale)
    if not loras:
        raise UserError(f"{adapter_dir}: adapter_model.safetensors holds no LoRA weights")
    return loras


def _factors(run: "RunFiles", base: BaseSpec) -> dict:
    """The adapter's factors; an adapter trained for an exact merge (finetune.exact) joined with its base's grid."""
    loras = _load_factors(run.adapter_dir, run.config, _architecture(base.model_dir))
    if target_of(run.adapter_dir, run.recipe, run.recipe_path) == NONE:
        return loras
    return exact_factors(loras, base, run.adapter_dir)


def _architecture(model_dir: str):
    """The base's architecture description (None: no config.json to read, or a family the description does not
    know)."""
    try:
        config = read_json_object(Path(model_dir) / "config.json")
        return describe(config) if config is not None else None
    except UserError:
        return None


@dataclass
class RunFiles:
    """What an adapter argument names, read without loading anything: the adapter directory, its run directory
    and recipe, and adapter_config.json."""

    adapter_dir: Path
    run_dir: Path | None  # the directory with the run's recipe.yaml (None for a bare adapter)
    recipe_path: Path | None
    recipe: dict
    config: dict  # adapter_config.json

    def section(self, cls, key):
        """A typed section of the run's recipe (None when absent), validated as training validated it."""
        return build_section(cls, self.recipe[key], key, str(self.recipe_path)) if self.recipe.get(key) else None

    def base_paths(self) -> list[str]:
        """Every place the base might be read from (its record, an older adapter's base_model.txt, the recipe),
        for the output rule: no output may replace or sit inside the base."""
        found = []
        record = read_json_object(self.adapter_dir / BaseSpec.FILE)
        if record is not None:
            found += [v for k, v in record.items() if k in ("model", "model_dir") and isinstance(v, str)]
        legacy = self.adapter_dir / LEGACY_BASE_FILE
        if legacy.is_file():
            found += legacy.read_text(errors="replace").splitlines()[:2]
        base = self.recipe.get("base")
        if isinstance(base, dict) and isinstance(base.get("model"), str):
            found.append(base["model"])
        return [local_path(p) for p in found if p]


def locate(path: str | Path) -> RunFiles:
    """The adapter directory, run directory, recipe and adapter_config.json of an adapter argument."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such adapter or run directory")
    adapter_dir = find_adapter_dir(path)
    config = read_json_object(adapter_dir / "adapter_config.json")
    _check_config(config, adapter_dir)
    recipe_path = _find_upwards(adapter_dir, "recipe.yaml")
    # The final adapter carries its own copy of the recipe; the run directory is the one above it.
    run_dir = (adapter_dir.parent if recipe_path.parent == adapter_dir else recipe_path.parent) if recipe_path \
        else None
    return RunFiles(adapter_dir, run_dir, recipe_path, _read_recipe(recipe_path), config)


def read_adapter(path: str | Path | RunFiles, base: str | None = None,
                 device: torch.device | None = None) -> AdapterSource:
    """Everything the merge needs to know about the adapter at `path` (see the module docstring). `device`
    resolves an older adapter's `compute_dtype: auto` (default CPU)."""
    run = path if isinstance(path, RunFiles) else locate(path)
    adapter_dir = run.adapter_dir
    base_cfg = run.section(BaseConfig, "base") or BaseConfig()
    base_info = _resolve_base(adapter_dir, base_cfg, base, device or torch.device("cpu"))
    has_tokenizer = any((adapter_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return AdapterSource(
        adapter_dir=adapter_dir,
        run_dir=run.run_dir,
        config=run.config,
        base=base_info,
        loras=_factors(run, base_info),
        data=run.section(DataConfig, "data"),
        train=run.section(TrainConfig, "train"),
        tracking=run.section(TrackingConfig, "tracking"),
        tokenizer_dir=adapter_dir if has_tokenizer else Path(base_info.model_dir),
        preference=run.section(PreferenceConfig, "preference"),
    )

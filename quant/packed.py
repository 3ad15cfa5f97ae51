"""What every packed-weight method (GPTQ, AWQ) shares: the frozen packed layer, and its checkpoints.

- `PackedLinear`: an nn.Module that computes straight from a checkpoint's packed tensors. Buffers carry the
  ecosystem's names (qweight, qzeros, scales, ..., bias), so `state_dict()` keys are the checkpoint keys, and there
  is deliberately no `weight`: the float weight only exists transiently, one layer at a time, made by
  `dequantize()` or inside the autograd function. Training: `FrozenMatmul` is frozen-weight autograd. Backward
  returns grad_input = grad_out @ Wᵀ with W dequantized again on the fly (not saved from forward, so activation
  memory stays that of a frozen nn.Linear) and no gradient for the packed tensors. A method's layer says which
  buffers it packs, how it dequantizes them and, where it has a faster kernel, how it multiplies.
- `load_packed_model` / `save_packed`: building an HF model around packed layers from a checkpoint directory,
  and writing such a model back as safetensors + config.json + quantize_config.json.
- `quantize_to_dir`: what `quant gptq` and `quant awq` do around their quantizer (load, calibrate, write).

transformers, accelerate and huggingface_hub are imported where they are used: the CLI imports this module for
`quant --help`, to which transformers' model classes would add ~2 s (2.7 s without them, 2 cores).
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from quant.arch import describe
from quant.arch.layout import to_disk_tensors
from quant.calibration import calibration_chunks, load_texts
from quant.errors import UserError
from quant.files import claim_output, disk_needed, staged
from quant.loading import load_float_model, materialize, resolve_model_path, source_inputs
from quant.moe.convert import architecture, defuse, linear_experts
from quant.tensorfiles import DEFAULT_SHARD_BYTES, ShardWriter, safetensors_files

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ decode kernels

# Up to GEMV_MAX_ROWS rows of x a method's matrix-vector kernel runs (decode: one row per sequence being generated;
# quant.gptq.triton_kernels, quant.awq.triton_kernels); each row streams the packed weight once more, so a few rows
# should still beat a tensor-core tile padded to 16 rows. 0 = off: the kernels match the torch reference (tests,
# under the Triton interpreter) but have not been timed on a GPU yet; until scripts/bench/bench_decode.py shows
# them ahead of the fused tile kernel, decode keeps the measured path (set GEMV_ROWS to turn them on).
GEMV_ROWS = 4
GEMV_MAX_ROWS = 0
_SMS: dict = {}


def gemv_block_k(group: int, K: int, least: int) -> int | None:
    """Rows of K a matrix-vector program takes at a time so that they lie in one group: the largest power of two up
    to 128 that divides `group` (128 when one group spans K), at least `least`; None when there is none."""
    if group >= K:
        return 128
    block = 128
    while block >= least:
        if group % block == 0:
            return block
        block //= 2
    return None


def gemv_split(n_blocks: int, k_blocks: int, device: torch.device) -> int:
    """Programs along K for a matrix-vector kernel with `n_blocks` column blocks: enough for about two programs per
    streaming multiprocessor, at most 8, each with at least 4 blocks of K."""
    if device.type == "cuda" and device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    sms = _SMS.get(device, 16)  # 16 for the interpreter on CPU: any count will do
    return max(1, min(8, k_blocks // 4, -(-2 * sms // n_blocks)))


# ------------------------------------------------------------------------------------------ the layer


class FrozenMatmul(torch.autograd.Function):
    """y = x @ W for a packed layer's frozen W; backward dequantizes W again instead of keeping it."""

    @staticmethod
    def forward(ctx, x, layer, *packed):
        ctx.layer = layer
        ctx.save_for_backward(*packed)
        return layer.matmul(x, *packed)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            # saved_tensors may be read once only (non-reentrant checkpointing refuses a second unpack)
            W = ctx.layer.weight_kn(grad_out.dtype, *ctx.saved_tensors)
            grad_x = grad_out @ W.T
        return (grad_x, None) + (None,) * len(ctx.layer.PACKED)


class PackedLinear(nn.Module):
    """y = x @ dequant(W) + bias for a packed layer of `bits` with `group_size` inputs per group.

    Subclasses register their packed buffers (`_buffer`), name them in `PACKED` (the order `weight_kn` takes
    them in) and implement `weight_kn`; `matmul` defaults to dequantize-then-GEMM."""

    PACKED: tuple[str, ...] = ()
    layout = ""  # how extra_repr names the on-disk layout

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size

    def _buffer(self, name: str, shape, dtype, device) -> None:
        self.register_buffer(name, torch.zeros(*shape, dtype=dtype, device=device))

    def _bias(self, bias: bool, dtype, device) -> None:
        if bias:
            self._buffer("bias", (self.out_features,), dtype, device)
        else:
            self.bias = None

    # peft's generic in/out detection looks for these (tuners_utils._get_in_out_features).
    @property
    def infeatures(self) -> int:
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    def packed(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.PACKED)

    def weight_kn(self, dtype: torch.dtype, *packed: torch.Tensor) -> torch.Tensor:
        """The float weight W [K, N] (y = x @ W) from the packed tensors, computed in fp32, rounded once to dtype."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, *packed: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ W -> [..., N] in x.dtype, without bias."""
        return x @ self.weight_kn(x.dtype, *packed)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight in nn.Linear layout [out_features, in_features]."""
        return self.weight_kn(dtype, *self.packed()).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects last dim {self.in_features}, got {tuple(x.shape)}")
        y = FrozenMatmul.apply(x, self, *self.packed())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, format={self.layout}, bias={self.bias is not None}")


# ------------------------------------------------------------------------------------------ reading checkpoints


def local_dir(path, what: str) -> Path:
    """A checkpoint spec (local dir, pkg:..., hub id) as a local directory."""
    local = Path(resolve_model_path(str(path), what=what))
    if local.exists():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path)))


def raw_quant_config(path, fallbacks: tuple[str, ...]) -> dict | None:
    """config.json's quantization_config of a model directory, else the first of the `fallbacks` files there
    (quantize_config.json, quant_config.json: older tools wrote only those); None when there is none."""
    path = Path(path)
    cfg = path / "config.json"
    if cfg.exists():
        raw = json.loads(cfg.read_text()).get("quantization_config")
        if raw is not None:
            return raw
    for name in fallbacks:
        if (path / name).exists():
            return json.loads((path / name).read_text())
    return None


def read_state(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                state[k] = fh.get_tensor(k)
    return state


def load_packed_model(path: Path, raw_qconfig: dict, make_layer: Callable[[str, nn.Linear, dict], nn.Module],
                      what: str, device=None, dtype=None) -> nn.Module:
    """The HF model of `path`'s config.json with every Linear that has a `qweight` in the checkpoint replaced by
    make_layer(name, linear, state) (built on the meta device), and the safetensors assigned directly (no
    random init, no copy). Tensors outside the packed layers are cast to `dtype` (default fp32 on CPU, fp16 on
    GPU); `make_layer` may adjust `state` for its layer. The model is returned on `device`, in eval mode.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device) if device else torch.device("cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)
    config = AutoConfig.from_pretrained(path)
    state = read_state(path)
    arch = describe(config)
    # The model's own names: a multimodal class's text part, Mixtral's v4 names (per-expert layers stay per expert)
    state = {arch.to_memory(k): t for k, t in state.items()}
    qnames = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not qnames:
        raise UserError(f"{path}: no '*.qweight' tensors, so no {what} layers to load")
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # otherwise transformers would hand the model to its own quantizer
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if arch.is_moe:  # per-expert Linears to take the per-expert packed layers
        defuse(model, lambda _path, spec, _mats: linear_experts(spec, None, device="meta"), arch)
    for name in qnames:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{path}: tensor {name}.qweight names no module of {type(model).__name__}") from None
        if not isinstance(old, nn.Linear):
            raise UserError(f"{path}: {name} is a {type(old).__name__}, not a Linear; cannot hold {what} weights")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make_layer(name, old, state))
    packed = set(qnames)
    for k, t in state.items():
        if t.is_floating_point() and k.rpartition(".")[0] not in packed:
            state[k] = t.to(dtype)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise UserError(f"{path}: tensors do not match the config: {str(e).splitlines()[-1].strip()}") from None
    if result.unexpected_keys:
        log.warning("%s: ignored %d tensors not in the model, e.g. %s", path, len(result.unexpected_keys),
                    result.unexpected_keys[:3])
    model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise UserError(f"{path}: checkpoint lacks {len(still_meta)} tensors, e.g. {still_meta[:3]}")
    model.config.quantization_config = raw_qconfig
    model.to(device)
    model.eval()
    return model


# ------------------------------------------------------------------------------------------ writing checkpoints


def quantizer_tag(tool: str = "qlora-finetune") -> str:
    """`<tool>:<version>`, what quantization_config.meta.quantizer records (as GPTQModel does)."""
    try:
        ver = version("qlora-finetune")
    except PackageNotFoundError:
        ver = "0"
    return f"{tool}:{ver}"


def write_quant_config(directory: Path, config_dict: dict | None, qconfig: dict) -> None:
    """config.json (when given) and quantize_config.json, repeated for AutoGPTQ/GPTQModel-style readers
    (docs/quantized-formats.md A6)."""
    if config_dict is not None:
        (directory / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    (directory / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))


def write_checkpoint(out_dir, tensors: dict[str, torch.Tensor], config_dict: dict, qconfig: dict,
                     extra_dir_writer=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write tensors + config.json + quantize_config.json to a staged directory renamed to out_dir when complete.

    `extra_dir_writer(tmp_dir)` adds files such as the tokenizer before the rename. An existing out_dir
    is replaced only after the new one is complete.
    """
    out = Path(out_dir)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with staged(out, need=disk_needed(total, max_shard_bytes)) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        try:
            for k, v in tensors.items():
                writer.add({k: v})
            writer.close()
        except BaseException:
            writer.abort()
            raise
        write_quant_config(tmp, dict(config_dict, quantization_config=qconfig), qconfig)
        if extra_dir_writer is not None:
            extra_dir_writer(tmp)
    return out


def with_router_kept(qconfig: dict, arch) -> dict:
    """A mixture of experts' quantization_config names its routers in modules_to_not_convert (16-bit, never packed;
    what transformers' GPTQ/AWQ configs and GPTQModel read), by their checkpoint names."""
    routers = [arch.to_disk(arch.part(i, arch.family.router.path)) for i, moe in enumerate(arch.moe_layers) if moe]
    return {**qconfig, "modules_to_not_convert": sorted(set(qconfig.get("modules_to_not_convert") or []) |
                                                        set(routers))}


def save_packed(model: nn.Module, out_dir, quant_method: str, refusal: str, tokenizer=None, dtype=torch.float16,
                report: dict | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` (quantized in memory, or loaded from a checkpoint) as a checkpoint directory of its
    quantization_config, which must say `quant_method` (else UserError `refusal`). Tensors of packed layers keep
    their format dtypes (int32, fp16 scales and bias); every other float tensor is written in `dtype`. Tied
    tensors (lm_head = embed_tokens) are written once, as transformers does. `report` goes to quant_log.json."""
    qconfig = getattr(model.config, "quantization_config", None)
    if hasattr(qconfig, "to_dict"):
        qconfig = qconfig.to_dict()
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != quant_method:
        raise UserError(refusal)
    qnames = {n for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    arch = architecture(model)
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            continue
        seen.add(ident)
        if key.rpartition(".")[0] not in qnames and t.is_floating_point():
            t = t.to(dtype)
        tensors.update(to_disk_tensors(arch, key, t) if arch is not None else [(key, t)])
    if arch is not None:
        qconfig = with_router_kept(qconfig, arch)
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = str(dtype).replace("torch.", "")
    config_dict.pop("torch_dtype", None)
    if not config_dict.get("architectures"):
        config_dict["architectures"] = [type(model).__name__]

    def extras(tmp: Path) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if report is not None:
            (tmp / "quant_log.json").write_text(json.dumps(report, indent=1))

    return write_checkpoint(out_dir, tensors, config_dict, qconfig, extras, max_shard_bytes)


# ------------------------------------------------------------------------------------------ the command


def _prepare(model_spec: str, out_dir, calib, calib_samples: int, calib_seqlen: int, text_field: str,
             calib_split: str, device, dtype, seed: int):
    """(float model, tokenizer, calibration chunks or None when `calib` is None, device). Refuses an --out that
    is the source directory."""
    from transformers import AutoTokenizer

    src = materialize(model_spec)
    if Path(out_dir).resolve() == Path(src).resolve():
        raise UserError(f"--out {out_dir} is the source model directory; choose another directory")
    tokenizer = AutoTokenizer.from_pretrained(src)
    chunks = None
    if calib is not None:
        texts = load_texts(calib, text_field=text_field, split=calib_split)
        chunks = calibration_chunks(texts, tokenizer, calib_samples, calib_seqlen, seed=seed)
        if len(chunks) < calib_samples:
            log.warning("calibration text holds only %d samples of %d tokens (asked for %d)",
                        len(chunks), calib_seqlen, calib_samples)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)
    return load_float_model(src, dtype=dtype), tokenizer, chunks, device


def quantize_to_dir(model_spec: str, out_dir, cfg, quantize_model: Callable, save: Callable, calib=None,
                    calib_samples: int = 128, calib_seqlen: int = 512, text_field: str = "text",
                    calib_split: str = "train", device=None, dtype=None, seed: int = 0, overwrite: bool = False,
                    **quantize_kwargs):
    """Load MODEL (HF dir, hub id, .gguf, pkg:...), `quantize_model(model, chunks, cfg, device=..., **kw)` it
    and `save(model, out_dir, tokenizer=..., report=...)` it; returns the report. `cfg` (validated) says whether
    calibration data is needed (`cfg.calibrated`).

    out_dir is held for the whole run (quant.files.claim_output): one writer at a time, leftovers of a killed
    earlier run undone, and an existing non-empty out_dir refused unless `overwrite`, which replaces it only
    once the new checkpoint is complete.
    """
    cfg.validate()
    if cfg.calibrated and not calib:
        raise UserError(f"--calib is required for --method {cfg.method} (a text/jsonl/parquet file, directory or "
                        "hub dataset)")
    with claim_output(out_dir, overwrite, action="quantization", inputs=source_inputs(model_spec, calib)):
        model, tokenizer, chunks, device = _prepare(model_spec, out_dir, calib if cfg.calibrated else None,
                                                    calib_samples, calib_seqlen, text_field, calib_split, device,
                                                    dtype, seed)
        report = quantize_model(model, chunks, cfg, device=device, **quantize_kwargs)
        save(model, out_dir, tokenizer=tokenizer, report=report)
    return report

"""`finetune merge`: adapter + base -> dequantize as trained -> add LoRA -> encode in the output format, streamed
one decoder layer at a time into a temporary directory that is renamed to --out only when the model, its config,
tokenizer and merge_report.json are all complete. The merge holds --out for its whole run (quant.files.claim_output:
one writer, what a killed earlier merge left undone, no silent replacement without --overwrite).

Both ends are format objects (quant.formats.registry): the base's format rebuilds the weights training saw, the
output format encodes the merged ones; nothing here depends on which formats they are.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from finetune.merge import exact
from finetune.merge import report as fidelity_report
from finetune.merge.adapter import MERGES_DIR, AdapterSource, RunFiles, locate, read_adapter
from finetune.merge.calibration import calibration_ids
from finetune.merge.config import MergeConfig
from finetune.merge.source import block_prefix, disk_tensors, plan_units, skeleton
from finetune.merge.stream import PeakMemory, check_adapter_fits, expert_shapes, stream_units
from finetune.merge.writers import write_config, write_extras
from finetune.recipe import DataConfig
from quant.arch import describe
from quant.errors import UserError
from quant.files import claim_output, disk_needed, staged, write_text
from quant.formats import registry as formats
from quant.formats.base import EncodeRequest, Format, Rebuilder, dtype_name
from quant.loading import local_path, materialize
from quant.model_checks import read_json_object
from quant.tensorfiles import Checkpoint

log = logging.getLogger(__name__)


class ScoringInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during the fidelity scoring: the merged model is complete in --out already."""


@dataclass
class MergeResult:
    out_dir: Path
    format: str
    base_quantization: str
    merge_into: str
    modules_merged: int
    seconds: float
    memory: dict
    report: dict  # everything in merge_report.json
    fidelity: dict | None = field(default=None)


def _source_checkpoint(source: AdapterSource, merge_into: str, base_original: str | None) -> Checkpoint:
    """The checkpoint streamed: the base as trained, or the full-precision weights for --merge-into original."""
    base_fmt = formats.format_of(source.base)
    if merge_into == "original":
        if base_fmt.folds_scales:
            raise UserError(f"--merge-into original is not possible for an adapter trained on {base_fmt.title}: the "
                            f"{base_fmt.title} base has per-channel scales folded into its norms and projections, so "
                            "the adapter's deltas are not in the original weights' coordinates; use --merge-into "
                            "dequantized (the default)")
        if base_original:
            ckpt = Checkpoint(materialize(base_original, "--base-original"), "--base-original")
        elif base_fmt.stored_quantized:
            raise UserError(f"--merge-into original on a {base_fmt.title}-trained adapter needs --base-original "
                            f"PATH: the full-precision model the {base_fmt.title} base was quantized from")
        else:
            ckpt = Checkpoint(source.base.model_dir)  # quantized while loading: its checkpoint is full precision
        if ckpt.quantization_config():
            raise UserError(f"{ckpt.path} is a quantized checkpoint "
                            f"({ckpt.quantization_config().get('quant_method')}); --merge-into original needs "
                            "the full-precision weights")
        return ckpt
    if base_original:
        raise UserError("--base-original is only used with --merge-into original")
    ckpt = Checkpoint(source.base.model_dir)
    formats.check_source(source.base, ckpt)
    return ckpt


def resolve_merge_into(merge_into: str, fmt: Format, base_fmt: Format) -> tuple[str, str]:
    """'auto': the dequantized weights, except when the output grid is the base's own (a bitsandbytes base
    requantized into its own format).

    Rounding (dequantized + delta) back onto the grid the dequantized weights came from returns almost every
    weight to the code it started from: a LoRA delta is typically ~20x smaller than an NF4 step (measured on
    the quickstart: 0 of 2.3M codes changed, retention 0.09). Rounding (original + delta) instead keeps the
    delta in expectation and reproduces the trained base wherever the delta is zero (retention 0.997).
    A base quantized while loading always has its full-precision checkpoint, so that path is free.
    """
    if merge_into != "auto":
        return merge_into, "as requested"
    if fmt.same_grid(base_fmt):
        return "original", (f"auto: the {fmt.name} output grid is the base's own, where rounding the dequantized "
                            "weights + delta would round the delta away")
    return "dequantized", "auto: the weights the adapter was trained against"


def _inputs(cfg: MergeConfig, run: RunFiles) -> list[tuple]:
    """Everything the merge reads, for the output rule (quant.files.check_target)."""
    calib = [(c, "--calib data") for c in cfg.calib or [] if not torch.is_tensor(c)]
    calib = [(local_path(str(c)), role) for c, role in calib]
    return [(run.adapter_dir, "the adapter"), (run.run_dir, "the run"), (cfg.adapter, "the adapter"),
            *[(p, "the base model") for p in run.base_paths()], (cfg.base and local_path(cfg.base), "--base"),
            (cfg.base_original and local_path(cfg.base_original), "--base-original"), *calib,
            (cfg.eval_data, "--eval data")]


def _calibration(cfg: MergeConfig, source: AdapterSource) -> list[torch.Tensor] | None:
    """Calibration token ids for the output format, where it takes them (see Format.calibration)."""
    if cfg.fmt.calibration(cfg.options) is None or not cfg.calib:  # a required one was checked by validate()
        return None
    if all(torch.is_tensor(c) for c in cfg.calib):  # Python API: token ids [1, T] already
        return [c.reshape(1, -1).long() for c in cfg.calib]
    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    return calibration_ids([str(c) for c in cfg.calib], tokenizer, source.data or DataConfig(), cfg.calib_samples,
                           cfg.calib_seqlen)


class _OutputSize:
    """The merged model's peak size on disk, extrapolated from the units written so far (what the no-space
    message reports as needed); None before the first decoder layer is written."""

    def __init__(self, n_units: int, max_shard_bytes: int):
        self.n_units, self.max_shard, self.writer, self.written = n_units, max_shard_bytes, None, []

    def unit_done(self) -> None:
        self.written.append(self.writer.total)

    def __call__(self) -> int | None:
        if len(self.written) < 2:
            return None
        per_layer = (self.written[-1] - self.written[0]) / (len(self.written) - 1)
        return disk_needed(int(self.written[0] + per_layer * (self.n_units - 1)), self.max_shard)


def _unreadable(fmt: Format, run: RunFiles) -> str | None:
    """Why the fidelity report will be skipped for this output (fmt.unreadable of the base's config.json, where a
    local base has one), else None."""
    for path in run.base_paths():
        config = read_json_object(Path(path) / "config.json")
        if config is not None:
            return fmt.unreadable(config)
    return None


def merge(cfg: MergeConfig, echo=print) -> MergeResult:
    """Merge the LoRA adapter `cfg.adapter` into its base and write a `cfg.format` model directory at `cfg.out`.

    `merge_into`: 'dequantized' adds the adapter to the weights it was trained against (the quantized base,
    dequantized); 'original' to the full-precision weights (a bnb base's float checkpoint, or `base_original` for
    a GPTQ base); 'auto' picks (see resolve_merge_into). `report`: measure fidelity on `eval_data` (default: the
    run's data.eval) and print the table.
    """
    cfg = cfg.validate()
    run = locate(cfg.adapter)
    if cfg.report and not _unreadable(cfg.fmt, run):  # before any model loads: a merge without eval data once
        fidelity_report.eval_plan(run.section(DataConfig, "data"), run.run_dir, cfg.eval_data)  # failed after ~50 s
    for spec in (str(c) for c in cfg.calib or [] if not torch.is_tensor(c)):
        if Path(spec).suffix and not Path(local_path(spec)).exists():
            raise UserError(f"--calib {spec}: no such file")
    inside_ok = [run.run_dir / MERGES_DIR] if run.run_dir else []
    with claim_output(cfg.out, cfg.overwrite, action="merge", inputs=_inputs(cfg, run), inside_ok=inside_ok):
        return _merge(cfg, run, echo)


def _merge(cfg: MergeConfig, run: RunFiles, echo) -> MergeResult:
    started = time.perf_counter()
    fmt, device = cfg.fmt, cfg.torch_device
    source = read_adapter(run, cfg.base, device)
    base_fmt = formats.format_of(source.base)
    out = cfg.out
    merge_into, merge_into_reason = resolve_merge_into(cfg.merge_into, fmt, base_fmt)
    ckpt = _source_checkpoint(source, merge_into, cfg.base_original)
    if exact.applies(source, cfg, merge_into):  # an exact-merge adapter into its own format: nothing requantized
        info = _report_header(cfg, source, ckpt, merge_into, exact.ROUTE, device)
        exact.write(cfg, source, ckpt, info, echo)
        fidelity = _score(cfg, source, out, info, f"{fmt.name}, exact", echo) if cfg.report else None
        return MergeResult(out, fmt.name, base_fmt.name, merge_into, len(source.loras),
                           time.perf_counter() - started, {}, info, fidelity)
    # Refuses an architecture without a description; the base reader (Rebuilder) gives the tensors under the
    # model's own names (a multimodal class's text part, Mixtral's v4 names, per-expert tensors stacked).
    arch = describe(ckpt.config)

    model = skeleton(ckpt.config)
    prefix, n_layers = block_prefix(model)
    fused = expert_shapes(model)
    weights = base_fmt.rebuilder(source.base, ckpt, model, device) if merge_into == "dequantized" \
        else Rebuilder(ckpt, device)
    check_adapter_fits(source.loras, lambda m: weights.weight_shape(m) or fused.get(m),
                       f"{weights.ckpt.path} ({n_layers} layers)")
    units = plan_units(ckpt.keys(), prefix, n_layers, arch)
    calib = _calibration(cfg, source)
    encoder = fmt.encoder(EncodeRequest(model, source.base, cfg.out_dtype, device, cfg.options, calib,
                                        source.tokenizer_dir))
    info = _report_header(cfg, source, ckpt, merge_into, merge_into_reason, device)
    described = encoder.describe()
    if described is not None:
        info[fmt.name] = {**described,
                          "calib": [str(c) if not torch.is_tensor(c) else "token ids" for c in cfg.calib]
                          if cfg.calib else None,
                          "calib_samples": len(calib) if calib else 0, "calib_seqlen": cfg.calib_seqlen}

    size = _OutputSize(len(units), cfg.max_shard_bytes)
    with staged(out, need=size, kind="merge") as tmp:
        writer = size.writer = encoder.sink(tmp, cfg.max_shard_bytes)
        # Tensors travel under the model's own names; a Hugging Face directory gets transformers' disk names.
        add = (lambda t: writer.add(disk_tensors(arch, t))) if encoder.hf_layout else writer.add
        try:
            bar = tqdm(total=len(units), desc=f"merge -> {fmt.name}", unit="layer", disable=not cfg.progress)
            stream_started = time.perf_counter()
            with PeakMemory(device) as mem:
                merged = stream_units(weights, units, source.loras, encoder, add,
                                      lambda u: (bar.update(1), size.unit_done()))
                writer.close()
            bar.close()
        except BaseException:
            writer.abort()
            raise
        merge_seconds = time.perf_counter() - started
        if encoder.hf_layout:
            write_config(tmp, ckpt.config, cfg.out_dtype, encoder.quantization_config())
            write_extras(tmp, source.tokenizer_dir, Path(source.base.model_dir))
        encoder.write_files(tmp)
        info.update(modules_merged=merged, merge_seconds=round(merge_seconds, 2),
                    stream_seconds=round(time.perf_counter() - stream_started, 2), memory=mem.as_dict(),
                    output_bytes=writer.total)
        unreadable = fmt.unreadable(ckpt.config) if cfg.report else None
        if unreadable:
            info["fidelity_skipped"] = unreadable
        fidelity_report.write_report(tmp / "merge_report.json", info)
    # The model is complete and in place before the fidelity evaluation loads anything: a user who stops the
    # scoring keeps it, and sees it at once.
    echo(f"merged {merged} modules of {source.adapter_dir} ({merge_into} weights, {merge_into_reason}) into "
         f"{fmt.name} in {merge_seconds:.1f}s "
         f"(peak RSS {mem.peak_rss / 2**20:.0f} MiB"
         + (f", GPU {mem.peak_gpu / 2**20:.0f} MiB" if mem.peak_gpu is not None else "") + f"); wrote {out}")
    if unreadable:
        echo(f"fidelity report skipped: {unreadable}")
    try:
        fidelity = _score(cfg, source, out, info, encoder.label or fmt.name, echo) \
            if cfg.report and not unreadable else None
    except KeyboardInterrupt:
        raise ScoringInterrupted from None
    return MergeResult(out, fmt.name, source.base.format, merge_into, merged, time.perf_counter() - started,
                       mem.as_dict(), info, fidelity)


def _score(cfg: MergeConfig, source: AdapterSource, out: Path, info: dict, label: str, echo) -> dict:
    """Fidelity of the merged model now in `out`, added to its merge_report.json; the table printed, a low
    retention warned about with what else to try, the report logged to W&B where the run configures it."""
    cap = fidelity_report.eval_cap(cfg.eval_max_batches, cfg.torch_device)
    echo(f"scoring the merge's fidelity: base, base + adapter and merged model on "
         f"{f'the first {cap} batches of ' if cap else ''}the held-out data"
         + (" (the CPU default; --eval-max-batches N to change)" if cap and cfg.eval_max_batches is None else ""))
    started = time.perf_counter()
    fidelity = fidelity_report.fidelity(source, out, cfg.fmt.name, cfg.torch_device, cfg.eval_data, cap,
                                        cfg.progress)
    fidelity["seconds"] = round(time.perf_counter() - started, 1)
    info["fidelity"] = fidelity
    write_text(out / "merge_report.json", fidelity_report.report_text(info))
    echo(fidelity_report.table(fidelity, label, source.base.format) + f"\nscored in {fidelity['seconds']:.0f} s")
    warning = fidelity_report.retention_warning(fidelity, cfg.fmt.name)
    if warning:
        log.warning(warning)
    try:
        fidelity_report.log_to_wandb(source, info, cfg.fmt.name)
    except Exception as e:  # the model and its report are already in place; tracking is best effort
        log.warning("W&B logging of the merge report failed: %s", e)
    return fidelity


def _report_header(cfg: MergeConfig, source: AdapterSource, ckpt: Checkpoint, merge_into: str, reason: str,
                   device: torch.device) -> dict:
    return {"adapter": str(source.adapter_dir), "base": source.base.model, "base_dir": str(ckpt.path),
            "base_quantization": source.base.format, "base_settings": source.base.settings,
            "merge_into": merge_into, "merge_into_reason": reason, "format": cfg.fmt.name,
            "dtype": dtype_name(cfg.out_dtype), "rebuild_dtype": source.base.compute_dtype, "device": str(device),
            "lora_rank": source.rank, "adapted_modules": len(source.loras)}

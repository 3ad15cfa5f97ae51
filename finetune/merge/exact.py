"""The exact merge of an exact-merge adapter (finetune.exact) into its own base format: no requantization.

Every tensor of the base checkpoint is copied as stored (scales, g_idx, biases, norms, embeddings: byte for
byte), except what the adapter's route changes in each adapted layer: `qzeros` (route 1: the zero points training
computed with; qweight stays the base's) or `qweight` (route 2: the codes training computed with; qzeros stays).
config.json and the format's own config files are the base's. The merged model
therefore computes what the adapter model computed, up to float rounding order, and the fidelity report measures
that (KL ~ 0, retention 1.000). It runs in the time it takes to copy the checkpoint.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from finetune.exact.factors import CodeFactors, ZeroPointFactors
from finetune.merge import report as fidelity_report
from finetune.merge.adapter import AdapterSource
from finetune.merge.config import MergeConfig
from finetune.merge.writers import write_extras
from quant.files import disk_needed, staged
from quant.tensorfiles import Checkpoint, ShardWriter

# The base's files that describe the checkpoint (kept: the qweight/scales they describe are the base's).
CONFIG_FILES = ("config.json", "quantize_config.json", "quant_config.json")
ROUTE = "exact: the adapter's zero points or codes, nothing requantized"


def applies(source: AdapterSource, cfg: MergeConfig, merge_into: str) -> bool:
    """A zero-point adapter merged into its base's own format, on the weights it was trained against, with no
    output settings asked for (those would need requantizing: the general path then does it)."""
    options = dataclasses.asdict(cfg.options) if dataclasses.is_dataclass(cfg.options) else {}
    return (bool(source.loras) and all(isinstance(f, (ZeroPointFactors, CodeFactors)) for f in source.loras.values())
            and cfg.fmt.name == source.base.format and merge_into == "dequantized"
            and all(v is None for v in options.values()))


def write(cfg: MergeConfig, source: AdapterSource, ckpt: Checkpoint, info: dict, echo) -> None:
    """Write the merged checkpoint to cfg.out (staged, renamed when complete) with merge_report.json, and fill
    `info` (the report); the fidelity is scored afterwards, on the model in place, as for every merge."""
    started = time.perf_counter()
    replaced = {f"{module}.{leaf}": t for module, f in source.loras.items() for leaf, t in f.packed().items()}
    total = sum(t.numel() * t.element_size() for t in replaced.values()) + sum(
        f.stat().st_size for f in Path(ckpt.path).glob("*.safetensors"))
    with staged(cfg.out, need=disk_needed(total, cfg.max_shard_bytes), kind="merge") as tmp:
        writer = ShardWriter(tmp, cfg.max_shard_bytes)
        try:
            for key in ckpt.keys():
                writer.add({key: replaced[key] if key in replaced else ckpt.get(key)})
            writer.close()
        except BaseException:
            writer.abort()
            raise
        for name in CONFIG_FILES:
            if (Path(ckpt.path) / name).is_file():
                shutil.copyfile(Path(ckpt.path) / name, tmp / name)
        write_extras(tmp, source.tokenizer_dir, Path(source.base.model_dir))
        seconds = time.perf_counter() - started
        moved = [f.moved() for f in source.loras.values()]
        what = "zero points" if isinstance(next(iter(source.loras.values())), ZeroPointFactors) else "codes"
        info.update(route=f"{what} (exact)", modules_merged=len(source.loras), merge_seconds=round(seconds, 2),
                    output_bytes=writer.total, moved=sum(m for m, _ in moved), of=sum(n for _, n in moved))
        fidelity_report.write_report(tmp / "merge_report.json", info)
    kept = "qweight and scales" if what == "zero points" else "scales and zero points"
    echo(f"merged {len(source.loras)} modules of {source.adapter_dir} into {cfg.fmt.name} by their {what} "
         f"({info['moved']} of {info['of']} moved; {kept} as the base's) in {seconds:.1f}s; wrote {cfg.out}")

"""GPTQModel / transformers <-> quant AWQ interoperability, run inside a throwaway venv that has GPTQModel.

    python3 -m venv /tmp/gptqmodel-venv && /tmp/gptqmodel-venv/bin/pip install torch==2.13.0
    /tmp/gptqmodel-venv/bin/pip install "gptqmodel==7.6.0" "torch==2.13.0"
    GPTQMODEL_CPU_WORKERS=2 /tmp/gptqmodel-venv/bin/python -m scripts.interop.interop_gptqmodel_awq --write-fixtures

1. Builds the tiny random Llama of scripts/interop/gptqmodel_common.py (hidden 128, one block), quantizes it with
   GPTQModel's AWQ (zero point g64, and its symmetric default g32, which still stores qzeros = 8) and with
   --write-fixtures stores both checkpoints plus GPTQModel's dequantized weights, layer outputs for fixed
   inputs and logits in tests/fixtures/gptqmodel_awq_tiny/ (a CPU test compares our loader against them).
2. Quantizes the same float model with OUR AWQ (g32, g64; awq and rtn), loads each checkpoint into GPTQModel
   and into transformers (its AWQ integration runs through GPTQModel's kernels; on CPU the torch one) and
   checks weights, layer outputs and logits against ours. One line per check; exit 1 on any mismatch.
--checkpoint DIR runs only the checks of 2. on an existing checkpoint of ours (e.g. SmolLM2 from `quant awq`),
   comparing transformers with our loader on real text.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from quant.awq.model import load_awq_model, quantize_model_awq, save_awq
from quant.awq.solver import AWQConfig
from quant.loading import load_float_model
from scripts.interop.gptqmodel_common import (BACKEND, GPTQModel, GPTQModelAWQConfig, arguments, calibration,
                                              calibration_ids, check_existing, compare_with_ours, dequantize_gemm,
                                              gptqmodel_model, gptqmodel_records, gptqmodel_writes, summary,
                                              transformers_check, work_dir)


def their_weight(mod) -> torch.Tensor:
    return dequantize_gemm(mod.qweight, mod.qzeros, mod.scales, mod.bits, mod.group_size).T.to(torch.float16)


def gptqmodel_quantize(src: Path, out: Path, **qkw) -> None:
    model = GPTQModel.load(str(src), GPTQModelAWQConfig(**qkw))
    # Its default packing kernel for AWQ gemm is CUDA-only; the torch kernel packs the same layout on CPU.
    model.quantize(calibration(), batch_size=1, backend=BACKEND.AWQ_TORCH)
    model.save(str(out))


def records(ckpt: Path) -> dict[str, torch.Tensor]:
    return gptqmodel_records(gptqmodel_model(ckpt, BACKEND.AWQ_TORCH), their_weight)


def compare(ckpt: Path, rec: dict[str, torch.Tensor], label: str) -> None:
    compare_with_ours(load_awq_model(ckpt, dtype=torch.float16), gptqmodel_model(ckpt, BACKEND.AWQ_TORCH),
                      their_weight, rec, label)


def our_quantize(src: Path, out: Path, **ckw) -> None:
    model = load_float_model(str(src))
    cfg = AWQConfig(**ckw)
    report = quantize_model_awq(model, calibration_ids() if cfg.calibrated else None, cfg, progress=False)
    save_awq(model, out, tokenizer=AutoTokenizer.from_pretrained(src), report=report)


def main() -> int:
    a = arguments(__doc__, "/tmp/interop-gptqmodel-awq", "gptqmodel_awq_tiny")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if a.checkpoint:
        return check_existing(Path(a.checkpoint), records, compare, load_awq_model)
    work, src = work_dir(a.work)

    # 1. GPTQModel writes, we read.
    variants = {"zp_g64": dict(bits=4, group_size=64, sym=False), "sym_g32": dict(bits=4, group_size=32, sym=True)}
    gptqmodel_writes(work, src, variants, gptqmodel_quantize, records, compare,
                     Path(a.fixtures) if a.write_fixtures else None)

    # 2. We write, GPTQModel and transformers read.
    ours = {"awq_g64": dict(group_size=64), "awq_g32_noclip": dict(group_size=32, clip=False),
            "rtn_g128": dict(group_size=128, method="rtn")}
    for name, ckw in ours.items():
        ckpt = work / f"ours-{name}"
        our_quantize(src, ckpt, **ckw)
        rec = records(ckpt)
        compare(ckpt, rec, f"ours {name} -> GPTQModel")
        transformers_check(ckpt, name, rec)
    return summary()


if __name__ == "__main__":
    sys.exit(main())

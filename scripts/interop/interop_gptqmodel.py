"""GPTQModel <-> quant interoperability, run inside a throwaway venv that has GPTQModel (never a project dependency).

    python -m venv /tmp/gptqm-venv && . /tmp/gptqm-venv/bin/activate
    pip install torch==2.13.0 && pip install "gptqmodel==7.6.0" "torch==2.13.0" optimum
    GPTQMODEL_CPU_WORKERS=2 python -m scripts.interop.interop_gptqmodel --write-fixtures

1. Builds a tiny random Llama (hidden 128, so GPTQModel's default kernels accept it) with a character
   tokenizer, quantizes it with GPTQModel in two variants (sym 4-bit g32 act-order v1; asym 4-bit g64
   gptq_v2), and with --write-fixtures stores both checkpoints plus GPTQModel's own dequantized weights,
   layer outputs for fixed inputs and model logits in tests/fixtures/gptqmodel_tiny/ (the CPU test
   compares our loader against them, so CI needs no GPTQModel).
2. Quantizes the same float model with OUR quantizer (sym v1 act-order, asym v2, 3-bit v1, and asym v1 with
   z >= 1, which GPTQModel refuses by policy for any sym=False v1 file it did not write),
   loads each checkpoint into GPTQModel and into transformers (GPTQ via optimum/gptqmodel) and checks that
   weights, layer outputs and logits match ours. Prints one line per check and exits 1 on any mismatch.
--checkpoint DIR runs only the checks of 2. on a checkpoint of ours that exists already (e.g. a real model from
   `quant gptq`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from quant.gptq.model import load_gptq_model, quantize_model, save_quantized
from quant.gptq.pack import V1
from quant.gptq.solver import GPTQConfig
from quant.loading import load_float_model
from scripts.interop.gptqmodel_common import (BACKEND, GPTQModel, QuantizeConfig, arguments, calibration,
                                              calibration_ids, check, check_existing, compare_with_ours,
                                              gptqmodel_model, gptqmodel_records, gptqmodel_writes, summary,
                                              transformers_check, work_dir)


def their_record(mod) -> torch.Tensor:
    """GPTQModel's dequantized weight as the fixtures hold it: [in, out]."""
    return mod.dequantize_weight().to(torch.float16)


def their_weight(mod) -> torch.Tensor:
    return their_record(mod).T


def gptqmodel_quantize(src: Path, out: Path, **qkw) -> None:
    model = GPTQModel.load(str(src), QuantizeConfig(**qkw))
    model.quantize(calibration(), batch_size=1)
    model.save(str(out))


def records(ckpt: Path) -> dict[str, torch.Tensor]:
    return gptqmodel_records(gptqmodel_model(ckpt, BACKEND.TORCH), their_record)


def compare(ckpt: Path, rec: dict[str, torch.Tensor], label: str) -> None:
    compare_with_ours(load_gptq_model(ckpt, dtype=torch.float16), gptqmodel_model(ckpt, BACKEND.TORCH), their_weight,
                      rec, label)


def our_quantize(src: Path, out: Path, fmt: str, **ckw) -> None:
    model = load_float_model(str(src))
    quantize_model(model, calibration_ids(), GPTQConfig(**ckw), checkpoint_format=fmt, progress=False)
    save_quantized(model, out, tokenizer=AutoTokenizer.from_pretrained(src))


def main() -> int:
    a = arguments(__doc__, "/tmp/interop-gptqmodel", "gptqmodel_tiny")
    if a.checkpoint:
        return check_existing(Path(a.checkpoint), records, compare, load_gptq_model)
    work, src = work_dir(a.work)

    # 1. GPTQModel writes, we read.
    variants = {
        "sym_g32_actorder_v1": dict(bits=4, group_size=32, desc_act=True, sym=True, format="gptq"),
        "asym_g64_v2": dict(bits=4, group_size=64, desc_act=False, sym=False, format="gptq_v2"),
    }
    gptqmodel_writes(work, src, variants, gptqmodel_quantize, records, compare,
                     Path(a.fixtures) if a.write_fixtures else None)

    # 2. We write, GPTQModel and transformers read.
    ours = {
        "sym_g32_actorder_v1": ("gptq", dict(bits=4, group_size=32, desc_act=True, sym=True)),
        "asym_g64_v1": ("gptq", dict(bits=4, group_size=64, sym=False)),
        "asym_g64_v2": ("gptq_v2", dict(bits=4, group_size=64, sym=False)),
        "sym_3bit_g32_v1": ("gptq", dict(bits=3, group_size=32, sym=True)),
    }
    for name, (fmt, ckw) in ours.items():
        ckpt = work / f"ours-{name}"
        our_quantize(src, ckpt, fmt, **ckw)
        try:
            rec = records(ckpt)  # what GPTQModel computes from our files
        except ValueError as e:
            # GPTQModel refuses every sym=False v1 checkpoint it did not write itself (models/loader.py),
            # which is why our default for asymmetric grids is gptq_v2.
            expected = not ckw.get("sym", True) and fmt == V1 and "sym=False" in str(e)
            check(f"ours {name} -> GPTQModel: refused by its v1-asym policy", expected, str(e).splitlines()[0][:90])
            continue
        compare(ckpt, rec, f"ours {name} -> GPTQModel")
        transformers_check(ckpt, name, rec)
    return summary()


if __name__ == "__main__":
    sys.exit(main())

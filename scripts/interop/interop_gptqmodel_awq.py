"""GPTQModel / transformers <-> quant AWQ interoperability, run inside a throwaway venv that has GPTQModel.

    python3 -m venv /tmp/gptqmodel-venv && /tmp/gptqmodel-venv/bin/pip install torch==2.13.0
    /tmp/gptqmodel-venv/bin/pip install "gptqmodel==7.6.0" "torch==2.13.0"
    GPTQMODEL_CPU_WORKERS=2 /tmp/gptqmodel-venv/bin/python -m scripts.interop.interop_gptqmodel_awq --write-fixtures

1. Builds the tiny random Llama of scripts/interop/interop_gptqmodel.py (hidden 128, one block), quantizes it with
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

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from scripts.interop.interop_gptqmodel import (
    FAILED,
    build_float_model,
    calibration,
    check,
    fixed_inputs,
    transformers_logits,
    transformers_on_text,
)

RECORD_WEIGHTS = ("self_attn.k_proj",)


def gptqmodel_quantize(src: Path, out: Path, **qkw) -> None:
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization import AWQConfig

    model = GPTQModel.load(str(src), AWQConfig(**qkw))
    # Its default packing kernel for AWQ gemm is CUDA-only; the torch kernel packs the same layout on CPU.
    model.quantize(calibration(), batch_size=1, backend=BACKEND.AWQ_TORCH)
    model.save(str(out))


def _gptqmodel(ckpt: Path):
    from gptqmodel import BACKEND, GPTQModel

    # GPTQModel's AWQ torch kernel runs in fp16/bf16 only, so the reference numbers are fp16.
    return GPTQModel.load(str(ckpt), backend=BACKEND.AWQ_TORCH, device="cpu", dtype=torch.float16).model


def _their_weight(mod) -> torch.Tensor:
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(mod.qweight, mod.qzeros, mod.scales, mod.bits, mod.group_size).T.to(torch.float16)


def gptqmodel_records(ckpt: Path) -> dict[str, torch.Tensor]:
    """GPTQModel's own view of a checkpoint: dequantized weights, layer outputs, logits."""
    model = _gptqmodel(ckpt)
    rec = {}
    qmods = [(n, m) for n, m in model.named_modules() if hasattr(m, "qweight") and hasattr(m, "qzeros")]
    with torch.no_grad():
        for i, (name, mod) in enumerate(qmods):
            x = fixed_inputs(mod.in_features, i).half()
            rec[f"{name}.x"] = x
            if name.endswith(RECORD_WEIGHTS):
                rec[f"{name}.w"] = _their_weight(mod).contiguous()
            rec[f"{name}.y"] = mod(x)
        ids = torch.arange(3, 3 + 40).unsqueeze(0)
        rec["input_ids"] = ids
        rec["logits"] = model(input_ids=ids).logits
    return rec


def compare_with_ours(ckpt: Path, rec: dict[str, torch.Tensor], label: str) -> None:
    from quant.awq.model import load_awq_model
    from quant.awq.nn import AWQLinear

    ours = load_awq_model(ckpt, dtype=torch.float16)
    theirs = _gptqmodel(ckpt)
    worst_w = worst_y = 0.0
    n = 0
    with torch.no_grad():
        for name, mod in ours.named_modules():
            if not isinstance(mod, AWQLinear):
                continue
            n += 1
            w = mod.dequantize(torch.float16)
            worst_w = max(worst_w, (w.float() - _their_weight(theirs.get_submodule(name)).float()).abs().max().item())
            y = mod(rec[f"{name}.x"]).float()
            ref = rec[f"{name}.y"].float()
            worst_y = max(worst_y, ((y - ref).abs().max() / ref.abs().max()).item())
        logits = ours(input_ids=rec["input_ids"]).logits.float()
    ref = rec["logits"].float()
    dl = ((logits - ref).abs().max() / ref.abs().max()).item()
    check(f"{label}: {n} layers, dequantized weights identical", n > 0 and worst_w == 0.0, f"max |dW| {worst_w:.2e}")
    check(f"{label}: layer outputs (fp16)", worst_y < 2e-3, f"max rel. diff {worst_y:.2e}")
    check(f"{label}: logits (fp16)", dl < 5e-3, f"max rel. diff {dl:.2e}")


def our_quantize(src: Path, out: Path, **ckw) -> None:
    from transformers import AutoTokenizer

    from quant.awq.solver import AWQConfig
    from quant.awq.model import quantize_model_awq, save_awq
    from quant.loading import load_float_model

    model = load_float_model(str(src))
    calib = [torch.tensor(r["input_ids"]).unsqueeze(0) for r in calibration()]
    cfg = AWQConfig(**ckw)
    report = quantize_model_awq(model, calib if cfg.calibrated else None, cfg, progress=False)
    save_awq(model, out, tokenizer=AutoTokenizer.from_pretrained(src), report=report)


def reader_checks(ckpt: Path, name: str) -> None:
    """Our checkpoint read by GPTQModel (weights, layer outputs, logits vs ours) and by transformers (logits)."""
    rec = gptqmodel_records(ckpt)
    compare_with_ours(ckpt, rec, f"ours {name} -> GPTQModel")
    try:
        tl = transformers_logits(ckpt, rec["input_ids"])
        ref = rec["logits"].float()
        d = ((tl - ref).abs().max() / ref.abs().max()).item()
        check(f"ours {name} -> transformers: logits (fp16)", d < 5e-3, f"max rel. diff vs GPTQModel {d:.2e}")
    except Exception as e:  # report and go on: one loader failing must not hide the others
        check(f"ours {name} -> transformers: loads", False, f"{type(e).__name__}: {str(e).splitlines()[0]}")


def write_fixture(ckpt: Path, rec: dict, dest: Path) -> None:
    from safetensors.torch import save_file

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in ("model.safetensors", "config.json", "quantize_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (ckpt / f).exists():
            shutil.copy(ckpt / f, dest / f)
    save_file({k: v.contiguous() for k, v in rec.items()}, str(dest / "gptqmodel_outputs.safetensors"))
    for f in dest.iterdir():
        f.chmod(0o644)
    print(f"wrote fixture {dest}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/interop-gptqmodel-awq")
    ap.add_argument("--fixtures", default=str(ROOT / "tests" / "fixtures" / "gptqmodel_awq_tiny"))
    ap.add_argument("--write-fixtures", action="store_true")
    ap.add_argument("--checkpoint", help="only check this existing AWQ checkpoint of ours against GPTQModel/transformers")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if a.checkpoint:
        ckpt = Path(a.checkpoint)
        compare_with_ours(ckpt, gptqmodel_records(ckpt), f"ours {ckpt.name} -> GPTQModel")
        from quant.awq.model import load_awq_model

        transformers_on_text(ckpt, ckpt.name, load_awq_model)
        print(f"\n{'all checks passed' if not FAILED else 'FAILED: ' + '; '.join(FAILED)}")
        return 1 if FAILED else 0

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "float"
    build_float_model(src)

    # 1. GPTQModel writes, we read.
    variants = {"zp_g64": dict(bits=4, group_size=64, sym=False), "sym_g32": dict(bits=4, group_size=32, sym=True)}
    for name, qkw in variants.items():
        ckpt = work / f"gptqmodel-{name}"
        gptqmodel_quantize(src, ckpt, **qkw)
        rec = gptqmodel_records(ckpt)
        compare_with_ours(ckpt, rec, f"GPTQModel {name} -> ours")
        if a.write_fixtures:
            write_fixture(ckpt, rec, Path(a.fixtures) / name)

    # 2. We write, GPTQModel and transformers read.
    ours = {"awq_g64": dict(group_size=64), "awq_g32_noclip": dict(group_size=32, clip=False),
            "rtn_g128": dict(group_size=128, method="rtn")}
    for name, ckw in ours.items():
        ckpt = work / f"ours-{name}"
        our_quantize(src, ckpt, **ckw)
        reader_checks(ckpt, name)

    print(f"\n{'all checks passed' if not FAILED else 'FAILED: ' + '; '.join(FAILED)}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

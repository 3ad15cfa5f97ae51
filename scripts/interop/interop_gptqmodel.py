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

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402

from quant.gptq.pack import V1  # noqa: E402

CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'-\n0123456789"
FAILED: list[str] = []


def check(label: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {label}  {detail}", flush=True)
    if not ok:
        FAILED.append(label)


def build_float_model(out: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    # One block keeps the committed fixture small; the block-by-block driver is tested elsewhere.
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # fp16-representable, so saving in fp16 loses nothing
            p.copy_(p.half().float())
    model.save_pretrained(out)
    tok.save_pretrained(out)


def calibration(n: int = 32, seqlen: int = 128) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 3 + len(CHARS), (seqlen,), generator=g)
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * seqlen})
    return rows


def fixed_inputs(k: int, seed: int) -> torch.Tensor:
    return torch.randn(3, k, generator=torch.Generator().manual_seed(seed))


# Dequantized weights are recorded for these layers only (to keep the fixture small); all layers are
# compared through their outputs, and weights are compared in full for the checkpoints at hand.
RECORD_WEIGHTS = ("self_attn.k_proj",)


def gptqmodel_quantize(src: Path, out: Path, **qkw) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(str(src), QuantizeConfig(**qkw))
    model.quantize(calibration(), batch_size=1)
    model.save(str(out))


def gptqmodel_records(ckpt: Path) -> dict[str, torch.Tensor]:
    """GPTQModel's own view of a checkpoint: dequantized weights, layer outputs, logits."""
    from gptqmodel import BACKEND, GPTQModel

    # GPTQModel's torch kernel runs only in fp16/bf16, so the reference numbers are fp16.
    model = GPTQModel.load(str(ckpt), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    rec = {}
    qmods = [(n, m) for n, m in model.model.named_modules() if hasattr(m, "qweight") and hasattr(m, "dequantize_weight")]
    with torch.no_grad():
        for i, (name, mod) in enumerate(qmods):
            x = fixed_inputs(mod.in_features, i).half()
            rec[f"{name}.x"] = x
            if name.endswith(RECORD_WEIGHTS):
                rec[f"{name}.w"] = mod.dequantize_weight().to(torch.float16).contiguous()
            rec[f"{name}.y"] = mod(x)
        ids = torch.arange(3, 3 + 40).unsqueeze(0)
        rec["input_ids"] = ids
        rec["logits"] = model.model(input_ids=ids).logits
    return rec


def compare_with_ours(ckpt: Path, rec: dict[str, torch.Tensor], label: str) -> None:
    from quant.gptq.model import load_gptq_model
    from quant.gptq.nn import QuantLinear

    ours = load_gptq_model(ckpt, dtype=torch.float16)
    from gptqmodel import BACKEND, GPTQModel

    theirs = GPTQModel.load(str(ckpt), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
    worst_w, worst_y = 0.0, 0.0
    n = 0
    with torch.no_grad():
        for name, mod in ours.named_modules():
            if not isinstance(mod, QuantLinear):
                continue
            n += 1
            w = mod.dequantize(torch.float16).T
            w_theirs = theirs.get_submodule(name).dequantize_weight().to(torch.float16)
            worst_w = max(worst_w, (w.float() - w_theirs.float()).abs().max().item())
            y = mod(rec[f"{name}.x"]).float()
            ref = rec[f"{name}.y"].float()
            worst_y = max(worst_y, ((y - ref).abs().max() / ref.abs().max()).item())
        logits = ours(input_ids=rec["input_ids"]).logits.float()
    ref = rec["logits"].float()
    dl = ((logits - ref).abs().max() / ref.abs().max()).item()
    check(f"{label}: {n} layers, dequantized weights identical", n > 0 and worst_w == 0.0, f"max |dW| {worst_w:.2e}")
    check(f"{label}: layer outputs (fp16)", worst_y < 2e-3, f"max rel. diff {worst_y:.2e}")
    check(f"{label}: logits (fp16)", dl < 5e-3, f"max rel. diff {dl:.2e}")


def our_quantize(src: Path, out: Path, fmt: str, **ckw) -> None:
    from quant.gptq.solver import GPTQConfig
    from quant.loading import load_float_model
    from quant.gptq.model import quantize_model, save_quantized

    model = load_float_model(str(src))
    calib = [torch.tensor(r["input_ids"]).unsqueeze(0) for r in calibration()]
    quantize_model(model, calib, GPTQConfig(**ckw), checkpoint_format=fmt, progress=False)
    from transformers import AutoTokenizer

    save_quantized(model, out, tokenizer=AutoTokenizer.from_pretrained(src))


def transformers_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), device_map="cpu", dtype=torch.float16)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def reader_checks(ckpt: Path, name: str, rec: dict[str, torch.Tensor] | None = None) -> None:
    """Our checkpoint read by GPTQModel (weights, layer outputs, logits vs ours) and by transformers (logits)."""
    rec = rec if rec is not None else gptqmodel_records(ckpt)
    compare_with_ours(ckpt, rec, f"ours {name} -> GPTQModel")
    try:
        tl = transformers_logits(ckpt, rec["input_ids"])
        ref = rec["logits"].float()
        d = ((tl - ref).abs().max() / ref.abs().max()).item()
        check(f"ours {name} -> transformers: logits (fp16)", d < 5e-3, f"max rel. diff vs GPTQModel {d:.2e}")
    except Exception as e:  # report and go on: one loader failing must not hide the others
        check(f"ours {name} -> transformers: loads", False, f"{type(e).__name__}: {str(e).splitlines()[0]}")


def transformers_on_text(ckpt: Path, name: str, load=None) -> None:
    """transformers vs our loader (`load`, default load_gptq_model) on real text. The GPTQ kernel transformers
    picks on CPU (GPTQModel's TorchAten) rounds scales to bf16, ~0.5 % per layer; on junk token ids a real
    model's outlier activations amplify that into large max-logit differences, so a real model is compared by
    what a user sees."""
    from transformers import AutoTokenizer

    from quant.gptq.model import load_gptq_model

    load = load or load_gptq_model
    text = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
            "arrows of outrageous fortune, or to take arms against a sea of troubles.")
    ids = AutoTokenizer.from_pretrained(ckpt)(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = load(ckpt, dtype=torch.float16)(input_ids=ids).logits.float()
    theirs = transformers_logits(ckpt, ids)
    nll = [torch.nn.functional.cross_entropy(l[0, :-1], ids[0, 1:]).item() for l in (ours, theirs)]
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    check(f"ours {name} -> transformers: next-token loss on text", abs(nll[0] - nll[1]) < 0.01 * nll[0],
          f"ours {nll[0]:.4f}, transformers {nll[1]:.4f}")
    check(f"ours {name} -> transformers: greedy next tokens", agree >= 0.95, f"{agree:.0%} agree")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/interop-gptqmodel")
    ap.add_argument("--fixtures", default=str(ROOT / "tests" / "fixtures" / "gptqmodel_tiny"))
    ap.add_argument("--write-fixtures", action="store_true")
    ap.add_argument("--checkpoint", help="only check this existing checkpoint of ours against GPTQModel/transformers")
    a = ap.parse_args()
    if a.checkpoint:
        ckpt = Path(a.checkpoint)
        compare_with_ours(ckpt, gptqmodel_records(ckpt), f"ours {ckpt.name} -> GPTQModel")
        transformers_on_text(ckpt, ckpt.name)
        print(f"\n{'all checks passed' if not FAILED else 'FAILED: ' + '; '.join(FAILED)}")
        return 1 if FAILED else 0
    from safetensors.torch import save_file

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "float"
    build_float_model(src)

    # 1. GPTQModel writes, we read.
    variants = {
        "sym_g32_actorder_v1": dict(bits=4, group_size=32, desc_act=True, sym=True, format="gptq"),
        "asym_g64_v2": dict(bits=4, group_size=64, desc_act=False, sym=False, format="gptq_v2"),
    }
    for name, qkw in variants.items():
        ckpt = work / f"gptqmodel-{name}"
        gptqmodel_quantize(src, ckpt, **qkw)
        rec = gptqmodel_records(ckpt)
        compare_with_ours(ckpt, rec, f"GPTQModel {name} -> ours")
        if a.write_fixtures:
            dest = Path(a.fixtures) / name
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            for f in ("model.safetensors", "config.json", "quantize_config.json", "tokenizer.json",
                      "tokenizer_config.json"):
                if (ckpt / f).exists():
                    shutil.copy(ckpt / f, dest / f)
            save_file({k: v.contiguous() for k, v in rec.items()}, str(dest / "gptqmodel_outputs.safetensors"))
            for f in dest.iterdir():
                f.chmod(0o644)
            print(f"wrote fixture {dest}")

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
            rec = gptqmodel_records(ckpt)  # what GPTQModel computes from our files
        except ValueError as e:
            # GPTQModel refuses every sym=False v1 checkpoint it did not write itself (models/loader.py),
            # which is why our default for asymmetric grids is gptq_v2.
            expected = not ckw.get("sym", True) and fmt == V1 and "sym=False" in str(e)
            check(f"ours {name} -> GPTQModel: refused by its v1-asym policy", expected, str(e).splitlines()[0][:90])
            continue
        reader_checks(ckpt, name, rec)

    print(f"\n{'all checks passed' if not FAILED else 'FAILED: ' + '; '.join(FAILED)}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

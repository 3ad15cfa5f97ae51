"""What the GPTQ and AWQ interoperability checks against GPTQModel share (scripts/interop/interop_gptqmodel.py,
interop_gptqmodel_awq.py): the tiny float model and its calibration rows, GPTQModel's records of a checkpoint,
the comparison of our loader with them, transformers as a third reader, and the fixture files.

GPTQModel is never a project dependency: these scripts run in a throwaway venv that has it, and this is the one
module that imports it (GPTQMODEL_CPU_WORKERS must be set before it is imported).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Callable

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from gptqmodel import BACKEND, GPTQModel, QuantizeConfig  # noqa: E402, F401  (the scripts take them from here)
from gptqmodel.quantization import AWQConfig as GPTQModelAWQConfig  # noqa: E402, F401
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm  # noqa: E402, F401
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          PreTrainedTokenizerFast)

ROOT = Path(__file__).resolve().parents[2]
CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'-\n0123456789"
# Dequantized weights are recorded for these layers only (to keep the fixture small); all layers are
# compared through their outputs, and weights are compared in full for the checkpoints at hand.
RECORD_WEIGHTS = ("self_attn.k_proj",)
FAILED: list[str] = []


def check(label: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {label}  {detail}", flush=True)
    if not ok:
        FAILED.append(label)


def summary() -> int:
    print(f"\n{'all checks passed' if not FAILED else 'FAILED: ' + '; '.join(FAILED)}")
    return 1 if FAILED else 0


def build_float_model(out: Path) -> None:
    """A tiny random Llama (hidden 128, so GPTQModel's default kernels accept it) with a character tokenizer."""
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


def calibration_ids() -> list[torch.Tensor]:
    """The same rows as token-id tensors [1, T], for our quantizers."""
    return [torch.tensor(r["input_ids"]).unsqueeze(0) for r in calibration()]


def fixed_inputs(k: int, seed: int) -> torch.Tensor:
    return torch.randn(3, k, generator=torch.Generator().manual_seed(seed))


def gptqmodel_model(ckpt: Path, backend) -> torch.nn.Module:
    """GPTQModel's own model of a checkpoint. Its torch kernels run in fp16/bf16 only, so the reference is fp16."""
    return GPTQModel.load(str(ckpt), backend=backend, device="cpu", dtype=torch.float16).model


def gptqmodel_records(model: torch.nn.Module, record_weight: Callable) -> dict[str, torch.Tensor]:
    """GPTQModel's view of a checkpoint: dequantized weights of RECORD_WEIGHTS (`record_weight(layer)`, in the
    layout the fixtures hold), layer outputs for fixed inputs, logits."""
    rec = {}
    qmods = [(n, m) for n, m in model.named_modules() if hasattr(m, "qweight") and hasattr(m, "qzeros")]
    with torch.no_grad():
        for i, (name, mod) in enumerate(qmods):
            x = fixed_inputs(mod.in_features, i).half()
            rec[f"{name}.x"] = x
            if name.endswith(RECORD_WEIGHTS):
                rec[f"{name}.w"] = record_weight(mod).contiguous()
            rec[f"{name}.y"] = mod(x)
        ids = torch.arange(3, 3 + 40).unsqueeze(0)
        rec["input_ids"] = ids
        rec["logits"] = model(input_ids=ids).logits
    return rec


def compare_with_ours(ours: torch.nn.Module, theirs: torch.nn.Module, their_weight: Callable,
                      rec: dict[str, torch.Tensor], label: str) -> None:
    """Our loaded model (its packed layers) against GPTQModel's (`their_weight(layer)`: its weight [out, in]):
    weights bit for bit, layer outputs and logits."""
    worst_w = worst_y = 0.0
    n = 0
    with torch.no_grad():
        for name, mod in ours.named_modules():
            if not hasattr(mod, "qweight"):
                continue
            n += 1
            w = mod.dequantize(torch.float16)
            worst_w = max(worst_w, (w.float() - their_weight(theirs.get_submodule(name)).float()).abs().max().item())
            y = mod(rec[f"{name}.x"]).float()
            ref = rec[f"{name}.y"].float()
            worst_y = max(worst_y, ((y - ref).abs().max() / ref.abs().max()).item())
        logits = ours(input_ids=rec["input_ids"]).logits.float()
    ref = rec["logits"].float()
    dl = ((logits - ref).abs().max() / ref.abs().max()).item()
    check(f"{label}: {n} layers, dequantized weights identical", n > 0 and worst_w == 0.0, f"max |dW| {worst_w:.2e}")
    check(f"{label}: layer outputs (fp16)", worst_y < 2e-3, f"max rel. diff {worst_y:.2e}")
    check(f"{label}: logits (fp16)", dl < 5e-3, f"max rel. diff {dl:.2e}")


def transformers_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), device_map="cpu", dtype=torch.float16)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def transformers_check(ckpt: Path, name: str, rec: dict[str, torch.Tensor]) -> None:
    """Our checkpoint read by transformers: its logits against GPTQModel's."""
    try:
        tl = transformers_logits(ckpt, rec["input_ids"])
        ref = rec["logits"].float()
        d = ((tl - ref).abs().max() / ref.abs().max()).item()
        check(f"ours {name} -> transformers: logits (fp16)", d < 5e-3, f"max rel. diff vs GPTQModel {d:.2e}")
    except Exception as e:  # report and go on: one loader failing must not hide the others
        check(f"ours {name} -> transformers: loads", False, f"{type(e).__name__}: {str(e).splitlines()[0]}")


def transformers_on_text(ckpt: Path, name: str, load: Callable) -> None:
    """transformers vs our loader `load` on real text. The kernels transformers picks on CPU (GPTQModel's) round
    scales to bf16, ~0.5 % per layer; on junk token ids a real model's outlier activations amplify that into large
    max-logit differences, so a real model is compared by what a user sees."""
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


def write_fixture(ckpt: Path, rec: dict, dest: Path) -> None:
    """The checkpoint's files and GPTQModel's records as a test fixture (read by the CPU tests, which need no
    GPTQModel)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in ("model.safetensors", "config.json", "quantize_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (ckpt / f).exists():
            shutil.copy(ckpt / f, dest / f)
    save_file({k: v.contiguous() for k, v in rec.items()}, str(dest / "gptqmodel_outputs.safetensors"))
    for f in dest.iterdir():
        f.chmod(0o644)
    print(f"wrote fixture {dest}")


def arguments(doc: str, work: str, fixtures: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--work", default=work)
    ap.add_argument("--fixtures", default=str(ROOT / "tests" / "fixtures" / fixtures))
    ap.add_argument("--write-fixtures", action="store_true")
    ap.add_argument("--checkpoint", help="only check this existing checkpoint of ours against GPTQModel/transformers")
    return ap.parse_args()


def check_existing(ckpt: Path, records: Callable, compare: Callable, load: Callable) -> int:
    """--checkpoint: an existing checkpoint of ours read by GPTQModel and, on real text, by transformers."""
    compare(ckpt, records(ckpt), f"ours {ckpt.name} -> GPTQModel")
    transformers_on_text(ckpt, ckpt.name, load)
    return summary()


def work_dir(path: str) -> tuple[Path, Path]:
    """A fresh work directory and the tiny float model built in it."""
    work = Path(path)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build_float_model(work / "float")
    return work, work / "float"


def gptqmodel_writes(work: Path, src: Path, variants: dict, quantize: Callable, records: Callable,
                     compare: Callable, fixtures: Path | None) -> None:
    """Step 1: GPTQModel quantizes `src` in each variant, we read its checkpoint; with `fixtures`, each checkpoint
    and GPTQModel's records of it are stored there."""
    for name, qkw in variants.items():
        ckpt = work / f"gptqmodel-{name}"
        quantize(src, ckpt, **qkw)
        rec = records(ckpt)
        compare(ckpt, rec, f"GPTQModel {name} -> ours")
        if fixtures is not None:
            write_fixture(ckpt, rec, fixtures / name)

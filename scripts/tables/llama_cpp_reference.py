"""llama.cpp as the reference for scripts/tables/gguf_table.py: perplexity of a .gguf file as llama.cpp computes
it, and llama.cpp's own quantizer. llama-cpp-python is optional (not a project dependency); this is the one module
of the scripts that imports it.
"""

from __future__ import annotations

import ctypes
import math
import time
from pathlib import Path

import llama_cpp
import numpy as np
import torch


def llama_cpp_ppl(path: Path, streams, seqlen: int, chunks: int, threads: int) -> float:
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=seqlen, n_batch=seqlen, n_threads=threads, verbose=False)
    nll, count = 0.0, 0
    try:
        for ids in streams:
            for c in range(chunks):
                x = ids[c * seqlen : (c + 1) * seqlen].tolist()
                llm.reset()
                llm.eval(x)
                s = torch.from_numpy(np.array(llm.scores[:seqlen])).double()
                nll -= torch.log_softmax(s[:-1], -1).gather(1, torch.tensor(x[1:]).unsqueeze(1)).sum().item()
                count += seqlen - 1
    finally:
        llm.close()
    return math.exp(nll / count)


def llama_cpp_quantize(src: Path, dst: Path, gguf_type: str, threads: int, imatrix: dict | None) -> float:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = threads
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for e, (name, values) in zip(entries, imatrix.items()):
            arr = np.ascontiguousarray(values.numpy(), dtype=np.float32)
            keep.append(arr)
            e.name, e.data, e.size = name.encode(), arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), arr.size
        params.imatrix = entries
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp failed to quantize {src} to {gguf_type}")
    return time.perf_counter() - t0

"""What the quantizer benchmarks share (scripts/bench/bench_gptq.py, bench_awq.py): a Llama-3.1-8B-shaped model
with random weights built in bf16 from a config (speed and memory do not depend on the weights' values), random
calibration tokens, the quantizer's own flags (generated from its config, so the defaults are `quant gptq` /
`quant awq`'s), and the timing and memory helpers.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from quant.settings import add_flags

LLAMA31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)


def arguments(doc: str, config_cls, layers: int) -> argparse.ArgumentParser:
    """The common flags and the quantizer's own (its config's fields)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--layers", type=int, default=layers, help="decoder blocks to build and quantize (of 32)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU too: checks the script itself")
    add_flags(ap.add_argument_group("quantizer"), config_cls)
    return ap


def device(a: argparse.Namespace, script: str) -> str:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not a.smoke:
        raise SystemExit(f"{script} needs a CUDA GPU (or --smoke)")
    return dev


def build(a: argparse.Namespace, dev: str):
    """(model, its config, a copy of block 0's down_proj weight): the model built on `dev` in bf16 directly (an
    fp32 8B model would need 32 GB first); --smoke shrinks the shapes and the calibration."""
    torch.manual_seed(0)
    shape = dict(LLAMA31_8B, num_hidden_layers=a.layers)
    if a.smoke:
        shape.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=1024)
        a.calib_samples, a.calib_seqlen = min(a.calib_samples, 4), min(a.calib_seqlen, 64)
    cfg = LlamaConfig(**shape)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    sync(dev)
    return model, cfg, model.model.layers[0].mlp.down_proj.weight.detach().clone()


def random_calibration(cfg, samples: int, seqlen: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, cfg.vocab_size, (1, seqlen), generator=g) for _ in range(samples)]


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3

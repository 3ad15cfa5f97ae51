"""Decode (one token at a time) on quantized models: our packed GPTQ / AWQ layers against the same model in bf16.

    python -m scripts.bench.bench_decode                          # layers, then the whole Llama-3.1-8B shape
    python -m scripts.bench.bench_decode --layers 4 --sweep       # a 4-layer model, every kernel configuration
    python -m scripts.bench.bench_decode --skip-model             # the layer table only
    python -m scripts.bench.bench_decode --projections down_proj --layers 4 --tokens 32   # one projection, short

Layer table: x of one row (bf16) times each projection of the 8B shape: dense bf16 (F.linear), our GPTQ 4-bit g128
layer's matrix-vector kernel and the fused tile kernel (its default path at one row), our AWQ 4-bit g128 layer's
matrix-vector kernel and its default path (dequantize + cuBLAS), and NF4 through bitsandbytes' own batch-1 kernel. Timed with triton.testing.do_bench (median), each over enough copies
of its weights that they do not fit in L2 (the 4-bit 14336 x 4096 weight alone would: 29 MB). `--sweep` also times
every (BLOCK_N, BLOCK_K, SPLIT_K) of the matrix-vector kernels and prints the best per shape.
Model table: a random-weight model of --shape (all layers, or --layers), in bf16, then quantized in place by
round-to-nearest to GPTQ 4-bit g128 and to AWQ 4-bit g128 (the packed layers `finetune chat` loads): tokens/s of
`model.generate` (greedy, a 32-token prompt, --tokens new tokens; what `finetune chat/generate` run) on the default
path and with the matrix-vector kernels on (quant.packed.GEMV_MAX_ROWS, off by default until measured), and of one
decode step captured in a CUDA graph over a static KV cache and replayed (the launch overhead gone: what the
weights' bytes allow). Prints every target as a ratio against bf16 in the same run.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.nn.functional as F
from transformers import StaticCache

from finetune.synthetic import random_model
from quant import packed
from quant.awq.model import quantize_model_awq
from quant.awq.nn import AWQLinear
from quant.awq.solver import AWQConfig
from quant.gptq.model import quantize_model
from quant.gptq.nn import GPTQLinear
from quant.gptq.solver import GPTQConfig

SHAPES_8B = [("down_proj 14336->4096", 14336, 4096), ("gate/up 4096->14336", 4096, 14336),
             ("q/o 4096->4096", 4096, 4096), ("k/v 4096->1024", 4096, 1024)]
L2_BYTES = 50 * 2**20  # H100 / H200 L2: 50 MB
DEVICE = "cuda"


def _copies(nbytes: int) -> int:
    return max(2, -(-3 * L2_BYTES // nbytes))


def _bench(fns) -> float:
    """Median ms of calling fns[i] in rotation (each call touches its own copy of the weights)."""
    from triton.testing import do_bench

    it = [0]

    def call():
        fns[it[0] % len(fns)]()
        it[0] += 1
    return do_bench(call, warmup=25, rep=100, return_mode="median")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def random_gptq(K: int, N: int, device, group: int = 128):
    layer = GPTQLinear(K, N, 4, group, bias=False, device=device)
    layer.qweight.copy_(torch.randint(-2**31, 2**31 - 1, layer.qweight.shape, dtype=torch.int32, device=device))
    layer.qzeros.copy_(torch.randint(-2**31, 2**31 - 1, layer.qzeros.shape, dtype=torch.int32, device=device))
    layer.scales.copy_(torch.rand(layer.scales.shape, device=device) * 0.01)
    layer.g_idx.copy_(torch.arange(K, device=device, dtype=torch.int32) // group)
    return layer


def random_awq(K: int, N: int, device, group: int = 128):
    layer = AWQLinear(K, N, group, bias=False, device=device)
    layer.qweight.copy_(torch.randint(-2**31, 2**31 - 1, layer.qweight.shape, dtype=torch.int32, device=device))
    layer.qzeros.copy_(torch.randint(-2**31, 2**31 - 1, layer.qzeros.shape, dtype=torch.int32, device=device))
    layer.scales.copy_(torch.rand(layer.scales.shape, device=device) * 0.01)
    return layer


def layer_rows(sweep: bool, names: str | None = None) -> list[dict]:
    import bitsandbytes as bnb  # optional packages (bitsandbytes, Triton): imported where they run

    from quant.awq import triton_kernels as awq_k
    from quant.gptq import triton_kernels as gptq_k

    dev = torch.device(DEVICE)
    rows = []
    for name, K, N in SHAPES_8B:
        if names and not any(name.startswith(n) for n in names.split(",")):
            continue
        x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
        dense = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(_copies(2 * K * N))]
        g = [random_gptq(K, N, dev) for _ in range(_copies(K * N // 2))]
        a = [random_awq(K, N, dev) for _ in range(_copies(K * N // 2))]
        nf4 = [bnb.functional.quantize_4bit(w, quant_type="nf4") for w in dense]
        gemv = {"gptq": lambda m: gptq_k.gptq_gemv(x, *m.packed(), 4, m.zero_offset),
                "awq": lambda m: awq_k.awq_gemv(x, *m.packed(), m.group_size)}
        exact = {kind: x.double() @ m[0].dequantize(torch.float64).T for kind, m in (("gptq", g), ("awq", a))}
        r = {"layer": name, "K": K, "N": N,
             "rel err": max(_rel(gemv[kind](m[0]), exact[kind]) for kind, m in (("gptq", g), ("awq", a))),
             "bf16": _bench([lambda w=w: F.linear(x, w) for w in dense]),
             "gptq": _bench([lambda m=m: gemv["gptq"](m) for m in g]),
             "gptq fused tile kernel": _bench([lambda m=m: gptq_k.fused_matmul(x, *m.packed(), 4, m.zero_offset)
                                               for m in g]),
             "awq": _bench([lambda m=m: gemv["awq"](m) for m in a]),
             "awq dequantize + cuBLAS": _bench([lambda m=m: m(x) for m in a]),
             "nf4 (bitsandbytes)": _bench([lambda q=q: bnb.matmul_4bit(x, q[0].t(), quant_state=q[1]) for q in nf4])}
        if sweep:
            r["sweep"] = _sweep(x, g, a, K, N, gptq_k, awq_k)
        rows.append(r)
        print(f"  {name}: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in r.items()
                                        if isinstance(v, float) and k != "rel err") + f", rel err {r['rel err']:.1e}",
              flush=True)
        del dense, g, a, nf4
        torch.cuda.empty_cache()
    return rows


def _sweep(x, g, a, K, N, gptq_k, awq_k) -> dict:
    """The default (BLOCK_N, BLOCK_K, SPLIT_K) against every split at 64 columns and 32 / 128 columns at its split."""
    best = {}
    for kind in ("gptq", "awq"):
        default = (gptq_k.gemv_config(N, K, x.device, 128, 8) if kind == "gptq"
                   else awq_k.gemv_config(N, K, 128, x.device))
        configs = {(64, 128, split) for split in (1, 2, 4, 8)} | {(bn, 128, default[2]) for bn in (32, 128)}
        times = {}
        for cfg in sorted(configs):
            if kind == "gptq":
                fns = [lambda m=m: gptq_k.gptq_gemv(x, *m.packed(), 4, m.zero_offset, config=cfg) for m in g]
            else:
                fns = [lambda m=m: awq_k.awq_gemv(x, *m.packed(), m.group_size, config=cfg) for m in a]
            times[cfg] = _bench(fns)
        cfg = min(times, key=times.get)
        best[kind] = {"best": list(cfg), "best_ms": times[cfg], "default": list(default),
                      "default_ms": times.get(tuple(default))}
    return best


# ------------------------------------------------------------------------------------------ whole model


def _generate_tok_s(model, prompt, tokens: int) -> float:
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True, pad_token_id=0)
    model.generate(prompt, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up: kernels compiled
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(prompt, **kw)
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t)


@torch.no_grad()
def _graph_tok_s(model, prompt, tokens: int) -> float:
    """One decode step over a static KV cache captured in a CUDA graph, replayed `tokens` times (greedy)."""
    P = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=P + tokens + 8)
    out = model(input_ids=prompt, cache_position=torch.arange(P, device=prompt.device), past_key_values=cache,
                use_cache=True)
    ids = out.logits[:, -1:].argmax(-1)
    pos = torch.tensor([P], device=prompt.device)

    def step():
        logits = model(input_ids=ids, cache_position=pos, position_ids=pos.view(1, 1), past_key_values=cache,
                       use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nxt = step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(tokens):
        graph.replay()
        ids.copy_(nxt)
        pos.add_(1)
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t)


def model_rows(shape: str, layers: int | None, tokens: int, group: int = 128) -> list[dict]:
    extra = {"num_hidden_layers": layers} if layers else {}
    rows = []
    for kind in ("bf16", "gptq", "awq"):
        packed.GEMV_MAX_ROWS = 0
        model = random_model(shape, dtype=torch.bfloat16, device=DEVICE, **extra).eval()
        t = time.perf_counter()
        if kind == "gptq":
            quantize_model(model, None, GPTQConfig(bits=4, group_size=group, method="rtn").validate(),
                           device=next(model.parameters()).device, progress=False)
        elif kind == "awq":
            quantize_model_awq(model, None, AWQConfig(group_size=group, method="rtn").validate(),
                               device=next(model.parameters()).device, progress=False)
        prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
        prompt = prompt.to(next(model.parameters()).device)
        convert_s, weights_gib = time.perf_counter() - t, torch.cuda.memory_allocated() / 2**30
        # the quantized models twice: the default decode path, then with the matrix-vector kernels on
        for gemv in (False, True) if kind != "bf16" else (False,):
            packed.GEMV_MAX_ROWS = packed.GEMV_ROWS if gemv else 0
            row = {"model": kind + (" + GEMV" if gemv else ""), "convert_s": convert_s, "weights_gib": weights_gib,
                   "generate_tok_s": _generate_tok_s(model, prompt, tokens)}
            try:
                row["graph_tok_s"] = _graph_tok_s(model, prompt, tokens)
            except Exception as e:  # a capture failure is a finding, not the end of the run
                row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"  {row['model']}: {row}", flush=True)
            rows.append(row)
        packed.GEMV_MAX_ROWS = 0
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def tables(layer_table: list[dict], model_table: list[dict], title: str) -> str:
    out = [f"\n{title}"]
    if layer_table:
        cols = ["bf16", "gptq", "gptq fused tile kernel", "awq", "awq dequantize + cuBLAS", "nf4 (bitsandbytes)"]
        out += ["one row (decode), us per call (median); rel err: GPTQ / AWQ kernel against the dequantized weight",
                "| layer | " + " | ".join(cols) + " | gptq vs bf16 | awq vs bf16 | rel err |",
                "|---" * (len(cols) + 4) + "|"]
        for r in layer_table:
            out.append(f"| {r['layer']} | " + " | ".join(f"{r[c] * 1e3:.1f}" for c in cols) +
                       f" | {r['bf16'] / r['gptq']:.2f}x | {r['bf16'] / r['awq']:.2f}x | {r['rel err']:.1e} |")
            for kind, s in r.get("sweep", {}).items():
                out.append(f"    {kind} sweep: best {s['best']} {s['best_ms'] * 1e3:.1f} us, "
                           f"default {s['default']} {(s['default_ms'] or 0) * 1e3:.1f} us")
    checks = []
    if model_table:
        out += ["", "| model | weights GiB | generate tok/s | graph-replayed tok/s | generate vs bf16 | graph vs bf16 |",
                "|---|---|---|---|---|---|"]
        base = model_table[0]
        for r in model_table:
            graph = f"{r['graph_tok_s']:.1f}" if "graph_tok_s" in r else r.get("graph_error", "-")
            g_ratio = (f"{r['graph_tok_s'] / base['graph_tok_s']:.2f}x" if "graph_tok_s" in r and
                       "graph_tok_s" in base else "-")
            out.append(f"| {r['model']} | {r['weights_gib']:.2f} | {r['generate_tok_s']:.1f} | {graph} | "
                       f"{r['generate_tok_s'] / base['generate_tok_s']:.2f}x | {g_ratio} |")
            if r is not base:
                for mode in ("generate", "graph"):
                    key = f"{mode}_tok_s"
                    if key in r and key in base:
                        s = r[key] / base[key]
                        checks.append(f"  {r['model']} / bf16 tokens/s ({mode}): {s:.2f}x (target >= 1.5x) "
                                      f"{'MET' if s >= 1.5 else 'not met'}")
    if checks:
        out += ["", "targets (issue 25, decode), measured in this run:", *checks]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the model (default: the shape's)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per timed generation")
    ap.add_argument("--sweep", action="store_true", help="time every matrix-vector kernel configuration")
    ap.add_argument("--projections", default=None, help="the layer table's projections, by name (e.g. down_proj)")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode measures GPU decoding; no CUDA device here")
    layer_table = [] if args.skip_layers else layer_rows(args.sweep, args.projections)
    model_table = [] if args.skip_model else model_rows(args.shape, args.layers, args.tokens)
    layers = f"{args.layers} layers" if args.layers else "all layers"
    print(tables(layer_table, model_table, f"decode, {args.shape} ({layers}), batch 1, "
                                           f"{torch.cuda.get_device_name()}"))


if __name__ == "__main__":
    main()

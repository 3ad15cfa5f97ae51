"""Generation speed of `finetune chat` / `generate` against llama.cpp on the same model, in one run.

    PYTHONPATH=. python -m scripts.bench.bench_generate runs/quickstart --threads 2 --tokens 64 [--peft]

RUN is a SmolLM2 run (any `finetune sft` run). Every row generates greedily from the same chat prompt, a warm-up
reply first, then `--repeats` timed replies of up to `--tokens` new tokens; tokens/s is new tokens over wall time
(prompt evaluation included, as a user waits for it). The rows are what the commands run:

- adapter (merged at load): RUN itself, the adapter folded into dense fp32 weights when loaded;
- adapter on its NF4 base via peft (--peft): what chat ran before, for the before/after figure;
- bf16 merge: `finetune merge RUN --format bf16`, loaded by transformers (fp32 compute on CPU);
- GGUF Q4_K_M merge in llama.cpp: `finetune merge RUN --format gguf`, run by llama.cpp (chat's path for it);
- llama.cpp, same weights: the merged model as an F32 GGUF in llama.cpp, the baseline every row is divided by.

Merged outputs are written to a temporary directory (--keep DIR keeps them). Torch and llama.cpp use the same
number of threads. A shared box distorts every row alike; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from finetune.generation import GenConfig, chat_prompt_ids, generate
from finetune.inference import load, load_for_generation
from finetune.merge import MergeConfig, merge

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _timed(label: str, loader, tokens: int, repeats: int) -> dict:
    started = time.perf_counter()
    m = loader()
    load_s = time.perf_counter() - started
    ids = chat_prompt_ids(m.tokenizer, [{"role": "user", "content": PROMPT}])
    cfg = GenConfig(max_new_tokens=tokens)
    generate(m.model, m.tokenizer, ids, GenConfig(max_new_tokens=8))  # warm-up: first-call allocations
    runs = [generate(m.model, m.tokenizer, ids, cfg) for _ in range(repeats)]
    new, seconds = sum(g.new_tokens for g in runs), sum(g.seconds for g in runs)
    row = {"label": label, "runner": m.runner, "load_s": load_s, "new_tokens": new, "seconds": seconds,
           "tokens_per_s": new / seconds, "text": runs[0].text}
    print(f"{label}: {row['tokens_per_s']:.1f} tokens/s ({new} tokens in {seconds:.1f} s; loaded in {load_s:.1f} s)",
          flush=True)
    del m
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a `finetune sft` run directory (or its adapter/)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per reply (default 64)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--peft", action="store_true", help="also time the adapter on its NF4 base via peft (slow)")
    p.add_argument("--keep", help="write the merged outputs here and keep them")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        outputs = {}
        for name, fmt, options in (("bf16", "bf16", {}), ("gguf-q4_k_m", "gguf", {"gguf_type": "Q4_K_M"}),
                                   ("gguf-f32", "gguf", {"gguf_type": "F32"})):
            outputs[name] = work / name
            if not (outputs[name] / "merge_report.json").exists():
                merge(MergeConfig(adapter=args.run, out=outputs[name], format=fmt, options=options, report=False,
                                  device="cpu", progress=False), echo=lambda *a: None)
        rows = [_timed("llama.cpp, same weights (F32 GGUF)", lambda: load_for_generation(outputs["gguf-f32"], cpu),
                       args.tokens, args.repeats)]
        rows.append(_timed("adapter (merged at load)", lambda: load_for_generation(args.run, cpu), args.tokens,
                           args.repeats))
        if args.peft:
            rows.append(_timed("adapter on its NF4 base via peft", lambda: load(args.run, cpu), args.tokens,
                               args.repeats))
        rows.append(_timed("bf16 merge (transformers, fp32 compute)", lambda: load_for_generation(outputs["bf16"], cpu),
                           args.tokens, args.repeats))
        rows.append(_timed("GGUF Q4_K_M merge in llama.cpp", lambda: load_for_generation(outputs["gguf-q4_k_m"], cpu),
                           args.tokens, args.repeats))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["tokens_per_s"]
    print(f"\n{args.run}, {args.threads} threads, greedy, up to {args.tokens} new tokens x {args.repeats}:\n")
    print("| model | runs in | tokens/s | vs llama.cpp (same weights) | load s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['runner']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f} | "
              f"{r['load_s']:.1f} |")


if __name__ == "__main__":
    main()

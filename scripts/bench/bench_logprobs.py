"""Peak host memory and time of the LM-head stage of one preference micro-batch: dense logits vs the chunked head.

The stage DPO runs twice per step (policy with backward, reference without): per-sequence sums of the answer
tokens' log-probs from the final hidden states. `dense` is the plain way (logits of every token, log_softmax,
gather); `chunked` is ours (finetune.train.logprobs: answer tokens only, linear_log_probs in chunks). Each runs in
its own process, so its peak RSS (the kernel's high-water mark) is its own; the sums are printed to show they
agree, and the ratios are against `dense` measured in the same run.

    python -m scripts.bench.bench_logprobs                        # 4 pairs x 2 x 512 tokens, 256-token answers,
                                                                  # SmolLM2's 49152 x 576 head
    python -m scripts.bench.bench_logprobs --rows 8 --length 1024 --answer 512 --vocab 128256 --hidden 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_CHILD = r"""
import json, resource, sys, time
import torch
from finetune.train.linear_ce import linear_log_probs
from finetune.train.loss import CPU_FUSED_CHUNK_BYTES

mode, R, L, A, V, H = sys.argv[1], *map(int, sys.argv[2:])
torch.manual_seed(0)
hidden = torch.randn(R, L, H, requires_grad=True)
weight = torch.randn(V, H) * 0.02
ids = torch.randint(0, V, (R, L))
answer = torch.zeros(R, L - 1, dtype=torch.bool)
answer[:, -A:] = True
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if mode == "dense":
    logp = (hidden[:, :-1] @ weight.T).float().log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
    sums = (logp * answer).sum(1)
else:
    index = answer.reshape(-1).nonzero().squeeze(1)
    states = hidden[:, :-1].reshape(-1, H).index_select(0, index)
    chunk = max(128, CPU_FUSED_CHUNK_BYTES // (4 * V))
    token = linear_log_probs(states, weight, ids[:, 1:].reshape(-1)[index], chunk)
    sums = torch.zeros(R).index_add(0, index // (L - 1), token)
(sums * torch.linspace(-1, 1, R)).sum().backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mib": (peak - before) / 1024, "seconds": seconds, "sums": sums[:2].tolist()}))
"""


def measure(mode: str, args) -> dict:
    sizes = [str(v) for v in (args.rows, args.length, args.answer, args.vocab, args.hidden)]
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, *sizes], cwd=REPO, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="sequences: 2 x pairs")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--answer", type=int, default=256, help="answer tokens per sequence")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    args = parser.parse_args(argv)
    results = {mode: measure(mode, args) for mode in ("dense", "chunked")}
    base = results["dense"]
    for mode, r in results.items():
        print(f"{mode:8s} peak {r['mib']:8.0f} MiB ({r['mib'] / base['mib']:.3f}x)  {r['seconds']:6.2f} s "
              f"({r['seconds'] / base['seconds']:.2f}x)  first sums {[round(s, 3) for s in r['sums']]}")


if __name__ == "__main__":
    main()

"""Perplexity of a causal LM on held-out text: float, GPTQ, AWQ, or bitsandbytes NF4/FP4/int8 quantized on load.

Text is tokenized as one stream (documents joined by EOS) and cut into non-overlapping chunks of
`seqlen` tokens; a trailing partial chunk is dropped so every chunk has the same context length.
Perplexity is exp(mean next-token NLL) over the seqlen-1 predicted tokens of every chunk.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quant.calibration import load_texts, token_stream
from quant.errors import UserError
from quant.formats.registry import UNQUANTIZED, base_format, resolve_base
from quant.loading import materialize

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 512, max_chunks: int | None = None, device=None,
               progress: bool = True) -> dict:
    """{"ppl", "tokens", "chunks", "seqlen", "nll"} of `model` on the 1-D token tensor `ids`."""
    if seqlen < 2:
        raise UserError(f"--seqlen must be >= 2 (got {seqlen})")
    n = ids.numel() // seqlen
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n < 1:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one chunk of --seqlen {seqlen}")
    device = device or next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(n), desc="perplexity", unit="chunk", disable=not progress):
        x = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += seqlen - 1
    nll = total / count
    return {"ppl": math.exp(nll), "tokens": count, "chunks": n, "seqlen": seqlen, "nll": nll}


def load_eval_model(spec: str, quantization: str = "auto", device=None):
    """(model, tokenizer, resolved format name) for `spec` (HF dir, hub id, .gguf, pkg:..., GPTQ dir).

    `auto` evaluates a checkpoint as the format it is stored in, else unquantized; bitsandbytes formats are
    quantized on load (single quantization, uint8 storage).
    """
    from transformers import AutoTokenizer  # here, not at the top: ~1.4 s of `quant --help` (2 cores)

    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src = materialize(spec)
    # CPU: fp32 compute (bf16 on CPU is many times slower; quant.formats.base.resolve_compute_dtype).
    compute = torch.float32 if device.type == "cpu" else torch.bfloat16
    base = resolve_base(spec, src, quantization, double_quant=False, compute_dtype=compute, what="--quantization",
                        default=UNQUANTIZED)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = base_format(base.format).load(base, device)
    return model.eval(), tokenizer, base.format


def evaluate(model_spec: str, data, seqlen: int = 512, max_chunks: int | None = None, quantization: str = "auto",
             device=None, text_field: str = "text", progress: bool = True) -> dict:
    """`quant eval`: perplexity of MODEL on the text in `data` (file, directory, pkg:..., hub dataset)."""
    texts = load_texts(data, text_field=text_field, what="evaluation data")
    t0 = time.perf_counter()
    model, tokenizer, kind = load_eval_model(model_spec, quantization, device)
    ids = token_stream(texts, tokenizer)
    result = perplexity(model, ids, seqlen=seqlen, max_chunks=max_chunks, progress=progress)
    result.update(model=str(model_spec), quantization=kind, seconds=round(time.perf_counter() - t0, 2))
    return result

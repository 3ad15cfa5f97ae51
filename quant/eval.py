"""Perplexity of a causal LM on held-out text: float, GPTQ, AWQ, or bitsandbytes NF4/int8 quantized on load.

Text is tokenized as one stream (documents joined by EOS) and cut into non-overlapping chunks of
`seqlen` tokens; a trailing partial chunk is dropped so every chunk has the same context length.
Perplexity is exp(mean next-token NLL) over the seqlen-1 predicted tokens of every chunk.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quant.errors import UserError
from quant.formats.bnb import keep_reference_layout

log = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "nf4", "int8", "gptq", "awq")


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


def _is_gptq_dir(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return (Path(path) / "quantize_config.json").exists()
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "gptq"


def load_eval_model(spec: str, quantization: str = "auto", device=None):
    """(model, tokenizer, resolved quantization) for `spec` (HF dir, hub id, .gguf, pkg:..., GPTQ dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from quant.awq_model import load_awq_model
    from quant.formats.awq import is_awq_checkpoint
    from quant.loading import materialize
    from quant.model import load_gptq_model

    if quantization not in QUANTIZATIONS:
        raise UserError(f"--quantization must be one of {', '.join(QUANTIZATIONS)} (got {quantization!r})")
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src = materialize(spec)
    packed = "gptq" if Path(src).exists() and _is_gptq_dir(src) else "awq" if is_awq_checkpoint(src) else None
    if quantization == "auto":
        quantization = packed or "none"
    if packed and quantization != packed:
        raise UserError(f"{spec} is a {packed.upper()}-format checkpoint; evaluate it with --quantization {packed} "
                        "(or auto)")
    tokenizer = AutoTokenizer.from_pretrained(src)
    if quantization == "gptq":
        return load_gptq_model(src, device=device), tokenizer, quantization
    if quantization == "awq":
        return load_awq_model(src, device=device), tokenizer, quantization
    # CPU: fp32 compute (bf16 backward/forward on CPU is many times slower, docs/offline-assets.md).
    compute = torch.float32 if device.type == "cpu" else torch.bfloat16
    kwargs = {"dtype": compute}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": str(device)}
    elif quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    if quantization == "none":
        model.to(device)
    keep_reference_layout(model)  # fp32 compute must stay fp32 on AVX512-BF16 CPUs (quant/formats/bnb.py)
    return model.eval(), tokenizer, quantization


def evaluate(model_spec: str, data, seqlen: int = 512, max_chunks: int | None = None, quantization: str = "auto",
             device=None, text_field: str = "text", progress: bool = True) -> dict:
    """`quant eval`: perplexity of MODEL on the text in `data` (file, directory, pkg:..., hub dataset)."""
    from quant.calibration import load_texts, token_stream

    texts = load_texts(data, text_field=text_field, what="evaluation data")
    t0 = time.perf_counter()
    model, tokenizer, kind = load_eval_model(model_spec, quantization, device)
    ids = token_stream(texts, tokenizer)
    result = perplexity(model, ids, seqlen=seqlen, max_chunks=max_chunks, progress=progress)
    result.update(model=str(model_spec), quantization=kind, seconds=round(time.perf_counter() - t0, 2))
    return result

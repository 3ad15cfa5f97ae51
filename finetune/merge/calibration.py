"""Calibration token windows for an output format that requantizes on the merged model's own activations
(GPTQ): plain text through quant's sources, or record files in any training format rendered through the training
data pipeline, chat template included: what the merged model will be fed.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from finetune.data import build_datasets
from quant.calibration import load_texts, token_stream, token_windows
from quant.errors import UserError

log = logging.getLogger(__name__)

_RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def calibration_ids(sources: list[str], tokenizer, data_cfg, n_samples: int, seqlen: int,
                    seed: int = 0) -> list[torch.Tensor]:
    """Calibration windows from plain text (quant's sources: .txt/.md, directories, pkg:..., hub datasets) or
    from record files in any training format (chat, sharegpt, alpaca, completion, text), which are rendered
    through the training data pipeline, chat template included: what the merged model will be fed."""
    if n_samples < 1 or seqlen < 2:
        raise UserError(f"calibration needs at least 1 sample of >= 2 tokens (got {n_samples} x {seqlen})")
    streams = []
    for src in sources:
        if Path(src).suffix in _RECORD_SUFFIXES and Path(src).is_file():
            cfg = replace(data_cfg, train=str(src), eval=None, eval_fraction=0.0, packing=False,
                          train_on_prompt=True, max_examples=None, max_length=max(seqlen, 8))
            bundle = build_datasets(cfg, tokenizer, seed)
            streams.append(torch.cat([torch.as_tensor(ex["input_ids"], dtype=torch.long) for ex in bundle.train]))
        else:
            streams.append(token_stream(load_texts(src, what="--calib"), tokenizer))
    ids = torch.cat(streams)
    if ids.numel() < 2:
        raise UserError("--calib: the calibration data tokenizes to fewer than 2 tokens")
    chunks = token_windows(ids, n_samples, seqlen, seed)
    if len(chunks) < n_samples:
        log.warning("calibration data holds only %d windows of %d tokens (asked for %d)", len(chunks), seqlen,
                    n_samples)
    return chunks

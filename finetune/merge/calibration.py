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
from finetune.data.preference import is_preference
from finetune.data.preference_data import build_preference_data
from finetune.data.sources import read_rows
from quant.calibration import load_texts, token_stream, token_windows
from quant.errors import UserError
from quant.loading import PKG_PREFIX, resolve_model_path

log = logging.getLogger(__name__)

_RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def calibration_ids(sources: list[str], tokenizer, data_cfg, n_samples: int, seqlen: int,
                    seed: int = 0) -> list[torch.Tensor]:
    """Calibration windows from plain text (quant's sources: .txt/.md, directories, pkg:..., hub datasets) or
    from record files in any training format (chat, sharegpt, alpaca, completion, text), which are rendered
    through the training data pipeline, chat template included: what the merged model will be fed; preference
    data (pairs or KTO rows) as its prompts with their chosen answers."""
    if n_samples < 1 or seqlen < 2:
        raise UserError(f"calibration needs at least 1 sample of >= 2 tokens (got {n_samples} x {seqlen})")
    streams = []
    for src in sources:
        local = resolve_model_path(src, "--calib") if src.startswith(PKG_PREFIX) else src  # a data.train may be pkg:
        if Path(local).suffix in _RECORD_SUFFIXES and Path(local).is_file():
            cfg = replace(data_cfg, train=str(src), eval=None, eval_fraction=0.0, packing=False,
                          train_on_prompt=True, max_examples=None, max_length=max(seqlen, 8))
            if is_preference(read_rows(cfg.train, cfg.split, 1, what="--calib").columns):
                # Preference data: each prompt with its chosen answer, what the merged model is meant to say.
                pieces = [p for pair in build_preference_data(cfg, tokenizer, seed).preferred() for p in pair]
            else:
                pieces = [ex["input_ids"] for ex in build_datasets(cfg, tokenizer, seed).train]
            streams.append(torch.cat([torch.as_tensor(p, dtype=torch.long) for p in pieces]))
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

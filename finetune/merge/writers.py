"""The Hugging Face files of a merged model next to its weights: config.json (with the output format's
quantization_config), the tokenizer and the base's generation config. The weights themselves are encoded by the
output format (quant.formats) and streamed by quant.tensorfiles.ShardWriter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer


def write_config(directory: Path, base_config: dict, dtype: torch.dtype, quantization_config: dict | None) -> None:
    config = dict(base_config)
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).replace("torch.", "")
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_extras(directory: Path, tokenizer_dir: Path, base_dir: Path) -> None:
    """Tokenizer (from the adapter, which training saved with it) and the base's generation config."""
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(directory))
    gen = Path(base_dir) / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, directory / "generation_config.json")

"""`quant gguf`: any model we can read -> one .gguf file for llama.cpp / Ollama.

Sources: an HF directory (its safetensors are read memory-mapped, one tensor at a time), a hub id (from the
local HF cache), a .gguf file or `pkg:...` (dequantized once into our cache; its tokenizer metadata is copied
as it is), or a checkpoint stored quantized in a format of quant.formats.registry (GPTQ, ours or the
ecosystem's, or AWQ: its format rebuilds the float weights one decoder layer at a time, as the merge reads a
base), so a GPTQ- or AWQ-only base goes straight to GGUF.
With `calib`, the model first runs on the calibration windows to measure each Linear's input energy, which the
K-quant and legacy scale searches then weight by.

transformers and huggingface_hub are imported where they are used: the CLI imports this module for `quant --help`.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from quant.calibration import calibration_chunks, load_texts
from quant.errors import UserError
from quant.files import claim_output
from quant.tensorfiles import Checkpoint, safetensors_files
from quant.formats.registry import UNQUANTIZED, format_of, linear_types, resolve_base
from quant.ggml.imatrix import collect_importance
from quant.ggml.mix import file_type
from quant.ggml.writer import GGUFReport, write_gguf
from quant.loading import is_gguf, materialize, resolve_model_path, source_inputs

log = logging.getLogger(__name__)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def resolve_source(spec: str) -> tuple[Path, Path]:
    """(HF model directory, tokenizer source: the .gguf file itself for a GGUF spec, else the directory)."""
    src = resolve_model_path(spec)
    local = materialize(spec)
    if not Path(local).exists():
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(local, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
        except Exception as e:  # hub errors (offline, missing repo) come in many types
            reason = str(e).splitlines()[0]
            raise UserError(f"model {spec}: not found locally and not downloadable ({reason})") from None
    local = Path(local)
    if not (local / "config.json").is_file():
        raise UserError(f"model {spec}: {local} has no config.json; expected a Hugging Face model directory")
    return local, Path(src) if is_gguf(src) else local


def _order(key: str) -> tuple:
    m = _LAYER.search(key)
    if m:
        return (1, int(m.group(1)), key)
    return (0 if "embed" in key else 2, 0, key)


def safetensors_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an HF safetensors checkpoint in layer order, read one at a time (memory-mapped files)."""
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in safetensors_files(path)]
    where = {k: h for h in handles for k in h.keys()}
    for key in sorted(where, key=_order):
        yield key, where[key].get_tensor(key)


def rebuilt_tensors(fmt, spec, local: Path, device) -> Iterator[tuple[str, torch.Tensor]]:
    """Every float tensor of a checkpoint stored quantized (GPTQ, ...), rebuilt by its format one layer at a
    time: packed layers come back dequantized as `<module>.weight`."""
    rebuilder = fmt.rebuilder(spec, Checkpoint(local, "model"), None, device)
    for _, group in itertools.groupby(sorted(rebuilder.ckpt.keys(), key=_order), key=lambda k: _order(k)[:2]):
        for key, t in sorted(rebuilder.load(list(group)).items(), key=lambda kv: _order(kv[0])):
            yield key, t.to("cpu")


def _calibration(model, tokenizer, calib, samples: int, seqlen: int, text_field: str, split: str, seed: int,
                 progress: bool) -> dict[str, torch.Tensor]:
    texts = load_texts(calib, text_field=text_field, split=split)
    chunks = calibration_chunks(texts, tokenizer, samples, seqlen, seed=seed)
    if len(chunks) < samples:
        log.warning("calibration text holds only %d windows of %d tokens (asked for %d)", len(chunks), seqlen, samples)
    # Every projection of whatever the source loads as (nn.Linear, GPTQ's or AWQ's packed layers, ...).
    return collect_importance(model, chunks, progress=progress, layer_types=linear_types())


def _source_format(model_spec: str, local: Path, device: torch.device):
    """The base record of the source (its format from the registry: a float checkpoint is `none`)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    spec = resolve_base(model_spec, str(local), compute_dtype=dtype, what="model", default=UNQUANTIZED)
    return format_of(spec), spec


def export_gguf(model_spec: str, out: str | Path, gguf_type: str = "q4_k_m", calib=None, calib_samples: int = 128,
                calib_seqlen: int = 512, text_field: str = "text", calib_split: str = "train", name: str | None = None,
                device=None, seed: int = 0, progress: bool = True, overwrite: bool = False) -> GGUFReport:
    """Write MODEL as one .gguf file of `gguf_type`; with `calib`, importance-weighted scale searches.

    `out` is held for the whole run (quant.files.claim_output): one writer at a time, leftovers of a killed
    earlier export removed, an existing file refused unless `overwrite`, which replaces it only once the new
    file is complete.
    """
    from transformers import AutoTokenizer

    ft = file_type(gguf_type)
    out = Path(out)
    if out.suffix != ".gguf" or out.is_dir():
        raise UserError(f"--out {out}: name a .gguf file")
    with claim_output(out, overwrite, action="export", inputs=source_inputs(model_spec, calib), file=True):
        local, tokenizer_src = resolve_source(model_spec)
        config = json.loads((local / "config.json").read_text())
        device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        fmt, spec = _source_format(model_spec, local, device)
        if calib and (not ft.quantized or ft.name == "q8_0"):
            log.warning("--calib has no effect on %s (it weights the 4-6 bit scale searches); ignoring it", ft.name)
            calib = None
        importance = None
        if calib:
            model = fmt.load(spec, device)
            importance = _calibration(model, AutoTokenizer.from_pretrained(str(local)), calib, calib_samples,
                                      calib_seqlen, text_field, calib_split, seed, progress)
            del model
        stream = rebuilt_tensors(fmt, spec, local, device) if fmt.stored_quantized else safetensors_tensors(local)
        config.pop("quantization_config", None)
        return write_gguf(stream, config, tokenizer_src, out, ft.name, importance=importance,
                          name=name or Path(model_spec).stem, device=device, progress=progress)

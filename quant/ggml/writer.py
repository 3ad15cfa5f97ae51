"""`write_gguf`: a stream of (HF tensor name, float tensor) -> one .gguf file, one tensor in memory at a time.

A GGUF header lists every tensor's type, shape and offset before the data, but a stream only reveals them as it
goes. So each tensor is quantized as it arrives and its bytes are appended to a spill file next to the output;
when the stream ends, `gguf.GGUFWriter` writes the metadata, the tensor table and then the spilled bytes (read
back memory-mapped, tensor by tensor) into a temporary file that is renamed to the output only when complete.
Peak memory is one float tensor plus its quantization work; disk holds the output twice while it is assembled.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as G
from tqdm.auto import tqdm

from quant.errors import UserError
from quant.ggml.arch import Arch
from quant.ggml.mix import ModelShape, choose, file_type
from quant.ggml.types import encode, tensor_type
from quant.ggml.vocab import Vocab, vocab_from_dir, vocab_from_gguf

log = logging.getLogger(__name__)


@dataclass
class GGUFReport:
    path: Path
    file_type: str
    tensors: dict[str, str] = field(default_factory=dict)  # GGUF name -> tensor type
    bytes: int = 0
    seconds: float = 0.0
    importance: bool = False

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(self.tensors.values()).most_common())

    def summary(self) -> str:
        counts = ", ".join(f"{t} {n}" for t, n in self.type_counts().items())
        return (f"{self.path}: {self.file_type}{' + importance' if self.importance else ''}, {len(self.tensors)} "
                f"tensors ({counts}), {self.bytes / 2**20:.1f} MiB, {self.seconds:.1f}s")


@dataclass
class _Spilled:
    name: str
    shape: tuple[int, ...]
    ggml: G
    offset: int
    nbytes: int


def _importance_for(hf_name: str, gguf_name: str, arch: Arch, importance: Mapping[str, torch.Tensor] | None):
    if not importance:
        return None
    if gguf_name == "token_embd.weight":  # only a tied embedding is a matmul input weight (the head's)
        return importance.get("lm_head.weight") if arch.tied else None
    return importance.get(hf_name)


def _load_vocab(tokenizer: str | Path, arch: Arch) -> Vocab:
    path = Path(tokenizer)
    if path.is_file() and path.suffix == ".gguf":
        return vocab_from_gguf(path)
    if not path.is_dir():
        raise UserError(f"tokenizer {path}: not a directory with tokenizer files or a .gguf file")
    return vocab_from_dir(path, arch.n_vocab)


def write_gguf(tensors: Iterable[tuple[str, torch.Tensor]], config: Mapping, tokenizer: str | Path, out: str | Path,
               gguf_type: str = "q4_k_m", importance: Mapping[str, torch.Tensor] | None = None,
               name: str | None = None, device=None, progress: bool = True) -> GGUFReport:
    """Write one .gguf file for llama.cpp from a stream of Hugging Face tensors.

    tensors    (HF name, float tensor) pairs in any order, e.g. layer by layer as a merge produces them; names
               as in the model's state_dict ("model.layers.3.mlp.down_proj.weight"); a tied "lm_head.weight" is
               skipped. Each tensor is quantized and released before the next is pulled.
    config     the HF config (config.json as a dict, or a PretrainedConfig): Llama, Mistral or Qwen2.
    tokenizer  a directory with the HF tokenizer files, or a .gguf file whose tokenizer metadata is copied.
    out        the .gguf path; written to a temporary name in the same directory and renamed when complete.
    gguf_type  f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m or q6_k (llama.cpp's file types and mixes).
    importance HF weight name -> per-input-column activation energy (`quant.ggml.imatrix`); "lm_head.weight"
               also serves a tied embedding. None: ggml's reference (data-free) scale searches.
    device     where the scale searches run (default: where each tensor is).
    """
    t0 = time.perf_counter()
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    ft = file_type(gguf_type)
    arch = Arch.from_config(cfg, name=name)
    vocab = _load_vocab(tokenizer, arch)  # fail on a bad tokenizer before any quantization work
    shape = ModelShape(arch.n_layer, arch.tied, arch.large, has_importance=bool(importance))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spill = tempfile.NamedTemporaryFile(prefix=f".{out.name}.", suffix=".spill", dir=out.parent, delete=False)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    report = GGUFReport(out, ft.name, importance=bool(importance))
    try:
        with spill:
            spilled = _quantize_stream(tensors, arch, ft, shape, importance, spill, device, progress)
        _assemble(tmp, Path(spill.name), spilled, arch, ft, vocab)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        Path(spill.name).unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    report.tensors = {s.name: s.ggml.name for s in spilled}
    report.bytes = out.stat().st_size
    report.seconds = time.perf_counter() - t0
    return report


def _quantize_stream(tensors, arch: Arch, ft, shape: ModelShape, importance, spill, device, progress) -> list[_Spilled]:
    expected = arch.expected()
    extras = [(n, t, n) for n, t in arch.extra_tensors()]
    spilled: list[_Spilled] = []
    seen: set[str] = set()
    bar = tqdm(total=len(expected) + len(extras), desc=f"gguf {ft.name}", unit="tensor", disable=not progress)
    stream = ((hf, t, arch.gguf_name(hf)) for hf, t in tensors)
    for hf_name, t, gname in itertools.chain(extras, stream):
        if gname is None:
            continue
        if gname in seen:
            raise UserError(f"tensor {hf_name!r} appears twice in the stream (as {gname})")
        seen.add(gname)
        data = arch.prepare(gname, t.detach())
        ggml = choose(gname, tuple(data.shape), ft, shape)
        try:
            raw = encode(data, tensor_type(ggml), _importance_for(hf_name, gname, arch, importance), device=device)
        except ValueError as e:
            raise UserError(f"tensor {hf_name!r} ({gname}, {ggml.name}): {e}") from None
        spilled.append(_Spilled(gname, tuple(data.shape), ggml, spill.tell(), raw.nbytes))
        spill.write(raw.tobytes())
        del data, raw, t
        bar.set_postfix_str(f"{gname} {ggml.name}", refresh=False)
        bar.update(1)
    bar.close()
    missing = [n for n in expected if n not in seen]
    if missing:
        raise UserError(f"the tensor stream ended without {len(missing)} tensors llama.cpp needs, e.g. "
                        f"{', '.join(missing[:3])}")
    return spilled


def _assemble(tmp: Path, spill: Path, spilled: list[_Spilled], arch: Arch, ft, vocab: Vocab) -> None:
    quiet = logging.getLogger("gguf")
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))  # GGUFWriter logs the temporary file's name at INFO
    try:
        _write(tmp, spill, spilled, arch, ft, vocab)
    finally:
        quiet.setLevel(level)


def _write(tmp: Path, spill: Path, spilled: list[_Spilled], arch: Arch, ft, vocab: Vocab) -> None:
    w = gguf.GGUFWriter(tmp, arch.arch)
    arch.metadata(w)
    w.add_file_type(int(ft.ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(w)
    for s in spilled:
        byte_shape = (*s.shape[:-1], tensor_type(s.ggml).row_bytes(s.shape[-1]))  # gguf derives the shape
        w.add_tensor_info(s.name, byte_shape, np.dtype(np.uint8), s.nbytes, raw_dtype=s.ggml)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    data = np.memmap(spill, dtype=np.uint8, mode="r") if spill.stat().st_size else np.empty(0, np.uint8)
    for s in spilled:
        w.write_tensor_data(data[s.offset : s.offset + s.nbytes])
    w.close()
    del data

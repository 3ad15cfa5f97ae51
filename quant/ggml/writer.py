"""`write_gguf`: a stream of (HF tensor name, float tensor) -> one .gguf file, one tensor in memory at a time.

A GGUF header lists every tensor's type, shape and offset before the data, but a stream only reveals them as it
goes. So each tensor is quantized as it arrives and its bytes are appended to a spill file next to the output;
when the stream ends, `gguf.GGUFWriter` writes the metadata, the tensor table and then the spilled bytes (read
back memory-mapped, tensor by tensor) into a temporary file that is renamed to the output only when complete.
Peak memory is one float tensor plus its quantization work; disk holds the output twice while it is assembled.
"""

from __future__ import annotations

import logging
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

from quant.arch.layout import ExpertStacker
from quant.errors import UserError
from quant.files import staged
from quant.ggml.arch import Arch
from quant.ggml.mix import ModelShape, choose, file_type
from quant.ggml.types import encode, tensor_type
from quant.ggml.vocab import Vocab, vocab_from_dir, vocab_from_gguf
from quant.replace import new_tmp

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


class GGUFSink:
    """Quantizes tensors as they are added and writes one .gguf file at `path` on `close()` (the module
    docstring says how); the merge's writer for `finetune merge --format gguf` (add/close/abort, `total` bytes).

    `spill` is the scratch file the quantized bytes wait in (default: `path` + ".spill"); it is removed by
    `close()` and `abort()`. `importance` may be filled in while tensors arrive (the merge computes each layer's
    activation energy just before handing the layer over).
    """

    def __init__(self, path: str | Path, config: Mapping, tokenizer: str | Path, gguf_type: str = "q4_k_m",
                 importance: Mapping[str, torch.Tensor] | None = None, name: str | None = None, device=None,
                 progress: bool = True, spill: str | Path | None = None):
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        self.path = Path(path)
        self.ft = file_type(gguf_type)
        self.arch = Arch.from_config(cfg, name=name)
        self.vocab = _load_vocab(tokenizer, self.arch)  # fail on a bad tokenizer before any quantization work
        self.importance, self.device = importance, device
        self.spill_path = Path(spill) if spill is not None else self.path.with_name(self.path.name + ".spill")
        self.spill = open(self.spill_path, "wb")
        self.spilled: list[_Spilled] = []
        self.seen: set[str] = set()
        self.stacker = ExpertStacker(self.arch.desc)  # per-expert checkpoint tensors -> the fused stacks
        self.total = 0
        self.expected = self.arch.expected()
        extras = self.arch.extra_tensors()
        self.bar = tqdm(total=len(self.expected) + len(extras), desc=f"gguf {self.ft.name}", unit="tensor",
                        disable=not progress)
        for gname, t in extras:
            self._add(gname, t, gname)

    def shape(self) -> ModelShape:
        return ModelShape(self.arch.n_layer, self.arch.tied, self.arch.large,
                          has_importance=self.importance is not None, n_expert=self.arch.n_expert)

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Quantize and spill (HF name, float tensor) pairs, in the checkpoint's names or the model's own; one HF
        tensor may make several GGUF tensors (quant.ggml.tensors), names llama.cpp has no use for (a tied head)
        none."""
        for key, t in tensors.items():
            for hf_name, tensor in self.stacker.add(key, t):
                for target in self.arch.targets(hf_name):
                    self._add(hf_name, target.make(tensor.detach()), target.name)

    def _add(self, hf_name: str, data: torch.Tensor, gname: str) -> None:
        if gname in self.seen:
            raise UserError(f"tensor {hf_name!r} appears twice in the stream (as {gname})")
        self.seen.add(gname)
        ggml = choose(gname, tuple(data.shape), self.ft, self.shape())
        imp = _importance_for(hf_name, gname, self.arch, self.importance)
        try:
            raw = encode(data, tensor_type(ggml), imp, device=self.device)
        except ValueError as e:
            raise UserError(f"tensor {hf_name!r} ({gname}, {ggml.name}): {e}") from None
        self.spilled.append(_Spilled(gname, tuple(data.shape), ggml, self.spill.tell(), raw.nbytes))
        self.spill.write(raw.tobytes())
        self.total += raw.nbytes
        self.bar.set_postfix_str(f"{gname} {ggml.name}", refresh=False)
        self.bar.update(1)

    def close(self) -> list[Path]:
        """Check that every tensor llama.cpp needs came, write the file, remove the spill."""
        self.bar.close()
        self.spill.close()
        try:
            self.stacker.close()
            missing = [n for n in self.expected if n not in self.seen]
            if missing:
                raise UserError(f"the tensor stream ended without {len(missing)} tensors llama.cpp needs, e.g. "
                                f"{', '.join(missing[:3])}")
            _assemble(self.path, self.spill_path, self.spilled, self.arch, self.ft, self.vocab)
        finally:
            self.spill_path.unlink(missing_ok=True)
        self.total = self.path.stat().st_size
        return [self.path]

    def abort(self) -> None:
        self.bar.close()
        self.spill.close()
        self.spill_path.unlink(missing_ok=True)

    def report(self) -> GGUFReport:
        return GGUFReport(self.path, self.ft.name, {s.name: s.ggml.name for s in self.spilled}, self.total,
                          importance=bool(self.importance))


def write_gguf(tensors: Iterable[tuple[str, torch.Tensor]], config: Mapping, tokenizer: str | Path, out: str | Path,
               gguf_type: str = "q4_k_m", importance: Mapping[str, torch.Tensor] | None = None,
               name: str | None = None, device=None, progress: bool = True) -> GGUFReport:
    """Write one .gguf file for llama.cpp from a stream of Hugging Face tensors.

    tensors    (HF name, float tensor) pairs in any order, e.g. layer by layer as a merge produces them; names
               as in the model's state_dict ("model.layers.3.mlp.down_proj.weight"); a tied "lm_head.weight" is
               skipped. Each tensor is quantized and released before the next is pulled.
    config     the HF config (config.json as a dict, or a PretrainedConfig) of a family quant.arch describes
               and llama.cpp runs (quant.ggml.arch says what each needs and what is refused).
    tokenizer  a directory with the HF tokenizer files, or a .gguf file whose tokenizer metadata is copied.
    out        the .gguf path; written under a temporary name next to it (quant.files.staged) and renamed when
               complete, so an existing file is replaced only then.
    gguf_type  f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m or q6_k (llama.cpp's file types and mixes).
    importance HF weight name -> per-input-column activation energy (`quant.ggml.imatrix`); "lm_head.weight"
               also serves a tied embedding. None: ggml's reference (data-free) scale searches.
    device     where the scale searches run (default: where each tensor is).
    """
    t0 = time.perf_counter()
    out = Path(out)
    sink = None

    def need() -> int | None:  # the spill and the file being assembled from it
        return 2 * sink.total if sink is not None and sink.total else None

    with staged(out, directory=False, need=need) as tmp:
        spill = new_tmp(out, directory=False)  # a name `recover` removes should this process be killed
        try:
            sink = GGUFSink(tmp, config, tokenizer, gguf_type, importance, name, device, progress, spill=spill)
            for hf_name, t in tensors:
                sink.add({hf_name: t})
                del t
            sink.close()
        except BaseException:
            if sink is not None:
                sink.abort()
            spill.unlink(missing_ok=True)
            raise
    report = sink.report()
    report.path, report.seconds = out, time.perf_counter() - t0
    return report


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

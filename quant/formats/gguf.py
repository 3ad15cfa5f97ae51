"""GGUF output (`finetune merge --format gguf --gguf-type Q4_K_M`): the merged model as one .gguf file for
llama.cpp / Ollama, `model.gguf` in the --out directory (next to merge_report.json; no config.json or
tokenizer files: the file carries its own metadata and tokenizer).

The merged float tensors stream layer by layer into `quant.ggml.writer.GGUFSink`, which quantizes each with our
block quantizers under llama.cpp's per-tensor mix. With --calib the K-quant and legacy scale searches are
weighted by each column's activation energy (llama.cpp's importance matrix), measured on the MERGED model: the
encoder runs each merged float layer on the calibration hidden states just before the layer is written (one
layer and the calibration activations in memory), and holds the output head back until the final norm's
outputs give its energy. The fidelity report loads the file through transformers (`gguf_file`), imported where it
is used, as in every format module (quant.formats.float says why).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from torch import nn

from quant.arch import describe
from quant.blocks import OneLayer, find_blocks
from quant.errors import UserError
from quant.formats.base import OPTIONAL, EncodeRequest, Encoder, Format, option
from quant.formats.layerwise import layer0_inputs
from quant.ggml.arch import Arch
from quant.ggml.imatrix import collect_importance
from quant.ggml.mix import FILE_TYPES, file_type
from quant.ggml.writer import GGUFSink

FILE = "model.gguf"
DEFAULT_TYPE = "q4_k_m"  # llama.cpp's usual recommendation: near Q5 quality at 4.8 bits per weight
TRANSFORMERS_NO_EXPERTS = "transformers cannot read a mixture of experts' GGUF"
_CHOICES = tuple(t.upper() for t in FILE_TYPES) + tuple(FILE_TYPES)


@dataclass
class GGUFOptions:
    gguf_type: str | None = option(f"llama.cpp file type (either case; default {DEFAULT_TYPE.upper()}); F32/F16/BF16 "
                                   "store the weights unquantized", str, _CHOICES)


class GGUFEncoder(Encoder):
    """Passes the merged float tensors to the GGUF sink; with calibration, measures each layer's input energy
    first (module docstring)."""

    hf_layout = False

    def __init__(self, request: EncodeRequest, gguf_type: str):
        self.ft = file_type(gguf_type)
        self.label = f"gguf {self.ft.name.upper()}"
        self.model, self.device = request.model, request.device
        self.config = request.model.config.to_dict()
        self.tokenizer_dir, self.name = request.tokenizer_dir, Path(request.base.model).stem
        self.arch = Arch.from_config(self.config, name=self.name)
        self.calib = request.calib if self.ft.quantized and self.ft.name != "q8_0" else None
        self.importance: dict[str, torch.Tensor] | None = {} if self.calib else None
        self.prefix, self.blocks = find_blocks(self.model)
        self.run_dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.hidden, self.kwargs, self.held, self.norm = [], None, {}, None

    def sink(self, directory: Path, max_shard_bytes: int):
        return GGUFSink(directory / FILE, self.config, self.tokenizer_dir, self.ft.name, self.importance, self.name,
                        self.device, progress=False, spill=directory / f".{FILE}.spill")

    def describe(self) -> dict:
        return {"gguf_type": self.ft.name.upper(), "file": FILE, "importance": self.importance is not None}

    def __call__(self, layer, tensors):
        if self.calib is None:
            return tensors
        if layer is None:
            return self._outside(tensors)
        return self._layer(layer, tensors)

    def _uses_head_energy(self, key: str) -> bool:
        gname = self.arch.gguf_name(key)
        return gname == "output.weight" or (gname == "token_embd.weight" and self.arch.tied)

    @torch.no_grad()
    def _outside(self, tensors):
        decoder_norm = self.model.get_decoder().norm
        head = next(n for n, m in self.model.named_modules() if m is decoder_norm) + "."
        self.norm = copy.deepcopy(decoder_norm)
        self.norm.load_state_dict({k[len(head):]: v.to(self.device, self.run_dtype) for k, v in tensors.items()
                                   if k.startswith(head)}, assign=True)
        self.hidden, self.kwargs = layer0_inputs(self.model, self.prefix, self.blocks, tensors, self.calib,
                                                 self.device, self.run_dtype)
        self.held = {k: v for k, v in tensors.items() if self._uses_head_energy(k)}
        return {k: v for k, v in tensors.items() if k not in self.held}

    @torch.no_grad()
    def _layer(self, i: int, tensors):
        head = f"{self.prefix}.{i}."
        layer = self.blocks[i]
        layer.load_state_dict({k[len(head):]: v.to(self.device, self.run_dtype) if v.is_floating_point() else v
                               for k, v in tensors.items()}, strict=True, assign=True)
        walk = OneLayer(layer, self.hidden, self.kwargs[i], advance=True)
        energy = collect_importance(walk, OneLayer.index_ids(len(self.hidden)), self.device, progress=False)
        self.importance.update({head + k.removeprefix("layers.0."): v for k, v in energy.items()})
        self.blocks[i] = nn.Module()  # drop the layer: its tensors go to the sink
        if i + 1 < len(self.blocks):
            return tensors
        final = [self.norm(h).float().reshape(-1, h.shape[-1]) for h in self.hidden]
        self.importance["lm_head.weight"] = (sum(x.pow(2).sum(0) for x in final) / sum(len(x) for x in final)).cpu()
        self.hidden, self.kwargs = [], None
        held, self.held = self.held, {}
        return {**tensors, **held}


class GGUFFormat(Format):
    name = "gguf"
    label = "GGUF"
    summary = ("one .gguf file for llama.cpp / Ollama (--out/model.gguf): our K-quant/legacy block quantizers "
               "under llama.cpp's per-tensor mixes (--gguf-type, default Q4_K_M); --calib weights the scale "
               "searches by the merged model's activation energy (llama.cpp's importance matrix). Every "
               "architecture llama.cpp runs (docs/architectures.md).")
    output = True
    fixed_dtype = True  # each tensor's type comes from --gguf-type
    options = GGUFOptions

    def calibration(self, options):
        ft = file_type((getattr(options, "gguf_type", None) or DEFAULT_TYPE))
        return OPTIONAL if ft.quantized and ft.name != "q8_0" else None

    def encoder(self, request: EncodeRequest) -> GGUFEncoder:
        return GGUFEncoder(request, getattr(request.options, "gguf_type", None) or DEFAULT_TYPE)

    def load_merged(self, out_dir: Path, device, dtype):
        from transformers import AutoModelForCausalLM

        experts = _expert_count(Path(out_dir) / FILE)
        if experts:
            # transformers 5.24's GGUF reader takes a qwen3moe expert's width from the dense key (its 768 default
            # for a tiny model's 32) and refuses the file; llama.cpp reads it (tests/test_architectures_moe.py).
            raise UserError(f"{Path(out_dir) / FILE}: {TRANSFORMERS_NO_EXPERTS} ({experts} experts per layer); run it "
                            "with llama.cpp / Ollama")
        return AutoModelForCausalLM.from_pretrained(str(out_dir), gguf_file=FILE, dtype=dtype).to(device).eval()

    def unreadable(self, config: dict) -> str | None:
        try:
            moe = describe(config).is_moe
        except UserError:
            moe = False
        return TRANSFORMERS_NO_EXPERTS if moe else None

    def stores(self, config: dict) -> bool:
        return False  # a GGUF output has no config.json; llama.cpp and transformers (gguf_file) read it

    def holds(self, model_dir: Path) -> bool:
        return (Path(model_dir) / FILE).is_file()

    def load_tokenizer(self, model_dir: Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=FILE)  # the file's own tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer


def _expert_count(path: Path) -> int:
    """llama.cpp's `<arch>.expert_count` of a GGUF file (0 for a dense model)."""
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    name = bytes(arch.parts[arch.data[0]]).decode()
    field = reader.fields.get(f"{name}.expert_count")
    return int(field.parts[field.data[0]][0]) if field is not None else 0

"""`finetune merge RUN --format gguf` from the command line on an adapter really trained on an NF4 base: one
.gguf file with its fidelity report, and llama.cpp runs it like transformers. (The file's weights, transformers'
reading of it and what --calib measures are checked in tests/quant/test_gguf_merge.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finetune.cli import main
from quant.files import MARKER
from quant.formats.gguf import FILE
from quant.formats.registry import output_format


def test_cli_merges_a_trained_run_into_a_gguf_file_llama_cpp_runs(nf4_run, chat_files, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["merge", str(nf4_run), "--out", str(out), "--format", "gguf", "--gguf-type", "Q4_K_M",
                 "--calib", str(chat_files[0]), "--calib-samples", "4", "--calib-seqlen", "32",
                 "--eval-max-batches", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([FILE, "merge_report.json", MARKER])
    report = json.loads((out / "merge_report.json").read_text())
    assert report["format"] == "gguf" and report["gguf"]["importance"] and report["gguf"]["calib_samples"] == 4
    fidelity = report["fidelity"]  # (c) is the file as transformers reads it (gguf_file)
    assert fidelity["retention"] > 0.9 and fidelity["kl_adapter_merged"] < 0.01, fidelity
    assert "(c) merged (gguf Q4_K_M)" in capsys.readouterr().out

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out / FILE), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    try:
        ids = llm.tokenize(b"reverse: red blue", add_bos=False)
        assert llm.detokenize(ids) == b"reverse: red blue" and llm.n_vocab() == 259  # the run's byte tokenizer
        llm.eval(ids)
        cpp = torch.tensor(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()
    with torch.no_grad():
        ref = output_format("gguf").load_merged(out, torch.device("cpu"), torch.float32)(torch.tensor([ids])).logits[0]
    assert ((cpp - ref).norm() / ref.norm()).item() < 0.05

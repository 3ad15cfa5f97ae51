"""llama.cpp itself (llama-cpp-python's build) runs our GGUF files: logits, tokenization, and its own quantizer's
choices compared with ours. Marked slow: each case loads a llama.cpp model."""

from __future__ import annotations

import ctypes
from collections import Counter

import gguf
import numpy as np
import pytest
import torch
from gguf_helpers import save_tiny, sentencepiece_tokenizer, token_ids, trained_tokenizer
from support import llama_cpp_logits

from quant.ggml.writer import write_gguf
from support import llama_cpp_logits

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def load_source(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def export(model, src, out, gguf_type):
    return write_gguf(model.state_dict().items(), model.config, src, out, gguf_type, progress=False)


# |llama.cpp logits - source logits| / max |source logit|. llama.cpp quantizes activations to 8 bits for quantized
# matmuls and keeps its KV cache in f16, so a file is compared with our own decoded weights' error budget from
# test_gguf_export plus that.
TOLERANCE = {"f32": 3e-3, "bf16": 0.03, "q8_0": 0.06, "q4_k_m": 0.5}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("gguf_type", list(TOLERANCE))
def test_llama_cpp_logits_match_the_source_model(arch, gguf_type, tmp_path):
    src = save_tiny(tmp_path / "src", arch, tie=arch == "qwen2")
    model = load_source(src)
    export(model, src, tmp_path / "m.gguf", gguf_type)
    ids = token_ids(48)
    with torch.no_grad():
        ref = model(ids).logits[0]
    got = llama_cpp_logits(tmp_path / "m.gguf", ids[0].tolist())
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= TOLERANCE[gguf_type]


def test_llama3_rope_scaling_reaches_llama_cpp(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    src = save_tiny(tmp_path / "src", "llama", rope_parameters={**scaling, "rope_theta": 10000.0})
    model = load_source(src)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    export(model, src, tmp_path / "m.gguf", "f32")
    ids = token_ids(100)
    with torch.no_grad():
        ref = model(ids).logits[0]
    got = llama_cpp_logits(tmp_path / "m.gguf", ids[0].tolist())
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= TOLERANCE["f32"]


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2", "gpt-4o", "sentencepiece"])
def test_llama_cpp_tokenizes_like_transformers(pre, tmp_path):
    tok = sentencepiece_tokenizer() if pre == "sentencepiece" else trained_tokenizer(pre)
    src = save_tiny(tmp_path / "src", "llama", tokenizer=tok)
    export(load_source(src), src, tmp_path / "m.gguf", "q8_0")
    kv = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert kv["tokenizer.ggml.model"].contents() == ("llama" if pre == "sentencepiece" else "gpt2")
    assert pre == "sentencepiece" or kv["tokenizer.ggml.pre"].contents() == pre  # recognised, not defaulted
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, n_threads=1, verbose=False, vocab_only=True)
    try:
        for text in ("Hello world, 12345 tests!", "  What's   this?\n\nI'll  go.\t(x=3.14)", "Ünïcödé — 漢字 🙂",
                     "ROMEO. O, she doth teach the torches to burn bright!"):
            # llama.cpp adds BOS exactly when transformers does (SentencePiece: <s>; byte-level BPE here: nothing)
            assert llm.tokenize(text.encode(), add_bos=True) == tok(text)["input_ids"]
        assert llm.tokenize(tok.eos_token.encode(), add_bos=False, special=True) == [tok.eos_token_id]
    finally:
        llm.close()


def quantize_with_llama_cpp(src, dst, ftype: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.mark.parametrize("hidden,gguf_type", [(256, "q4_k_m"), (192, "q4_k_m"), (192, "q5_k_m"), (256, "q6_k"),
                                              (256, "q4_0")])
def test_our_mix_and_blocks_are_llama_cpps(hidden, gguf_type, tmp_path):
    """llama.cpp's quantizer, run on our f32 file, picks the same type for every tensor (hidden 192 exercises the
    Q5_0/Q5_1/Q8_0 fallbacks) and writes the same bytes for nearly every block: legacy blocks bit for bit, K-quant
    blocks except where float32 rounding decides a near-tie of the scale search differently."""
    src = save_tiny(tmp_path / "src", "llama", hidden=hidden, layers=8)
    model = load_source(src)
    export(model, src, tmp_path / "f32.gguf", "f32")
    export(model, src, tmp_path / "ours.gguf", gguf_type)
    quantize_with_llama_cpp(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", gguf_type)
    ours = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "ours.gguf")).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "theirs.gguf")).tensors}
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}
    same, total = Counter(), Counter()
    for name, t in ours.items():
        nbytes = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        a = np.asarray(t.data).view(np.uint8).reshape(-1, nbytes)
        b = np.asarray(theirs[name].data).view(np.uint8).reshape(-1, nbytes)
        same[t.tensor_type.name] += int((a == b).all(1).sum())
        total[t.tensor_type.name] += a.shape[0]
    for qtype, n in total.items():
        assert same[qtype] / n >= (1.0 if qtype in ("F32", "Q8_0", "Q4_0", "Q5_0", "Q5_1") else 0.95), qtype

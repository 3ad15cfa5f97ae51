"""`quant gguf` on every family llama.cpp runs: llama.cpp itself (llama-cpp-python) loads each file and its logits
agree with transformers' within the file type's tolerance; what llama.cpp cannot reproduce is refused in one line.
Marked slow: each case loads a llama.cpp model."""

from __future__ import annotations

import gguf
import pytest
import torch
from arch_models import FAMILIES, save_multimodal, save_tiny, tiny_config
from gguf_helpers import token_ids
from support import llama_cpp_logits
from test_gguf_llama_cpp import TOLERANCE, load_source

from quant.errors import UserError
from quant.export import export_gguf
from quant.ggml.arch import Arch

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def relative_error(path, src, n_tokens=40) -> float:
    model = load_source(src)
    ids = token_ids(n_tokens)
    with torch.no_grad():
        ref = model(ids).logits[0]
    got = llama_cpp_logits(path, ids[0].tolist())
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama", "qwen2")])
@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_llama_cpp_runs_every_family(family, gguf_type, tmp_path):
    """From the checkpoint as transformers writes it (per-expert tensors, Mixtral's block_sparse_moe names)."""
    src = save_tiny(family, tmp_path / "src")
    report = export_gguf(str(src), tmp_path / "m.gguf", gguf_type, progress=False)
    assert relative_error(tmp_path / "m.gguf", src) <= TOLERANCE[gguf_type], family
    if FAMILIES[family][0] in ("Qwen3MoeConfig", "MixtralConfig", "GptOssConfig"):
        reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
        shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
        E, H = 4, 64
        inter = 32 if family == "qwen3_moe" else 128
        assert shapes["blk.0.ffn_gate_exps.weight"] == shapes["blk.0.ffn_up_exps.weight"] == (E, inter, H)
        assert shapes["blk.0.ffn_down_exps.weight"] == (E, H, inter)
        assert report.tensors["blk.0.ffn_gate_inp.weight"] == "F32"  # the router is never quantized


def test_q4_k_m_of_the_new_dense_families(tmp_path):
    for family in ("qwen3", "gemma3", "phi3"):
        extra = {"query_pre_attn_scalar": 64} if family == "gemma3" else {}
        # (directory and GGUF name without "phi3": llama.cpp then looks for Phi-3's own special tokens)
        src = save_tiny(family, tmp_path / f"src{len(family)}", hidden_size=256, intermediate_size=512, head_dim=64,
                        **extra)
        export_gguf(str(src), tmp_path / "m.gguf", "q4_k_m", progress=False, overwrite=True)
        assert relative_error(tmp_path / "m.gguf", src) <= TOLERANCE["q4_k_m"], family


def test_multimodal_gemma3_exports_its_text_part(tmp_path):
    """Gemma3ForConditionalGeneration's text part (its vision tower is not written), as that class computes text:
    it applies no final logit soft-cap (Gemma3ForCausalLM does), so none is written."""
    save_multimodal("gemma3", tmp_path / "mm")
    report = export_gguf(str(tmp_path / "mm"), tmp_path / "m.gguf", "f32", progress=False)
    assert not [n for n in report.tensors if "vision" in n or "mm" in n]
    assert relative_error(tmp_path / "m.gguf", tmp_path / "mm") <= TOLERANCE["f32"]


def test_multimodal_mistral3_exports_its_text_part(tmp_path):
    """Mistral3ForConditionalGeneration (Mistral Small 3.1+, Ministral 3 with vision): its text part to llama.cpp's
    mistral3, the head tied by the multimodal config's own flag (here True; text_config says False)."""
    model = save_multimodal("ministral3", tmp_path / "mm")
    report = export_gguf(str(tmp_path / "mm"), tmp_path / "m.gguf", "f32", progress=False)
    assert "output.weight" not in report.tensors and not [n for n in report.tensors if "vision" in n or "mm" in n]
    ids = token_ids(40)
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    got = llama_cpp_logits(tmp_path / "m.gguf", ids[0].tolist())
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= TOLERANCE["f32"]


def test_longrope_reaches_llama_cpp(tmp_path):
    """Phi-3-mini-128k / Phi-4-mini's longrope: per-frequency factor tensors and the attention factor. Short factors
    on both sides: llama.cpp picks by context size (128 asked, 256 as it pads it), transformers by sequence length,
    both within the original 256."""
    rot = 16 // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
            "short_factor": [1.0 + 0.1 * i for i in range(rot)], "long_factor": [2.0 + 0.5 * i for i in range(rot)]}
    src = save_tiny("phi3", tmp_path / "src", rope_parameters=rope, original_max_position_embeddings=256,
                     max_position_embeddings=512)
    export_gguf(str(src), tmp_path / "m.gguf", "f32", progress=False)
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= names
    assert relative_error(tmp_path / "m.gguf", src, n_tokens=40) <= TOLERANCE["f32"]


@pytest.mark.parametrize("family,overrides,why", [
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, "sliding-window layers"),
    ("gemma3", {"query_pre_attn_scalar": 32}, "query_pre_attn_scalar = 32"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping = 50.0"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob = False"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "dense MLP layers"),
    ("gpt_oss", {"swiglu_limit": 5.0}, "swiglu_alpha/limit 1.702/5.0"),
])
def test_what_llama_cpp_cannot_reproduce_is_refused_in_one_line(family, overrides, why):
    config = tiny_config(family, **overrides).to_dict()
    with pytest.raises(UserError, match=r"^config.json: a .* model with " + why.replace("(", r"\(").replace(".", r"\.")
                       + ".* cannot be exported to GGUF$"):
        Arch.from_config(config)

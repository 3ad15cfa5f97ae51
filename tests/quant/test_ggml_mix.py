"""llama.cpp's per-tensor type choice, and the HF -> GGUF architecture mapping."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from gguf import GGMLQuantizationType as G

from quant.errors import UserError
from quant.ggml.arch import Arch, llama3_rope_factors
from quant.ggml.mix import ModelShape, choose, file_type, use_more_bits

SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True}


def gguf_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy shape of every tensor of a dense Llama-style model."""
    h, f, kv = arch.n_embd, arch.n_ff, arch.n_head_kv * arch.head_dim
    shapes = {"token_embd.weight": (arch.n_vocab, h), "output_norm.weight": (h,)}
    if not arch.tied:
        shapes["output.weight"] = (arch.n_vocab, h)
    per = {"attn_norm": (h,), "attn_q": (arch.n_head * arch.head_dim, h), "attn_k": (kv, h), "attn_v": (kv, h),
           "attn_output": (h, arch.n_head * arch.head_dim), "ffn_norm": (h,), "ffn_gate": (f, h), "ffn_up": (f, h),
           "ffn_down": (h, f)}
    for i in range(arch.n_layer):
        shapes.update({f"blk.{i}.{k}.weight": s for k, s in per.items()})
    return shapes


def mix(config: dict, gguf_type: str, importance: bool = False) -> dict[str, G]:
    arch = Arch.from_config(config)
    shape = ModelShape(arch.n_layer, arch.tied, arch.large, importance)
    return {n: choose(n, s, file_type(gguf_type), shape) for n, s in gguf_shapes(arch).items()}


def test_smollm2_q4_k_m_gets_llama_cpps_mix():
    """What llama.cpp's own quantizer writes for SmolLM2 Q4_K_M (checked against it in test_gguf_llama_cpp):
    576-wide rows fall back from Q4_K to Q5_0 and from Q6_K to Q8_0; only ffn_down (1536-wide rows) keeps K-types."""
    types = mix(SMOLLM2, "q4_k_m")
    assert Counter(t.name for t in types.values()) == {"Q5_0": 166, "F32": 61, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}
    more = [i for i in range(30) if use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert all(types[f"blk.{i}.ffn_down.weight"] == (G.Q6_K if i in more else G.Q4_K) for i in range(30))
    assert all(types[f"blk.{i}.attn_v.weight"] == (G.Q8_0 if i in more else G.Q5_0) for i in range(30))
    assert types["token_embd.weight"] == G.Q8_0  # tied: the head's Q6_K, which 576 cannot hold


@pytest.mark.parametrize("gguf_type,expected", [
    ("q5_k_m", {"Q5_1": 166, "F32": 61, "Q5_K": 16, "Q8_0": 15, "Q6_K": 14}),
    ("q6_k", {"Q8_0": 181, "F32": 61, "Q6_K": 30}),
    ("q8_0", {"Q8_0": 211, "F32": 61}),
    ("q4_0", {"Q4_0": 210, "F32": 61, "Q8_0": 1}),
    ("bf16", {"BF16": 211, "F32": 61}),
])
def test_smollm2_other_types(gguf_type, expected):
    assert Counter(t.name for t in mix(SMOLLM2, gguf_type).values()) == expected


def test_untied_256_wide_model_keeps_k_types_and_q6_k_head():
    cfg = dict(SMOLLM2, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False)
    types = mix(cfg, "q4_k_m")
    assert types["output.weight"] == G.Q6_K and types["token_embd.weight"] == G.Q4_K
    assert types["blk.0.attn_q.weight"] == G.Q4_K and types["blk.0.attn_v.weight"] == G.Q6_K
    assert types["blk.3.attn_v.weight"] == G.Q4_K and types["blk.3.ffn_down.weight"] == G.Q4_K


def test_q4_0_with_importance_guards_the_first_ffn_down_with_q4_1():
    cfg = dict(SMOLLM2, hidden_size=512, num_attention_heads=8, num_key_value_heads=2)
    plain, weighted = mix(cfg, "q4_0"), mix(cfg, "q4_0", importance=True)
    assert all(plain[f"blk.{i}.ffn_down.weight"] == G.Q4_0 for i in range(30))
    assert [i for i in range(30) if weighted[f"blk.{i}.ffn_down.weight"] == G.Q4_1] == [0, 1, 2]


def test_70b_class_attn_v_gets_q5_k():
    cfg = dict(SMOLLM2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
               num_key_value_heads=8, tie_word_embeddings=False)
    types = mix(cfg, "q4_k_m")
    assert types["blk.0.attn_v.weight"] == G.Q6_K and types["blk.11.attn_v.weight"] == G.Q5_K


def test_rows_that_fit_no_block_become_f16():
    shape = ModelShape(2, False)
    assert choose("blk.0.attn_q.weight", (40, 40), file_type("q4_k_m"), shape) == G.F16
    assert choose("blk.0.attn_q.weight", (40, 40), file_type("q8_0"), shape) == G.F16
    assert choose("blk.0.attn_norm.weight", (40,), file_type("q8_0"), shape) == G.F32


def test_unknown_type_and_architecture_are_one_line_errors():
    with pytest.raises(UserError, match="GGUF type 'q3_k' is not supported; choose one of"):
        file_type("q3_k")
    with pytest.raises(UserError, match=r"architecture GPT2LMHeadModel is not supported; supported: "):
        Arch.from_config(dict(SMOLLM2, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(UserError, match="'num_hidden_layers' is missing"):
        Arch.from_config({k: v for k, v in SMOLLM2.items() if k != "num_hidden_layers"})
    with pytest.raises(UserError, match="rope scaling 'dynamic'"):
        Arch.from_config(dict(SMOLLM2, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))


def test_names_follow_llama_cpp_and_a_tied_head_is_not_stored():
    arch = Arch.from_config(SMOLLM2)
    assert arch.gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert arch.gguf_name("model.layers.7.self_attn.o_proj.weight") == "blk.7.attn_output.weight"
    assert arch.gguf_name("model.layers.7.post_attention_layernorm.weight") == "blk.7.ffn_norm.weight"
    assert arch.gguf_name("model.norm.weight") == "output_norm.weight"
    assert arch.gguf_name("lm_head.weight") is None
    assert arch.gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(UserError, match="'model.vision.proj.weight' has no place"):
        arch.gguf_name("model.vision.proj.weight")


def test_llama_q_k_permutation_is_what_transformers_gguf_loader_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    arch = Arch.from_config(SMOLLM2)
    undo = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    q, k = torch.randn(576, 576), torch.randn(192, 576)
    for name, w in (("blk.0.attn_q.weight", q), ("blk.0.attn_k.weight", k)):
        (target,) = arch.targets(f"model.layers.0.self_attn.{name[11]}_proj.weight")
        assert target.name == name
        permuted = target.make(w)
        assert not torch.equal(permuted, w)
        back = undo.process(permuted.numpy(), name).weights
        assert torch.equal(torch.from_numpy(back), w)
    qwen = Arch.from_config(dict(SMOLLM2, architectures=["Qwen2ForCausalLM"]))
    (target,) = qwen.targets("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(target.make(q), q)  # NEOX rope in llama.cpp: no permutation


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, max_position_embeddings=131072,
                      rope_scaling=scaling)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    factors = llama3_rope_factors(500000.0, 64, scaling).double()
    torch.testing.assert_close(plain / factors, scaled.double(), rtol=1e-6, atol=0)
    arch = Arch.from_config(dict(cfg.to_dict(), architectures=["LlamaForCausalLM"]))
    assert [n for n, _ in arch.extra_tensors()] == ["rope_freqs.weight"]

"""One description per model family (transformers 5.24's modules; the facts each entry rests on are in
docs/architectures.md). A new family is one entry here plus what is genuinely new in it elsewhere.
"""

from __future__ import annotations

from quant.arch.parts import (CLAMPED_SWIGLU, GELU_TANH, MLP, ROPE_NORM, TOPK_SOFTMAX, Attention, Experts, Family,
                              Norms, Router, Wrapper)

# Qwen3-style attention: q/k RMSNorms over head_dim, per head, before the rotary embedding.
_QK_NORMED = Attention(q_norm="q_norm", k_norm="k_norm")

FAMILIES: tuple[Family, ...] = (
    Family("llama", "Llama", ("llama",), ("LlamaForCausalLM",), rope=ROPE_NORM, gguf="llama"),
    # Mistral's sliding_window (7B v0.1: 4096) is handed to attention by transformers; llama.cpp ignores it.
    Family("mistral", "Mistral", ("mistral",), ("MistralForCausalLM",), rope=ROPE_NORM, gguf="llama"),
    Family("qwen2", "Qwen2", ("qwen2",), ("Qwen2ForCausalLM",), gguf="qwen2"),
    Family("qwen3", "Qwen3", ("qwen3",), ("Qwen3ForCausalLM",), attention=_QK_NORMED, gguf="qwen3"),
    # Gemma 3: (1 + w) norms (q/k norms too) and four per block, sqrt(H)-scaled embeddings, GeGLU (tanh),
    # softmax scale query_pre_attn_scalar**-0.5, sliding and full layers with their own rope bases.
    Family("gemma3", "Gemma 3", ("gemma3_text",), ("Gemma3ForCausalLM",),
           attention=Attention(q_norm="q_norm", k_norm="k_norm", scale="query_pre_attn_scalar"),
           mlp=MLP(activation=GELU_TANH),
           norms=Norms(attn_out="post_attention_layernorm", mlp_in="pre_feedforward_layernorm",
                       mlp_out="post_feedforward_layernorm", offset=1.0),
           embed_scale=True, gguf="gemma3"),
    # Phi-3 / Phi-4 / Phi-4-mini: fused qkv (rows q | k | v) and gate_up (gate half first); partial rotary.
    Family("phi3", "Phi-3 / Phi-4", ("phi3",), ("Phi3ForCausalLM",), attention=Attention(qkv="qkv_proj"),
           mlp=MLP(gate_up="gate_up_proj"), gguf="phi3"),
    # Ministral 3 (and the text part of Mistral 3.1+): Mistral's block, q scaled by position after rope.
    Family("ministral3", "Ministral 3", ("ministral3",), ("Ministral3ForCausalLM",),
           attention=Attention(query_position_scale="llama4"), rope=ROPE_NORM, gguf="mistral3"),
    # Qwen3-MoE: Qwen3 attention; experts [E, 2I, H] (gate | up) written per expert; softmax -> top-k -> renorm
    # if norm_topk_prob. Layers in mlp_only_layers (or off the decoder_sparse_step) have a dense MLP.
    Family("qwen3_moe", "Qwen3-MoE", ("qwen3_moe",), ("Qwen3MoeForCausalLM",), attention=_QK_NORMED,
           experts=Experts(), router=Router(renormalize="norm_topk_prob"), gguf="qwen3moe"),
    # Mixtral: Mistral attention; experts as Qwen3-MoE, always renormalised; transformers writes the v4 names.
    Family("mixtral", "Mixtral", ("mixtral",), ("MixtralForCausalLM",), mlp=None,
           experts=Experts(disk_path="block_sparse_moe.experts", disk=("w1", "w3", "w2")),
           router=Router(always_renormalize=True, disk_path="block_sparse_moe.gate"), rope=ROPE_NORM, gguf="llama",
           disk_renames=((".block_sparse_moe.", ".mlp."),)),
    # gpt-oss: biased q/k/v/o and attention sinks; experts [E, H, 2I] (x @ W), gate/up interleaved, biased,
    # clamped SwiGLU; router with a bias, top-k then softmax; sliding and full layers alternate.
    Family("gpt_oss", "gpt-oss", ("gpt_oss",), ("GptOssForCausalLM",), attention=Attention(sinks="sinks"), mlp=None,
           experts=Experts(transposed=True, interleaved=True, gate_up_bias="gate_up_proj_bias",
                           down_bias="down_proj_bias", activation=CLAMPED_SWIGLU, disk=None),
           router=Router(path="mlp.router", bias="bias", rule=TOPK_SOFTMAX, disk_path="mlp.router"),
           gguf="gpt-oss"),
)

# Multimodal classes whose text part is one of the families (its config is `text_config`).
WRAPPERS: tuple[Wrapper, ...] = (
    Wrapper("gemma3", ("Gemma3ForConditionalGeneration",)),
    Wrapper("mistral3", ("Mistral3ForConditionalGeneration",)),
)

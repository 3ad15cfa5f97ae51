"""What a model family's decoder block is made of, in one description per family.

- `parts`     the parts of a block (attention, MLP or experts, router, norms) as dataclasses
- `families`  the table: one `Family` per supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3/4,
              Ministral 3, Qwen3-MoE, Mixtral, gpt-oss) and the multimodal classes whose text part is one
- `describe`  `describe(config) -> Architecture`: a family with one config's values; unknown ones refused
- `layout`    checkpoint keys and tensors between in-memory names (fused experts) and transformers' disk layout

Used by the block walker (quant.blocks), GGUF export (quant.ggml), the merge and LoRA target resolution
(finetune), and the fast path (finetune.kernels.install).
"""

from quant.arch.describe import FULL, SLIDING, Architecture, describe, supported
from quant.arch.parts import Attention, Experts, Family, MLP, Norms, Router, Wrapper

__all__ = ["FULL", "SLIDING", "Architecture", "Attention", "Experts", "Family", "MLP", "Norms", "Router", "Wrapper",
           "describe", "supported"]

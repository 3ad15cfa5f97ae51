"""Helpers shared by the quant tests (a plain module with a unique name so it can be imported from tests)."""

from __future__ import annotations

import torch

CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'-\n0123456789"


def tiny_llama(seed: int = 0, hidden: int = 64, intermediate: int = 128, layers: int = 2, vocab: int = 128,
               tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def char_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def calib_ids(n: int = 8, seqlen: int = 64, vocab: int = 128, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, seqlen), generator=g) for _ in range(n)]

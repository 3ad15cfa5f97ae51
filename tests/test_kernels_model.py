"""The fast path in a whole model: same loss and LoRA gradients as transformers + peft, every base and switch."""

from __future__ import annotations

import functools

import pytest
import torch

from finetune.kernels import KernelOptions, install, install_fast_path
from finetune.model import attach_lora, load_base
from finetune.recipe import BaseConfig, LoraConfig, TrainConfig
from finetune.synthetic import random_model, save_model_dir, save_rtn_awq, save_rtn_gptq

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels-model")
    model = random_model("tiny", num_hidden_layers=2)
    dense = save_model_dir(model, root / "dense")
    awq = save_rtn_awq(random_model("tiny", num_hidden_layers=2), root / "awq", group_size=32)
    return {"dense": dense, "gptq": save_rtn_gptq(model, root / "gptq", group_size=32), "awq": awq}


def build(dirs, quantization, opts, dropout=0.0, device="cpu", dtype="float32", targets="all-linear"):
    src = dirs.get(quantization, dirs["dense"])  # nf4 / int8 / none: quantized on the fly from the dense copy
    base = load_base(BaseConfig(model=str(src), quantization=quantization, compute_dtype=dtype), torch.device(device))
    torch.manual_seed(0)
    model = attach_lora(base.model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=targets), True)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A's gradient zero
            p.data.normal_(0, 0.2)
    report = install(model, opts) if opts is not None else None
    model.train()
    return model, report


def step(model, ids, pos, autocast=None):
    torch.manual_seed(5)  # the same dropout masks in both runs
    with torch.autocast(ids.device.type, dtype=autocast, enabled=autocast is not None):
        loss = model(input_ids=ids, labels=ids, position_ids=pos, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def compare(dirs, quantization, opts, packed, dropout=0.0, device="cpu", dtype="float32", autocast=None, tol=1e-5):
    vocab = 259
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 40), generator=g).to(device)
    pos = torch.cat([torch.arange(25), torch.arange(15)]).repeat(2, 1).to(device) if packed else None
    ref_loss, ref_grads = step(build(dirs, quantization, None, dropout, device, dtype)[0], ids, pos, autocast)
    model, report = build(dirs, quantization, opts, dropout, device, dtype)
    loss, grads = step(model, ids, pos, autocast)
    assert abs(loss - ref_loss) <= tol * abs(ref_loss)
    for n, want in ref_grads.items():
        err = float((grads[n] - want).norm() / want.norm().clamp_min(1e-12))
        assert err <= 10 * tol, (n, err)
    return report


@pytest.mark.parametrize("quantization", ["nf4", "gptq", "awq", "none"])
@pytest.mark.parametrize("packed", [False, True])
def test_fast_path_matches_peft(model_dirs, quantization, packed):
    report = compare(model_dirs, quantization, KernelOptions(), packed)
    assert report.layers == 2 and report.fused == {"fused LoRA qkv": 2, "fused LoRA o": 2, "fused LoRA mlp": 2,
                                                  "offloadable checkpoint": 2}
    assert not report.skipped


def test_fast_path_with_dropout_offload_and_tiles(model_dirs):
    opts = KernelOptions(mlp_tile=16, mlp_tile_above=0, offload_min_tokens=0)
    compare(model_dirs, "nf4", opts, packed=True)
    compare(model_dirs, "nf4", opts, packed=True, dropout=0.2)  # dropout + tiles: the MLP takes project + swiglu
    compare(model_dirs, "nf4", KernelOptions(), packed=True, dropout=0.2)  # dropout untiled: the fused MLP
    compare(model_dirs, "nf4", KernelOptions(fused_lora=False, offload_min_tokens=0), packed=False, dropout=0.2)


def test_recipe_switches_turn_each_piece_off(model_dirs):
    off = TrainConfig(max_steps=1, fused_lora=False, triton_kernels=False, fused_attention=False,
                      offload_checkpoints=False)
    model, _ = build(model_dirs, "nf4", None)
    assert install_fast_path(model, off).summary() == "off"
    assert not any(isinstance(m.__dict__.get("forward"), functools.partial) for m in model.modules())
    partial = TrainConfig(max_steps=1, fused_lora=False, offload_checkpoints=False)
    report = install_fast_path(build(model_dirs, "nf4", None)[0], partial)
    assert report.layers == 2 and not any(k.startswith("fused") for k in report.fused)
    sharded = install_fast_path(build(model_dirs, "nf4", None)[0], TrainConfig(max_steps=1), sharded=True)
    assert sharded.layers == 0 and "sharded" in sharded.summary()
    assert KernelOptions.from_train(TrainConfig(max_steps=1), distributed=True).offload_min_tokens is None


def test_layers_without_adapters_keep_peft_modules_and_say_so(model_dirs):
    report = compare(model_dirs, "nf4", KernelOptions(), packed=False)
    model, report = build(model_dirs, "nf4", KernelOptions(), targets=["q_proj", "v_proj"])
    assert report.layers == 2 and "fused LoRA qkv" not in report.fused
    assert "carries no LoRA adapter" in report.summary()


def test_recomputation_skips_the_mlp_output_nothing_reads(model_dirs, monkeypatch):
    from finetune.kernels import mlp

    model, _ = build(model_dirs, "nf4", KernelOptions())
    seen = []
    real = mlp._LoRAMLP.apply
    monkeypatch.setattr(mlp._LoRAMLP, "apply", lambda spec, *a: seen.append(spec[5]) or real(spec, *a))
    step(model, torch.randint(0, 259, (2, 24)), None)
    assert seen == [True, True, False, False]  # two layers' forward, then their recomputation in backward


def _errors(grads, exact):
    return {n: float((grads[n] - w).norm() / w.norm().clamp_min(1e-12)) for n, w in exact.items()}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("quantization", ["nf4", "gptq"])
def test_fast_path_on_gpu_bf16(model_dirs, quantization):
    """bf16 on both sides: the fast path must be about as close to an fp32 run as transformers + peft are."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 259, (2, 40), generator=g).cuda()
    for opts, packed in ((KernelOptions(), False), (KernelOptions(), True),
                         (KernelOptions(mlp_tile=16, mlp_tile_above=0, offload_min_tokens=0), True)):
        pos = torch.cat([torch.arange(25), torch.arange(15)]).repeat(2, 1).cuda() if packed else None
        exact_loss, exact = step(build(model_dirs, quantization, None, device="cuda")[0], ids, pos)
        ref_loss, ref = step(build(model_dirs, quantization, None, device="cuda", dtype="bfloat16")[0], ids, pos,
                             torch.bfloat16)
        loss, got = step(build(model_dirs, quantization, opts, device="cuda", dtype="bfloat16")[0], ids, pos,
                         torch.bfloat16)
        assert abs(loss - exact_loss) <= 2 * abs(ref_loss - exact_loss) + 2e-3 * abs(exact_loss)
        e_ref, e_got = _errors(ref, exact), _errors(got, exact)
        for n in exact:
            assert e_got[n] <= 2 * e_ref[n] + 1e-2, (n, e_got[n], e_ref[n])


def test_generation_takes_the_original_modules(model_dirs):
    """Decoding (a KV cache, a few tokens per forward) runs transformers' + peft's code: the same tokens."""
    ids = torch.randint(0, 259, (1, 20), generator=torch.Generator().manual_seed(4))
    outs = []
    for opts in (None, KernelOptions()):
        model, _ = build(model_dirs, "nf4", opts)
        model.eval()
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, max_new_tokens=6, do_sample=False))
    assert torch.equal(outs[0], outs[1])


def test_recipe_long_context_switches_validate(tmp_path):
    from finetune.recipe import RecipeError, recipe_from_dict

    data = {"base": {"model": "some/model"}, "data": {"train": "some/dataset"}, "train": {"max_steps": 1}}
    for value in ("auto", True, False):
        data["train"]["offload_checkpoints"] = value
        assert recipe_from_dict(data).train.offload_checkpoints == value
    data["train"]["tiled_mlp"] = "sometimes"
    with pytest.raises(RecipeError, match="train.tiled_mlp = 'sometimes'"):
        recipe_from_dict(data)

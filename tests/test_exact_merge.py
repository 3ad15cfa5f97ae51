"""Exact merges (issue #28, route 1): an adapter trained with `lora.merge_target` on an asymmetric GPTQ or an AWQ
base moves whole zero-point steps, and `finetune merge` into the same format writes exactly those zero points with
the base's qweight and scales untouched, so the merged model computes what the adapter model computed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.exact import target as exact_target
from finetune.exact.grid import ZeroGrid, group_update, shift_zeros
from finetune.merge.adapter import read_adapter
from finetune.model import load_adapter, load_base
from finetune.recipe import RecipeError, recipe_from_dict
from finetune.train.loop import train
from quant.awq.model import quantize_model_awq, save_awq
from quant.awq.solver import AWQConfig
from quant.errors import UserError
from quant.formats.base import BaseSpec
from quant.formats.registry import output_format
from quant.gptq.model import quantize_model, save_quantized
from quant.gptq.solver import GPTQConfig
from support import make_tiny_model, quiet_merge, single_thread, tiny_recipe


def _calib(tokenizer):
    return [torch.randint(0, len(tokenizer), (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """The tiny Llama as an asymmetric 4-bit GPTQ base with act-order (non-monotone g_idx), a 3-bit asymmetric
    one in the v1 layout (zero points stored minus one), an AWQ base, and a symmetric GPTQ base (route 2)."""
    out = {}
    with single_thread():
        for name, cfg, fmt in (("gptq", GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False), "auto"),
                               ("gptq3", GPTQConfig(bits=3, group_size=32, sym=False), "gptq"),
                               ("gptq-sym", GPTQConfig(bits=4, group_size=32, method="rtn"), "auto")):
            path = out[name] = tmp_path_factory.mktemp(name)
            model = make_tiny_model(len(tokenizer))
            quantize_model(model, _calib(tokenizer), cfg.validate(), device="cpu", progress=False,
                           checkpoint_format=fmt)
            save_quantized(model, path, tokenizer=tokenizer)
        path = out["awq"] = tmp_path_factory.mktemp("awq")
        model = make_tiny_model(len(tokenizer))
        quantize_model_awq(model, _calib(tokenizer), AWQConfig(group_size=32, method="rtn").validate(),
                           device="cpu", progress=False)
        save_awq(model, path, tokenizer=tokenizer)
    return out


def _recipe(base: Path, chat_files, out: Path, target: str, **train):
    return recipe_from_dict(tiny_recipe(base, *chat_files, out, base={"quantization": "auto"},
                                        lora={"merge_target": target},
                                        train={"max_steps": 8, "gradient_checkpointing": False, **train}))


@pytest.mark.parametrize("name,target,moved", [("gptq", "gptq", "qzeros"), ("gptq3", "gptq", "qzeros"),
                                               ("awq", "awq", "qzeros"), ("gptq-sym", "gptq", "qweight")])
def test_exact_merge_keeps_the_grid_and_equals_the_adapter_model(tmp_path, bases, chat_files, name, target, moved):
    with single_thread():
        train(_recipe(bases[name], chat_files, tmp_path / "run", target), echo=lambda *a: None)
        result = quiet_merge(tmp_path / "run", tmp_path / "merged", target, device="cpu")
    assert result.report["route"] == ("zero points (exact)" if moved == "qzeros" else "codes (exact)")
    assert result.report["moved"] > 0  # the adapter did something the merge had to carry
    before, after = load_file(str(bases[name] / "model.safetensors")), load_file(str(tmp_path / "merged" /
                                                                                 "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(f".{moved}") for k in changed)  # scales, g_idx, norms, the rest: identical
    fidelity = result.fidelity
    assert fidelity["retention"] == pytest.approx(1.0, abs=1e-4) and fidelity["kl_adapter_merged"] < 1e-6

    source = read_adapter(tmp_path / "run")
    adapter_model = load_adapter(load_base(source.base, torch.device("cpu")).model, source.adapter_dir).eval()
    merged = output_format(target).load_merged(tmp_path / "merged", torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = adapter_model(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = load_base(source.base, torch.device("cpu")).model(input_ids=ids).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, a, atol=1e-3)


def test_zero_point_update_is_whole_steps_clamped_with_a_straight_through_gradient():
    zeros = torch.tensor([[1.0, 8.0, 15.0]])  # [G=1, N=3]
    scales = torch.full((1, 3), 0.5)
    grid = ZeroGrid(zeros, scales, torch.zeros(4, dtype=torch.long), torch.zeros(1, 3), torch.full((1, 3), 15.0), 4)
    c = torch.tensor([[1.2], [-0.7], [-1.0]], requires_grad=True)  # [N, G] in weight units
    z = shift_zeros(c, grid)
    # 1 - 2.4 -> clamped to 0; 8 + 1.4 -> 9; 15 + 2 -> clamped to 15
    assert z.tolist() == [[0.0, 9.0, 15.0]]
    group_update(c, grid).sum().backward()
    assert c.grad.flatten().tolist() == [0.0, 1.0, 0.0]  # no gradient where the clamp holds


def test_general_path_merges_the_effective_update_into_another_format(tmp_path, bases, chat_files):
    with single_thread():
        train(_recipe(bases["gptq"], chat_files, tmp_path / "run", "gptq"), echo=lambda *a: None)
        result = quiet_merge(tmp_path / "run", tmp_path / "float", "fp16", device="cpu")
    assert "route" not in result.report
    assert result.fidelity["retention"] == pytest.approx(1.0, abs=0.02)  # fp16 rounding of the weights


def test_exact_adapter_resumes_to_the_uninterrupted_result(tmp_path, bases, chat_files):
    with single_thread():
        train(_recipe(bases["awq"], chat_files, tmp_path / "a", "awq", max_steps=6, save_every=3), echo=lambda *a: None)
        half = _recipe(bases["awq"], chat_files, tmp_path / "b", "awq", max_steps=6, save_every=3)
        train(half, echo=lambda *a: None)
        for later in ("checkpoint-6", "adapter"):  # as a crash right after checkpoint-3 would leave it
            shutil.rmtree(tmp_path / "b" / later)
        train(half, resume=True, echo=lambda *a: None)
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert any(v.shape[1] == 2 for k, v in a.items() if "lora_A" in k)  # [r, G]: 64 inputs in groups of 32
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,target,message", [
    ("gptq", "awq", "lora.merge_target = 'awq': the exact merge keeps the base's integer weights"),
    ("awq", "gptq", "lora.merge_target = 'gptq': the exact merge keeps the base's integer weights"),
])
def test_a_pair_that_cannot_be_exact_is_refused_in_one_line(tmp_path, bases, chat_files, name, target, message):
    with pytest.raises(UserError, match=message) as e:
        train(_recipe(bases[name], chat_files, tmp_path / "run", target), echo=lambda *a: None)
    assert "\n" not in str(e.value) and "exact targets: gptq on a GPTQ base, awq on an AWQ base" in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before output.dir is touched


def test_a_target_not_built_is_refused_by_the_recipe(tmp_path, bases, chat_files):
    with pytest.raises(RecipeError, match="merge_target") as e:
        _recipe(bases["gptq"], chat_files, tmp_path / "run", "nf4")
    assert "\n" not in str(e.value) and "'gptq'" in str(e.value) and "'awq'" in str(e.value)


def test_code_route_is_the_merges_requantization_with_a_straight_through_gradient():
    from finetune.exact.grid import code_update, code_grid
    from quant.gptq.pack import pack_rows

    codes = torch.tensor([[0, 7, 15, 8]])  # [N=1, K=4], one group of 4
    grid = code_grid(pack_rows(torch.cat([codes.T, torch.zeros(28, 1, dtype=torch.long)]), 4),
                     torch.full((1, 1), 0.5), torch.zeros(4, dtype=torch.int32), 4)
    delta = torch.tensor([[-1.0, 0.3, 2.0, 0.2]], requires_grad=True)  # weight units; steps of 0.5
    D = code_update(delta, grid)
    # 0 - 2 -> clamped to 0; 7 + 0.6 -> 8; 15 + 4 -> clamped to 15; 8 + 0.4 -> 8
    assert (D / 0.5).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    D.sum().backward()
    assert delta.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]


@pytest.mark.parametrize("fmt,settings,route", [("gptq", {"sym": True}, "codes"), ("gptq", {"sym": False}, "zeros"),
                                                 ("awq", {"zero_point": True}, "zeros")])
def test_each_base_takes_the_route_its_format_declares(fmt, settings, route):
    spec = BaseSpec(model="m", model_dir="m", format=fmt, compute_dtype="float32", settings=settings)
    exact_target.check(fmt, spec)
    assert exact_target.route(fmt, settings) == route
    assert exact_target.TARGETS == ("none", "gptq", "awq")  # the formats whose plug-in has an exact route


def test_an_awq_base_without_zero_points_is_refused_in_one_line():
    spec = BaseSpec(model="m", model_dir="m", format="awq", compute_dtype="float32", settings={"zero_point": False})
    with pytest.raises(UserError, match="the awq base has no zero points") as e:
        exact_target.check("awq", spec)
    assert "\n" not in str(e.value)

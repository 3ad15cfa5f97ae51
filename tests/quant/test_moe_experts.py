"""Experts held one matrix per expert and projection (quant.moe) and in NF4 (quant.formats.bnb_experts): the same
logits as transformers' own experts holding the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from arch_models import MOE, save_tiny, tiny_model

from quant.errors import UserError
from quant.formats import registry as formats
from quant.formats.bnb_experts import NF4Stack, round_trip
from quant.moe.convert import architecture, defuse, defuse_linear, experts_paths
from quant.moe.experts import MoEExperts
from quant.moe.layout import map_matrices

IDS = torch.tensor([[5, 80, 17, 200, 3, 99, 41, 7, 150, 23, 64, 9]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", MOE)
def test_per_expert_linears_are_the_fused_experts(family):
    """The split (halves or gpt-oss's alternating gate/up, transposes, biases) and the math (routing weights,
    SiLU or clamped SwiGLU): per-expert Linears give transformers' logits."""
    model = tiny_model(family)
    ref = _logits(model)
    assert defuse_linear(model) == 2
    assert all(isinstance(model.get_submodule(p), MoEExperts) for p in experts_paths(model, architecture(model)))
    assert torch.allclose(_logits(model), ref, atol=2e-5, rtol=0), (_logits(model) - ref).abs().max()


@pytest.mark.parametrize("family", MOE)
def test_nf4_experts_equal_transformers_with_the_same_round_trip(family):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    arch = architecture(model)
    part = arch.family.experts
    for path in experts_paths(reference, arch):
        module = reference.get_submodule(path)
        params = dict(module.named_parameters(recurse=False))
        new = map_matrices(part, params, lambda p, w: round_trip(w, "nf4", True, torch.float32))
        for name, value in new.items():
            params[name].data.copy_(value)
    defuse(model, lambda path, spec, mats: _nf4(spec, mats))
    got, want, float_logits = _logits(model), _logits(reference), _logits(tiny_model(family))
    assert torch.allclose(got, want, atol=2e-5, rtol=0), (got - want).abs().max()
    assert (want - float_logits).abs().max() > 1e-3  # the round trip matters: the comparison can fail


def _nf4(spec, mats):
    from quant.formats.bnb_experts import nf4_experts

    return nf4_experts(spec, mats, "nf4", True, torch.float32)


@pytest.mark.parametrize("nested", [True, False])
def test_stack_dequantizes_a_subset_as_each_expert_alone_and_narrow_rows_right(nested):
    """Experts are quantized one by one; a set of them dequantizes as each would alone. In-features 32 (< the
    64-weight block): bitsandbytes' CPU kernel gets these wrong from a 2-D shape, the stack's flat call does not."""
    torch.manual_seed(0)
    W = torch.randn(5, 64, 32)
    stack = NF4Stack.quantize(W, None, "nf4", nested, torch.float32)
    together = stack.weights([3, 0, 4], torch.float32)
    alone = torch.stack([stack.weights([e], torch.float32)[0] for e in (3, 0, 4)])
    assert torch.equal(together, alone)
    blocks = W[[3, 0, 4]].reshape(3, -1, 64)
    err = (together.reshape(3, -1, 64) - blocks).abs()
    assert (err <= 0.2 * blocks.abs().amax(-1, keepdim=True)).all()  # within NF4's widest half-step
    assert stack.weight.numel() == W.numel() // 2  # 4 bits a weight


def test_nf4_base_holds_experts_in_4_bits_and_the_registry_counts_them(tmp_path):
    d = save_tiny("qwen3_moe", tmp_path / "m")
    spec = formats.resolve_base(str(d), str(d), "nf4", compute_dtype=torch.float32)
    model = formats.format_of(spec).load(spec, torch.device("cpu"))
    stacks = [m for m in model.modules() if isinstance(m, NF4Stack)]
    assert len(stacks) == 6 and all(formats.layer_format(s).name == "nf4" for s in stacks)
    left = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert not left  # no fused 16-bit expert parameter is left
    from finetune.model import count_parameters, memory_report

    _, total = count_parameters(model)
    assert total == sum(p.numel() for p in tiny_model("qwen3_moe").parameters())
    quantized = sum(t.numel() * t.element_size() for s in stacks for t in s.storage())
    assert memory_report(model)["quantized_mb"] * 2**20 >= quantized


def test_int8_base_of_a_mixture_of_experts_is_refused(tmp_path):
    d = save_tiny("mixtral", tmp_path / "m")
    spec = formats.resolve_base(str(d), str(d), "int8", compute_dtype=torch.float32)
    with pytest.raises(UserError, match="experts cannot be stored in int8"):
        formats.format_of(spec).load(spec, torch.device("cpu"))

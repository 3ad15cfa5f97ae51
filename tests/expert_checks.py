"""Checks of the grouped expert path (finetune.kernels.experts) shared by the CPU test, the Triton-interpreter run
and the GPU test: a MoE layer with LoRA on both expert parameters, through the grouped products and through the
per-expert loop (quant.moe.experts), forward and gradients, against a float64 evaluation of the per-expert loop.

Run as a script (`python tests/expert_checks.py`, TRITON_INTERPRET=1 on a CPU) it prints EXPERT-CHECKS-OK.
"""

from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def moe_layer(family: str, device, dtype, experts: int = 6, hidden: int = 64, inter: int = 96):
    """A float MoEExperts layer of `family`'s layout (per-expert Linears) with random weights."""
    from quant.arch import describe
    from quant.moe.convert import linear_experts
    from quant.moe.experts import ExpertSpec

    from arch_models import tiny_config

    extra = {"qwen3_moe": {"moe_intermediate_size": inter, "num_experts": experts},
             "mixtral": {"intermediate_size": inter, "num_local_experts": experts},
             "gpt_oss": {"intermediate_size": inter, "num_local_experts": experts}}[family]
    spec = ExpertSpec.of(describe(tiny_config(family, hidden_size=hidden, **extra)))
    g = torch.Generator().manual_seed(0)
    mats = {p: (torch.randn(experts, *spec.shape(p), generator=g) * 0.1,
                torch.randn(experts, spec.shape(p)[0], generator=g) * 0.1 if spec.bias else None)
            for p in ("gate", "up", "down")}
    return linear_experts(spec, mats).to(device, dtype)


def check_grouped_experts(device: str, dtype=torch.bfloat16, family: str = "qwen3_moe", tokens: int = 300,
                          r: int = 8) -> None:
    from finetune.kernels.experts import grouped_experts

    layer = moe_layer(family, device, dtype)
    s = layer.spec
    g = torch.Generator().manual_seed(1)

    def draw(*shape, scale=0.1):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    params = [draw(s.num_experts, r, s.hidden), draw(s.num_experts, 2 * s.intermediate, r),
              draw(s.num_experts, r, s.intermediate), draw(s.num_experts, s.hidden, r)]
    x = draw(tokens, s.hidden, scale=1.0).to(dtype)
    idx = torch.stack([torch.randperm(s.num_experts, generator=g)[:2] for _ in range(tokens)]).to(device)
    idx[: tokens // 2, 0] = 0  # one crowded expert, and (6 experts, 300 tokens) segments of odd sizes
    w = torch.softmax(torch.randn(tokens, 2, generator=g), -1).to(device, dtype)
    dy = draw(tokens, s.hidden, scale=1.0).to(dtype)

    def run(fn, precision):
        leaves = [p.to(precision).clone().requires_grad_() for p in params]
        xi = x.to(precision).clone().requires_grad_()
        adapters = {"gate_up": (leaves[0], leaves[1], 2.0), "down": (leaves[2], leaves[3], 2.0)}
        y = fn(layer.to(precision), xi, idx, w.to(precision), adapters)
        grads = torch.autograd.grad(y, [xi, *leaves], dy.to(precision))
        return [y.detach(), *grads]

    exact = run(lambda m, *a: m(*a[:3], adapters=a[3]), torch.float64)
    ref = run(lambda m, *a: m(*a[:3], adapters=a[3]), dtype)
    got = run(grouped_experts, dtype)
    names = ("y", "dx", "dA_gate_up", "dB_gate_up", "dA_down", "dB_down")
    for name, a, b, c in zip(names, got, ref, exact):
        e_got, e_ref = rel(a, c), rel(b, c)
        bound = 2 * e_ref + (1e-4 if dtype == torch.float32 else 1e-2)
        assert torch.isfinite(a).all(), f"{family} {name}: non-finite values"
        assert e_got <= bound, f"{family} {name}: grouped error {e_got:.2e} vs per-expert {e_ref:.2e}"


if __name__ == "__main__":
    for fam in ("qwen3_moe", "gpt_oss"):
        check_grouped_experts("cpu", torch.float32, fam, tokens=80)
    print("EXPERT-CHECKS-OK")

"""The fast path on every family it takes: loss and LoRA gradients equal transformers + peft (CPU, fp32), and on a GPU
in bf16 about as close to an fp32 run as transformers + peft are. Families whose layers it leaves (gpt-oss's
attention sinks, experts) say so in the report."""

from __future__ import annotations

import pytest
import torch
from arch_models import save_tiny
from test_kernels_model import _errors, build, compare, step

from finetune.kernels import KernelOptions
from support import single_thread

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# name -> (family in arch_models, config overrides): Mistral with a window shorter than the rows (sliding layers
# on transformers' attention), Gemma 3's window 8 is shorter than them too.
CASES = {"qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}), "gemma3": ("gemma3", {}), "phi3": ("phi3", {}),
         "phi4mini": ("phi4mini", {}), "ministral3": ("ministral3", {}), "mistral-window": ("mistral", {"sliding_window": 16}),
         "qwen3_moe": ("qwen3_moe", {}), "mixtral": ("mixtral", {})}
MOE = ("qwen3_moe", "mixtral")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core box run far faster on one thread."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    made = {}

    def get(case):
        if case not in made:
            family, overrides = CASES[case]
            made[case] = save_tiny(family, tmp_path_factory.mktemp(case), **overrides)
        return {"dense": made[case]}

    return get


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("packed", [False, True])
def test_fast_path_matches_transformers_and_peft(family_dir, case, packed):
    report = compare(family_dir(case), "nf4", KernelOptions(), packed, tol=2e-5)
    assert report.layers == 2
    if case in MOE:  # attention fused; the experts stay transformers'
        assert report.fused == {"fused LoRA qkv": 2, "fused LoRA o": 2, "offloadable checkpoint": 2}
        assert [why for _, why in report.skipped] == ["the MLP is a mixture of experts"] * 2
    else:
        assert report.fused == {"fused LoRA qkv": 2, "fused LoRA o": 2, "fused LoRA mlp": 2,
                                "offloadable checkpoint": 2}
        assert not report.skipped


def test_fast_path_without_fused_lora_matches_too(family_dir):
    for case in ("gemma3", "phi4mini"):
        compare(family_dir(case), "none", KernelOptions(fused_lora=False), packed=True, dropout=0.1, tol=2e-5)


def test_gpt_oss_attention_sinks_stay_with_transformers(tmp_path):
    model, report = build({"dense": save_tiny("gpt_oss", tmp_path)}, "nf4", KernelOptions())
    assert report.layers == 0 and report.summary().startswith("off (attention sinks")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", ["qwen3", "gemma3", "phi4mini", "ministral3", "mistral-window", "qwen3_moe"])
def test_fast_path_on_gpu_bf16(family_dir, case):
    """bf16 on both sides, packed and plain rows: the fast path (Triton kernels, flash/cuDNN attention where the
    window allows) about as close to an fp32 run as transformers + peft are."""
    dirs = family_dir(case)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3)).cuda()
    for packed in (False, True):
        pos = torch.cat([torch.arange(25), torch.arange(15)]).repeat(2, 1).cuda() if packed else None
        exact_loss, exact = step(build(dirs, "nf4", None, device="cuda")[0], ids, pos)
        ref_loss, ref = step(build(dirs, "nf4", None, device="cuda", dtype="bfloat16")[0], ids, pos, torch.bfloat16)
        loss, got = step(build(dirs, "nf4", KernelOptions(), device="cuda", dtype="bfloat16")[0], ids, pos,
                         torch.bfloat16)
        assert abs(loss - exact_loss) <= 2 * abs(ref_loss - exact_loss) + 2e-3 * abs(exact_loss)
        e_ref, e_got = _errors(ref, exact), _errors(got, exact)
        for n in exact:
            assert e_got[n] <= 2 * e_ref[n] + 1e-2, (n, e_got[n], e_ref[n])


def test_pointwise_twins_are_the_families_arithmetic():
    from transformers.activations import ACT2FN
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    from finetune.kernels import pointwise as P

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 7, 64, dtype=dtype) * 3
        norm = Gemma3RMSNorm(64, eps=1e-6)
        norm.weight.data.normal_(0, 0.3)
        assert torch.equal(P.rms_norm_offset(x, norm.weight, 1e-6, 1.0, kernels=False), norm(x))
        q = torch.randn(2, 7, 4, 16, dtype=dtype)
        ang = torch.randn(2, 7, 6)  # 12 of 16 channels rotated (Phi-4-mini's partial_rotary_factor 0.75)
        cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
        q_hf, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos, sin)
        assert torch.equal(P.partial_rotary(q, cos, sin, kernels=False), q_hf.transpose(1, 2))
        g, u = torch.randn(5, 9, dtype=dtype), torch.randn(5, 9, dtype=dtype)
        assert torch.equal(P.geglu(g, u), ACT2FN["gelu_pytorch_tanh"](g) * u)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_offset_kernel_on_gpu(dtype):
    from kernel_checks import check_rms_norm_offset

    for _ in range(3):
        check_rms_norm_offset("cuda", dtype, rows=4096, hidden=3840)  # Gemma-3-12B's width: masked columns

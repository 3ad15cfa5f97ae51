"""NF4/FP4 storage of a layer's experts: what bitsandbytes leaves alone under transformers 5 (it quantizes
nn.Linear only; the fused 3-D expert parameters stay in the compute dtype, 16 bits a weight).

`NF4Stack` holds one projection (gate, up or down) of all E experts. Each expert's [out, in] matrix is quantized
on its own with bitsandbytes' quantize_4bit, exactly as a Linear4bit of that shape quantizes its weight (blocks of
64, the double quantization the base asks for: the block scales quantized in blocks of 256 around their mean), and
the per-expert results are stacked: packed codes [E, out·in/2] uint8, block scales [E, blocks] (8-bit codes with
their own scales [E, blocks/256] and offset [E] when doubly quantized), the code tables once. So expert e
dequantized here is bit for bit the Linear4bit an expert-by-expert conversion would hold, and the merge rebuilds
it with the same function (quant.formats.bnb_lib.rebuild_4bit).

`weights(experts, dtype)` dequantizes only the experts asked for, in two bitsandbytes ops for the whole set when
the blocks do not straddle experts (out·in a multiple of 64, the 8-bit scale blocks of 256 within one expert's
scales), else expert by expert. `expert_forward(e, x)` multiplies by one expert's weight, made on the fly in
forward and again in backward (never kept), as the packed layers do.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.errors import UserError
from quant.formats.base import FrozenWeight
from quant.formats.bnb_lib import BLOCKSIZE, quantize_4bit
from quant.moe.convert import defuse
from quant.moe.experts import ExpertSpec, MoEExperts
from quant.moe.layout import PROJECTIONS, expert_matrices, fused_keys
from quant.tensorfiles import Checkpoint

NESTED_BLOCK = 256  # bitsandbytes' block for the double-quantized block scales


class _StackMatmul(torch.autograd.Function):
    """y = x @ W_eᵀ for a stacked expert's frozen W_e; backward dequantizes W_e again instead of keeping it."""

    @staticmethod
    def forward(ctx, x, stack, e):
        ctx.stack, ctx.e = stack, e
        return x @ stack.weights([e], x.dtype)[0].T

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ ctx.stack.weights([ctx.e], grad_out.dtype)[0] if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class NF4Stack(nn.Module):
    """See the module docstring. Buffers: weight, absmax (+ absmax2, offset when nested), code (+ code2), bias."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, quant_type: str, nested: bool,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.quant_type, self.nested, self.dtype = quant_type, nested, dtype
        n = out_features * in_features
        self.blocks = -(-n // BLOCKSIZE)
        self.register_buffer("weight", torch.zeros(num_experts, (n + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(num_experts, self.blocks, device=device,
                                                   dtype=torch.uint8 if nested else torch.float32))
        self.register_buffer("code", torch.zeros(16, device=device))
        if nested:
            self.register_buffer("absmax2", torch.zeros(num_experts, -(-self.blocks // NESTED_BLOCK), device=device))
            self.register_buffer("offset", torch.zeros(num_experts, device=device))
            self.register_buffer("code2", torch.zeros(256, device=device))
        self.bias = None

    @classmethod
    @torch.no_grad()
    def quantize(cls, W: torch.Tensor, bias: torch.Tensor | None, quant_type: str, nested: bool,
                 dtype: torch.dtype) -> "NF4Stack":
        """The stack of W [E, out, in] cast to `dtype` (the compute dtype, as Linear4bit quantizes), each expert
        quantized on its own; `bias` [E, out] is kept in `dtype`."""
        E, out_f, in_f = W.shape
        stack = cls(E, out_f, in_f, quant_type, nested, dtype, device=W.device)
        for e in range(E):
            q, state = quantize_4bit(W[e], quant_type, nested, dtype, torch.uint8)
            stack.weight[e] = q.reshape(-1)
            if nested:
                stack.absmax[e] = state.absmax
                stack.absmax2[e] = state.state2.absmax
                stack.offset[e] = state.offset
            else:
                stack.absmax[e] = state.absmax
        stack.code.copy_(state.code)
        if nested:
            stack.code2.copy_(state.state2.code)
        if bias is not None:
            stack.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return stack

    def _scales(self, idx: torch.Tensor) -> torch.Tensor:
        """fp32 block scales [n, blocks] of the experts `idx`."""
        if not self.nested:
            return self.absmax.index_select(0, idx).float()
        q, a2 = self.absmax.index_select(0, idx), self.absmax2.index_select(0, idx)
        decode = torch.ops.bitsandbytes.dequantize_blockwise.default
        if self.blocks % NESTED_BLOCK == 0:
            flat = decode(q.reshape(-1), a2.reshape(-1), self.code2, NESTED_BLOCK, torch.float32)
            scales = flat.view(len(idx), self.blocks)
        else:
            scales = torch.stack([decode(q[i], a2[i], self.code2, NESTED_BLOCK, torch.float32)
                                  for i in range(len(idx))])
        return scales + self.offset.index_select(0, idx)[:, None]

    def weights(self, experts: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Dense [len(experts), out, in] in `dtype` (dequantized in the stored compute dtype, then cast).

        The codes go to bitsandbytes' op as one flat row: its CPU kernel (0.50.2) reads a 2-D shape as rows of
        whole blocks and dequantizes a matrix with fewer than 64 columns wrongly (a [64, 32] weight comes back with
        errors of 1.9 where the quantization error is 0.39); the flat row is what the CUDA kernel reads anyway."""
        idx = torch.as_tensor(experts, device=self.weight.device, dtype=torch.long)
        packed, scales = self.weight.index_select(0, idx), self._scales(idx)
        n, numel = len(experts), self.out_features * self.in_features
        dequantize = torch.ops.bitsandbytes.dequantize_4bit.default
        if numel % BLOCKSIZE == 0:
            W = dequantize(packed.reshape(-1), scales.reshape(-1), BLOCKSIZE, self.quant_type, (n * numel,),
                           self.dtype)
        else:
            W = torch.stack([dequantize(packed[i], scales[i], BLOCKSIZE, self.quant_type, (numel,), self.dtype)
                             for i in range(n)])
        W = W.view(n, self.out_features, self.in_features)
        return W if W.dtype == dtype else W.to(dtype)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        y = _StackMatmul.apply(x, self, e)
        return y if self.bias is None else y + self.bias[e].to(y.dtype)

    def storage(self) -> list[torch.Tensor]:
        """The tensors holding the quantized weights (what the memory report counts as quantized storage)."""
        names = ("weight", "absmax", "code") + (("absmax2", "offset", "code2") if self.nested else ())
        return [getattr(self, n) for n in names]

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, out_features={self.out_features}, in_features={self.in_features}, "
                f"{self.quant_type}, double_quant={self.nested}, compute={self.dtype}, bias={self.bias is not None}")


class StackWeight(FrozenWeight):
    """A stack's weights as dense tensors: `weight(dtype, experts=[...])` -> [n, out, in]."""

    kind = "bnb4-experts"

    def __call__(self, dtype, slot=0, experts: list[int] | None = None):
        stack = self.layer
        return stack.weights(list(range(stack.num_experts)) if experts is None else experts, dtype)


def round_trip(W: torch.Tensor, quant_type: str, nested: bool, dtype: torch.dtype) -> torch.Tensor:
    """One expert's [out, in] weight as the stack holds it (quantized, dequantized in `dtype`): what the merge
    rebuilds an NF4 base's experts with."""
    return NF4Stack.quantize(W[None], None, quant_type, nested, dtype).weights([0], dtype)[0]


def nf4_experts(spec: ExpertSpec, mats, quant_type: str, nested: bool, dtype: torch.dtype) -> MoEExperts:
    """A layer's experts (quant.moe.layout.expert_matrices of the fused module) as NF4/FP4 stacks."""
    return MoEExperts(spec, stacks={p: NF4Stack.quantize(mats[p][0], mats[p][1], quant_type, nested, dtype)
                                    for p in PROJECTIONS})


# ---- as a merge output (finetune merge --format nf4 of a mixture of experts)

STORAGE = "qlora-finetune per-expert NF4 stacks (quant.formats.bnb_experts)"


def encode_experts(arch, tensors: dict[str, torch.Tensor], quant_type: str, dtype: torch.dtype) -> dict:
    """The fused expert parameters among `tensors` (memory names; taken out of it) as the stacks' tensors: what a
    base loaded with MoEExperts(stacks) holds, `<experts>.<gate|up|down name>.{weight, absmax, ...}`."""
    out = {}
    spec = ExpertSpec.of(arch)
    part = arch.family.experts
    for path in sorted({p for p, _ in fused_keys(arch, tensors)}):
        mats = expert_matrices(part, {n: tensors.pop(f"{path}.{n}") for n in part.parameters})
        layer = nf4_experts(spec, mats, quant_type, True, dtype)
        out.update({f"{path}.{k}": v for k, v in layer.state_dict().items()})
    return out


def load_experts(model: nn.Module, model_dir, arch, quant_type: str, dtype: torch.dtype, device) -> None:
    """Replace `model`'s experts (transformers initialized them: bitsandbytes has no layer for them) by the NF4
    stacks stored in `model_dir` (encode_experts' tensors)."""
    ckpt = Checkpoint(model_dir, "model")
    keys = {arch.to_memory(k): k for k in ckpt.keys()}

    def build(path, spec, _mats):
        stacks = {}
        for p, name in zip(PROJECTIONS, spec.names):
            prefix = f"{path}.{name}."
            state = {k[len(prefix):]: ckpt.get(disk, device) for k, disk in keys.items() if k.startswith(prefix)}
            if "weight" not in state:
                raise UserError(f"{model_dir}: no NF4 expert tensors {prefix}weight; not a merge output of ours")
            out_f, in_f = spec.shape(p)
            stack = NF4Stack(spec.num_experts, out_f, in_f, quant_type, "absmax2" in state, dtype, device=device)
            if "bias" in state:
                stack.bias = nn.Parameter(torch.empty(spec.num_experts, out_f, dtype=dtype, device=device),
                                          requires_grad=False)
            stack.load_state_dict(state, strict=True)
            stacks[p] = stack
        return MoEExperts(spec, stacks=stacks)

    defuse(model, build, arch)

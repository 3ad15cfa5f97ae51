"""Cross-entropy of a linear LM head, computed in row chunks so full-vocabulary logits never exist at once.

For a 128k vocabulary and 8192 tokens the plain path materialises bf16 logits (2 GiB), their fp32 copy
(4 GiB), the softmax for backward (4 GiB) and the logits' gradient: ~10+ GiB at peak, more than a whole NF4
8B base. Here each chunk's logits live only inside `forward`: the gradient w.r.t. the hidden states is
computed there too (softmax - one-hot, times the head weight) and kept, [tokens, hidden] in the hidden
states' dtype, so backward is one multiply. The head weight must be frozen (LoRA leaves lm_head alone).

The arithmetic matches `F.cross_entropy(logits.float(), ...)` on `hidden @ weight.T` in the compute dtype:
the matmul runs in the hidden states' dtype, the softmax and the loss in fp32, the logits' gradient is
rounded to the compute dtype before its matmul, as autograd does on the plain path.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, ignore_index: int):
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = y != ignore_index
            target = y.clamp_min(0)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
                probs[torch.arange(len(y), device=y.device), target] -= 1.0
                probs *= valid[:, None]
                grad_hidden[start : start + chunk] = probs.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_tokens: int = 2048, ignore_index: int = -100) -> torch.Tensor:
    """Sum over rows with label != ignore_index of CE(hidden @ weight.T, label); hidden [T, H], labels [T]."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy_sum needs a frozen head weight (its gradient is not computed)")
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, ignore_index)

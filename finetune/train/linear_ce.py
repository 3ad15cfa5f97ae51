"""Cross-entropy of a linear LM head, computed in row chunks so full-vocabulary logits never exist at once.

For a 128k vocabulary and 8192 tokens the plain path materialises bf16 logits (2 GiB), their fp32 copy
(4 GiB), the softmax for backward (4 GiB) and the logits' gradient: ~10+ GiB at peak, more than a whole NF4
8B base. Here each chunk's logits live only inside `forward`: the gradient w.r.t. the hidden states is
computed there too (softmax - one-hot, times the head weight) and kept, [tokens, hidden] in the hidden
states' dtype, so backward is one multiply. The head weight must be frozen (LoRA leaves lm_head alone).

The arithmetic matches `F.cross_entropy(logits.float(), ...)` on `hidden @ weight.T` in the compute dtype:
the matmul runs in the hidden states' dtype, the softmax and the loss in fp32, the logits' gradient is
rounded to the compute dtype before its matmul, as autograd does on the plain path.

`linear_log_probs` is the same computation returning each row's log-probability of its label (preference
objectives need per-sequence sums, not one total). The gradient of log p(y_t) w.r.t. hidden row t depends only on
row t, (onehot - softmax) @ W, so forward keeps it per row and backward scales each row by its incoming gradient.
"""

from __future__ import annotations

import torch


def _chunks(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, ignore_index: int,
            grad_hidden: torch.Tensor | None):
    """Per chunk of rows: yield (start, the rows' cross-entropy, 0 where ignored), and when `grad_hidden` is given
    write d CE / d hidden of those rows into it (zero where ignored)."""
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], labels[start : start + chunk]
        logits = (h @ weight.T).float()
        lse = torch.logsumexp(logits, dim=-1)
        valid = y != ignore_index
        target = y.clamp_min(0)
        picked = logits.gather(1, target[:, None]).squeeze(1)
        yield start, torch.where(valid, lse - picked, 0.0)
        if grad_hidden is not None:
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
            probs[torch.arange(len(y), device=y.device), target] -= 1.0
            probs *= valid[:, None]
            grad_hidden[start : start + chunk] = probs.to(hidden.dtype) @ weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, ignore_index: int):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for _, loss in _chunks(hidden, weight, labels, chunk, ignore_index, grad_hidden):
            total += loss.sum()
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


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, ignore_index: int):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # d CE / d hidden = -d logp
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start, loss in _chunks(hidden, weight, labels, chunk, ignore_index, grad_hidden):
            torch.neg(loss, out=out[start : start + len(loss)])
        ctx.save_for_backward(grad_hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out.neg().to(grad_hidden.dtype)[:, None], None, None, None, None


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 2048,
                     ignore_index: int = -100) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[t, labels[t]] for each row t (fp32, 0 where labels == ignore_index)."""
    if weight.requires_grad:
        raise ValueError("linear_log_probs needs a frozen head weight (its gradient is not computed)")
    return _LinearLogProbs.apply(hidden, weight, labels, chunk_tokens, ignore_index)

"""Gradient checkpointing of decoder layers with each layer's input held in pinned host memory.

With plain checkpointing every layer's input stays on the GPU until backward: layers x tokens x hidden x 2 bytes,
64 GiB for an 8B model at 256k tokens, more than everything else together. Here the forward runs the layer
without building a graph, copies its input to pinned host memory on a side stream (overlapped with the next
layers' compute; the GPU copy is freed as soon as the copy has read it), and backward copies it back, reruns
the layer with autograd and backpropagates through it (the reentrant scheme, as torch.utils.checkpoint's
use_reentrant=True: the RNG and autocast state of the forward are restored for the rerun).

`LayerCheckpoint` is what transformers calls as a layer's `_gradient_checkpointing_func`; it offloads when the
micro-batch has at least `min_tokens` tokens and otherwise runs PyTorch's non-reentrant checkpoint, marking its
recomputation (`in_recompute`) so the fused MLP can skip the output nothing reads. (The reentrant offloaded
rerun is not marked: it backpropagates from the layer's output, so it needs all of it.)
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.checkpoint import checkpoint

_streams: dict = {}
_state = threading.local()


@contextmanager
def _recomputing():
    prev = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = prev


def in_recompute() -> bool:
    """True while non-reentrant checkpointing reruns a layer to rebuild what its backward saved. Outputs that
    backward never reads need not be computed then (mlp.py skips the down projection)."""
    return getattr(_state, "on", False)


def _contexts():
    return nullcontext(), _recomputing()


def _side_stream(device: torch.device):
    s = _streams.get(device)
    if s is None:
        s = _streams[device] = torch.cuda.Stream(device)
    return s


class _HostCopy:
    """A tensor's copy in pinned host memory, made asynchronously on a side stream for CUDA tensors."""

    def __init__(self, t: torch.Tensor):
        self.device, self.event = t.device, None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            stream = _side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                self.host.copy_(t, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(stream)
            t.record_stream(stream)  # the allocator must not hand out t's memory before the copy has read it
        else:
            self.host = t.detach().clone()

    def back(self) -> torch.Tensor:
        if self.event is None:
            return self.host
        torch.cuda.current_stream(self.device).wait_event(self.event)
        return self.host.to(self.device, non_blocking=True)


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, _anchor, hidden):
        device_type = hidden.device.type
        ctx.run = run
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None)
        ctx.hidden_grad = hidden.requires_grad
        with torch.no_grad():
            out = run(hidden)
        ctx.saved = _HostCopy(hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, ctx.saved = ctx.saved, None
        hidden = saved.back().detach().requires_grad_(ctx.hidden_grad)
        device_type, enabled, dtype = ctx.autocast
        cpu_rng, cuda_rng = ctx.rng
        devices = [hidden.device] if hidden.is_cuda else []
        with torch.random.fork_rng(devices=devices, device_type=device_type if devices else "cuda"):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, hidden.device)
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden)
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        return None, None, hidden.grad if ctx.hidden_grad else None


_ANCHORS: dict = {}


def _anchor(device: torch.device) -> torch.Tensor:
    # An input that requires grad, so the layer's output does even when its input does not (first layer, frozen
    # embeddings): the rerun in backward is what gives the LoRA weights inside the layer their gradients.
    a = _ANCHORS.get(device)
    if a is None:
        a = _ANCHORS[device] = torch.empty(0, device=device, requires_grad=True)
    return a


def offloaded_checkpoint(run, hidden: torch.Tensor):
    """run(hidden) with `hidden` kept in host memory instead of the device until backward."""
    out = _OffloadedLayer.apply(run, _anchor(hidden.device), hidden)
    return out


class LayerCheckpoint:
    """A decoder layer's checkpoint function: host-offloaded for long micro-batches, else non-reentrant."""

    def __init__(self, min_tokens: int | None):
        self.min_tokens = min_tokens  # None: never offload; 0: always

    def offloads(self, hidden: torch.Tensor) -> bool:
        return self.min_tokens is not None and hidden.numel() // hidden.shape[-1] >= self.min_tokens

    def __call__(self, function, *args, **kwargs):
        hidden = args[0] if args else None
        if (isinstance(hidden, torch.Tensor) and len(args) == 1 and not kwargs and torch.is_grad_enabled()
                and self.offloads(hidden)):
            out = offloaded_checkpoint(lambda h: _only_tensor(function(h)), hidden)
            return out
        return checkpoint(function, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def _only_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"offloaded checkpointing needs a decoder layer that returns a tensor, got {type(out).__name__}")

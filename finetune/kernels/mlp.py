"""The whole SwiGLU MLP with LoRA on gate, up and down as one autograd function, optionally in sequence tiles.

    g = x W_g^T + s_g (x A_g^T) B_g^T,   u likewise,   h = silu(g) * u,   y = h W_d^T + s_d (h A_d^T) B_d^T

Untiled, the function keeps x, g and u for backward and recomputes h there (one pointwise pass) instead of
keeping it: eager keeps g, u, silu(g) and h. Backward writes dh into the recomputed h's buffer and dg over dh.

Tiled (`tile` tokens at a time, for long sequences), forward keeps only x and the skinny LoRA products; backward
recomputes g and u tile by tile. The [tokens, intermediate] tensors then exist for one tile at a time, which is
what lets a 256k-token sequence through an 8B MLP (14336 wide: 7 GiB per such tensor untiled). The price is
one more pair of gate/up GEMMs per tile in backward. Each frozen weight is dequantized once per call into its
own reused buffer (slots 0-2), not once per tile; untiled, the three take turns in one buffer.

Under gradient checkpointing the recomputation only has to rebuild what backward saves (x, g, u and the skinny
products); the MLP's output is not among it (the layer's output is never read in backward), so in the
recomputation (`offload.in_recompute`) the down projection's GEMM is skipped: a quarter of a layer's weights.

LoRA dropout (untiled only): gate's and up's dropped inputs come in from `torch.native_dropout` outside (so its
autograd carries their gradient back to x) and only their bool masks are kept; down's input h is dropped inside,
where h is made, and backward rebuilds the dropped h from its mask. The masks are drawn in eager's order (gate, up,
down), so a seed gives peft's masks. Tiled calls with dropout fall back to `lora.project` + `pointwise.swiglu`
(one mask per tile would not be eager's).
"""

from __future__ import annotations

import torch

from finetune.kernels.lora import Projection, compute_dtype, dropped, lora_plus_base, no_autocast, project
from finetune.kernels.offload import in_recompute
from finetune.kernels.pointwise import swiglu, swiglu_backward_into, swiglu_forward_into


class _Weights:
    """Dequantized gate/up/down weights: held in slots 0-2 for a tiled call, else made in slot 0 when asked."""

    def __init__(self, projs, dtype, hold: bool):
        self.projs, self.dtype, self.hold, self.held = projs, dtype, hold, {}

    def __call__(self, i: int) -> torch.Tensor:
        if not self.hold:
            return self.projs[i].weight(self.dtype, 0)
        if i not in self.held:
            self.held[i] = self.projs[i].weight(self.dtype, i)
        return self.held[i]


def _gate_up(gate: Projection, up: Projection, xs, W, xa, Bg, Bu):
    rg = Bg.shape[1]
    g = lora_plus_base(gate, xs, W(0), xa[:, :rg], Bg)
    u = lora_plus_base(up, xs, W(1), xa[:, rg:], Bu)
    return g, u


def _acc(total, part):
    return part.float() if total is None else total.add_(part)


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, x2d, *params):
        with no_autocast(x2d):
            return _LoRAMLP._forward(ctx, spec, x2d, *params)

    @staticmethod
    def backward(ctx, dy):
        with no_autocast(dy):
            return _LoRAMLP._backward(ctx, dy)

    @staticmethod
    def _forward(ctx, spec, x2d, Ag, Bg, Au, Bu, Ad, Bd, xg, xu, keep_g, keep_u):
        gate, up, down, tile, kernels, need_output, p_down = spec
        dtype = x2d.dtype
        T = x2d.shape[0]
        step = tile or T
        Bg_, Bu_, Ad_, Bd_ = (t.to(dtype) for t in (Bg, Bu, Ad, Bd))
        W = _Weights((gate, up, down), dtype, hold=tile is not None)
        if xg is None and xu is None:
            xa = x2d @ torch.cat([Ag, Au]).to(dtype).t()
        else:  # dropped inputs: each LoRA A sees its own
            xa = torch.cat([(x2d if xg is None else xg) @ Ag.to(dtype).t(),
                            (x2d if xu is None else xu) @ Au.to(dtype).t()], dim=1)
        ha = torch.empty((T, Ad.shape[0]), dtype=dtype, device=x2d.device)
        y = torch.empty((T, down.out_features), dtype=dtype, device=x2d.device) if need_output else None
        g = u = keep_d = None
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            g, u = _gate_up(gate, up, x2d[t0:t1], W, xa[t0:t1], Bg_, Bu_)
            h = swiglu_forward_into(g, u, kernels)
            if p_down:
                hd, keep_d = torch.native_dropout(h, p_down, True)
                torch.mm(hd, Ad_.t(), out=ha[t0:t1])
                del hd
            else:
                torch.mm(h, Ad_.t(), out=ha[t0:t1])
            if need_output:
                lora_plus_base(down, h, W(2), ha[t0:t1], Bd_, out=y[t0:t1])
        keep = tile is None
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x2d, xa, ha, g if keep else None, u if keep else None, Ag, Bg, Au, Bu, Ad, Bd,
                              keep_g, keep_u, keep_d)
        if y is None:  # recomputation: nothing reads the output (see the module docstring)
            return x2d.new_zeros(()).expand(T, down.out_features)
        return y

    @staticmethod
    def _backward(ctx, dy):
        gate, up, down, tile, kernels, _, p_down = ctx.spec
        x2d, xa, ha, g_saved, u_saved, Ag, Bg, Au, Bu, Ad, Bd, keep_g, keep_u, keep_d = ctx.saved_tensors
        dtype = x2d.dtype
        dy = dy.reshape(-1, down.out_features)
        T = x2d.shape[0]
        step = tile or T
        rg = Bg.shape[1]
        Ag_, Bg_, Au_, Bu_, Ad_, Bd_ = (t.to(dtype) for t in (Ag, Bg, Au, Bu, Ad, Bd))
        A_gu = torch.cat([Ag_, Au_])
        W = _Weights((gate, up, down), dtype, hold=tile is not None)
        need_x = ctx.needs_input_grad[1]
        dx = torch.empty_like(x2d) if need_x else None
        dAg = dBg = dAu = dBu = dAd = dBd = dxg = dxu = None
        dropout = keep_g is not None or keep_u is not None
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            xs, dys, xas, has = x2d[t0:t1], dy[t0:t1], xa[t0:t1], ha[t0:t1]
            if g_saved is not None:
                g, u = g_saved, u_saved
                du = torch.empty_like(u)
            else:
                g, u = _gate_up(gate, up, xs, W, xas, Bg_, Bu_)
                du = u  # recomputed here, so its buffer can take du (the kernel reads u before writing du)
            h = swiglu_forward_into(g, u, kernels)
            dha = (dys @ Bd_).mul_(down.scale)
            dBd = _acc(dBd, (dys.t() @ has).mul_(down.scale))
            if keep_d is None:
                dAd = _acc(dAd, dha.t() @ h)
                dh = torch.mm(dha, Ad_, out=h).addmm_(dys, W(2))  # h is not needed any more: dh takes its buffer
            else:  # the LoRA path saw dropout(h): its A gradient and its share of dh go through the mask
                dAd = _acc(dAd, dha.t() @ dropped(h, keep_d, p_down))
                dh = dropped(torch.mm(dha, Ad_, out=h), keep_d, p_down).addmm_(dys, W(2))
            dg, du = swiglu_backward_into(dh, g, u, kernels, dg=dh, du=du)
            dxa = torch.cat([(dg @ Bg_).mul_(gate.scale), (du @ Bu_).mul_(up.scale)], dim=1)
            dBg = _acc(dBg, (dg.t() @ xas[:, :rg]).mul_(gate.scale))
            dBu = _acc(dBu, (du.t() @ xas[:, rg:]).mul_(up.scale))
            if not dropout:
                dA = dxa.t() @ xs
                dAg, dAu = _acc(dAg, dA[:rg]), _acc(dAu, dA[rg:])
                if need_x:
                    torch.mm(dxa, A_gu, out=dx[t0:t1]).addmm_(dg, W(0)).addmm_(du, W(1))
                continue
            # Untiled (see the module docstring): one pass. A dropped input's gradient goes back through
            # native_dropout's own backward; an undropped one's joins dx.
            dxa_g, dxa_u = dxa[:, :rg], dxa[:, rg:]
            dAg = dxa_g.t() @ (xs if keep_g is None else dropped(xs, keep_g, gate.dropout.p))
            dAu = dxa_u.t() @ (xs if keep_u is None else dropped(xs, keep_u, up.dropout.p))
            if keep_g is not None:
                dxg = dxa_g @ Ag_
            if keep_u is not None:
                dxu = dxa_u @ Au_
            if need_x:
                torch.mm(dg, W(0), out=dx).addmm_(du, W(1))
                if keep_g is None:
                    dx.addmm_(dxa_g, Ag_)
                if keep_u is None:
                    dx.addmm_(dxa_u, Au_)
        grads = [t.to(p.dtype) for t, p in ((dAg, Ag), (dBg, Bg), (dAu, Au), (dBu, Bu), (dAd, Ad), (dBd, Bd))]
        return (None, dx, *grads, dxg, dxu, None, None)


def lora_mlp(gate: Projection, up: Projection, down: Projection, x: torch.Tensor, tile: int | None = None,
             kernels: bool = True) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with every LoRA path fused; `tile` tokens at a time when given. LoRA dropout
    only untiled (ValueError otherwise: the caller takes `lora.project` + `pointwise.swiglu`)."""
    if not all(p.enabled for p in (gate, up, down)):  # adapters switched off: `project` computes the base layers
        return project([down], swiglu(*project([gate, up], x), kernels))[0]
    dtype = compute_dtype(x)
    x = x.to(dtype)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if tile is not None and tile >= x2d.shape[0]:
        tile = None
    active = [p.dropout is not None and p.dropout.training for p in (gate, up, down)]
    if any(active) and tile is not None:
        raise ValueError("lora_mlp takes LoRA dropout only untiled")
    (xg, keep_g), (xu, keep_u) = (torch.native_dropout(x2d, p.dropout.p, True) if on else (None, None)
                                  for p, on in zip((gate, up), active[:2]))
    spec = (gate, up, down, tile, kernels, not in_recompute(), down.dropout.p if active[2] else 0.0)
    y = _LoRAMLP.apply(spec, x2d, gate.A, gate.B, up.A, up.B, down.A, down.B, xg, xu, keep_g, keep_u)
    return y.view(*lead, y.shape[-1])

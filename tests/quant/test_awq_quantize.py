"""AWQ: the grid, the scale and clipping searches, the folds, and the whole-model driver."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from quant_helpers import calib_ids, tiny_llama

from quant.awq.blocks import Fold, _fold_is_exact
from quant.awq.model import load_awq_model, quantize_model_awq, save_awq
from quant.awq.nn import AWQLinear
from quant.awq.solver import (AWQConfig, dequantize_codes, fake_quantize, group_params, hessian_loss, quantize_codes,
                              search_clip, search_scales)
from quant.errors import UserError
from quant.feedback import HessianAccumulator


def test_grid_is_asymmetric_with_fp16_scales_and_zero_in_range():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 80, generator=g) * 0.1 + 0.02  # 80 = 2 full groups of 32 and a partial one of 16
    W[3, :32] = 0.0  # an all-zero group
    W[5, 32:64] = W[5, 32:64].abs() + 0.01  # an all-positive group
    scale, zero = group_params(W, 4, 32)
    assert scale.shape == zero.shape == (16, 3)
    assert torch.equal(scale, scale.half().float()) and torch.equal(zero, zero.round())
    assert int(zero.min()) >= 0 and int(zero.max()) <= 15
    q = quantize_codes(W, scale, zero, 4, 32)
    assert q.dtype == torch.uint8 and q.shape == W.shape and int(q.max()) <= 15
    Wq = dequantize_codes(q, scale, zero, 32)
    step = scale.repeat_interleave(32, dim=1)[:, :80]
    assert bool(((Wq - W).abs() <= step / 2 + 1e-7).all())  # nothing is clipped by the min-max grid
    assert bool((Wq[3, :32] == 0).all())
    assert torch.equal(fake_quantize(W, 4, 32), Wq)


def salient_layer(seed=0):
    """A Linear whose inputs have a few channels 30x larger than the rest, as LLM activations do."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 128, generator=g) * 0.05
    X = torch.randn(4096, 128, generator=g)
    X[:, [3, 40, 77, 100]] *= 30
    acc = HessianAccumulator(128, "cpu")
    acc.add(X)
    return W, X, acc.H


def test_scale_search_protects_salient_channels_and_never_loses_to_rtn():
    W, X, H = salient_layer()
    cfg = AWQConfig(group_size=32)
    choice = search_scales([W], X.abs().mean(dim=0), hessian_loss([W], H), cfg)
    assert choice.loss <= choice.rtn_loss
    assert choice.alpha > 0 and choice.loss < 0.5 * choice.rtn_loss, choice
    # The loss is the real output error: check it against the data directly.
    s = choice.scales
    Wq = fake_quantize(W * s, 4, 32) / s
    direct = lambda V: ((X @ (V - W).T) ** 2).sum().item()  # noqa: E731
    assert direct(Wq) < 0.5 * direct(fake_quantize(W, 4, 32))
    # Duo scaling is a different family of candidates, still never worse than RTN.
    duo = search_scales([W], X.abs().mean(dim=0), hessian_loss([W], H), AWQConfig(group_size=32, duo_scaling=True))
    assert duo.loss <= duo.rtn_loss


def test_clip_search_lowers_each_groups_output_error():
    W, X, H = salient_layer(seed=1)
    cfg = AWQConfig(group_size=32)
    p = search_clip(W, H, cfg)
    assert p.shape == (64, 4) and float(p.min()) >= 0.55 - 1e-6 and float(p.max()) == 1.0 and bool((p < 1).any())

    def group_errors(V):
        d = (V - W).view(64, 4, 32)
        return torch.stack([torch.einsum("ni,ij,nj->n", d[:, g], H[g * 32:(g + 1) * 32, g * 32:(g + 1) * 32],
                                         d[:, g]) for g in range(4)], dim=1)

    clipped, plain = group_errors(fake_quantize(W, 4, 32, shrink=p)), group_errors(fake_quantize(W, 4, 32))
    assert bool((clipped <= plain * (1 + 1e-5)).all()) and clipped.sum() < plain.sum()


def block_and_sample(model):
    block = model.model.layers[0]
    ids = calib_ids(1, 16)[0]
    captured = {}

    def hook(_m, args, kwargs):
        captured["h"], captured["kw"] = (args[0] if args else kwargs.pop("hidden_states")), dict(kwargs)
        raise RuntimeError("stop")

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(ids, use_cache=False)
    except RuntimeError:
        pass
    handle.remove()
    captured["kw"].pop("hidden_states", None)
    return block, captured["h"], captured["kw"]


def test_a_fold_is_used_only_where_it_leaves_the_block_unchanged():
    model = tiny_llama()
    block, h, kw = block_and_sample(model)
    attn, mlp = block.self_attn, block.mlp
    before = {k: v.clone() for k, v in block.state_dict().items()}
    assert _fold_is_exact(block, Fold("norm", "input_layernorm", block.input_layernorm),
                          [attn.q_proj, attn.k_proj, attn.v_proj], h, kw)
    assert _fold_is_exact(block, Fold("linear", "mlp.up_proj", mlp.up_proj), [mlp.down_proj], h, kw)
    # Wrong folds: a norm that does not feed the group; a norm that feeds more than the scaled Linears.
    assert not _fold_is_exact(block, Fold("norm", "post_attention_layernorm", block.post_attention_layernorm),
                              [attn.q_proj, attn.k_proj, attn.v_proj], h, kw)
    assert not _fold_is_exact(block, Fold("norm", "input_layernorm", block.input_layernorm), [attn.q_proj], h, kw)
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the probes are undone exactly


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_scales_are_folded_where_the_architecture_allows(kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=128,
                                         max_position_embeddings=256)).eval()
    report = quantize_model_awq(model, calib_ids(4, 32), AWQConfig(group_size=32), progress=False)
    folds = {e["layers"][0].split(".", 3)[3]: e["fold"] for e in report.scales if e["layers"][0].startswith("model.layers.1")}
    assert folds == {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
                     "mlp.down_proj": "mlp.up_proj",
                     # v -> o needs v's outputs to be o's inputs one to one: not with grouped-query attention
                     "self_attn.o_proj": "self_attn.v_proj" if kv_heads == 4 else None}
    assert all(0 <= e["alpha"] < 1 and e["loss_vs_rtn"] <= 1 + 1e-6 for e in report.scales if e["fold"])


def test_dithered_rounding_keeps_a_small_change_that_nearest_rounding_drops():
    """A merged weight is the base's grid point plus a delta far below half a step. Nearest rounding on that grid
    returns the base's codes (the change is lost); dithered rounding keeps the change's effect on the layer's
    outputs in expectation, reproducibly for a seed, at a noise no larger than the base's own quantization."""
    from quant.feedback import round_on_grid

    g = torch.Generator().manual_seed(0)
    N, K, gs = 64, 256, 64
    W = torch.randn(N, K, generator=g)
    X = torch.randn(4096, K, generator=g) * torch.linspace(0.2, 3, K)
    H = X.T @ X / len(X)
    base = dequantize_codes(quantize_codes(W, *group_params(W, 4, gs), 4, gs), *group_params(W, 4, gs), gs)
    delta = torch.randn(N, 4, generator=g) @ torch.randn(4, K, generator=g) * 0.01
    merged = base + delta
    scale, zero = group_params(merged, 4, gs)

    def kept(q):  # the share of the delta's effect on the outputs that the codes keep
        d = dequantize_codes(q, scale, zero, gs) - base
        return float((d @ H @ delta.T).trace() / (delta @ H @ delta.T).trace())

    nearest = quantize_codes(merged, scale, zero, 4, gs)
    dithered = [round_on_grid(merged, H, scale, zero, gs, 4, dither=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert kept(nearest) < 0.1
    assert all(0.85 < kept(q) < 1.15 for q in dithered)
    again = round_on_grid(merged, H, scale, zero, gs, 4, dither=torch.Generator().manual_seed(1))
    assert torch.equal(again, dithered[0]) and not torch.equal(dithered[0], dithered[1])

    def noise(A, ref):
        return float(((A - ref) @ H @ (A - ref).T).trace())

    assert noise(dequantize_codes(dithered[0], scale, zero, gs), merged) < noise(base, W)


def test_feedback_rounding_has_less_output_error_than_nearest_on_the_same_grid():
    from quant.feedback import round_on_grid, relative_error

    g = torch.Generator().manual_seed(0)
    N, K, gs = 64, 256, 64
    W = torch.randn(N, K, generator=g)
    X = torch.randn(4096, K, generator=g) @ (torch.eye(K) + torch.randn(K, K, generator=g) / K**0.5)
    H = X.T @ X / len(X)
    scale, zero = group_params(W, 4, gs)
    nearest = dequantize_codes(quantize_codes(W, scale, zero, 4, gs), scale, zero, gs)
    feedback = dequantize_codes(round_on_grid(W, H, scale, zero, gs, 4), scale, zero, gs)
    half = dequantize_codes(round_on_grid(W, H, scale, zero, gs, 4, decorrelate=0.5), scale, zero, gs)
    errors = [relative_error(W, Wq, H) for Wq in (nearest, half, feedback)]
    assert errors[2] < errors[1] < errors[0], errors  # decorrelated feedback sits between the two on its own data


def test_awq_beats_rtn_and_round_trips_through_the_checkpoint(tmp_path):
    base = tiny_llama()
    calib = calib_ids(8, 64)
    err = {}
    for method in ("rtn", "awq"):
        model = copy.deepcopy(base)
        report = quantize_model_awq(model, calib if method == "awq" else None, AWQConfig(group_size=32, method=method),
                                    progress=False)
        assert len(report.layers) == 14 and all(isinstance(m, AWQLinear) for n, m in model.named_modules()
                                                if n.endswith(("q_proj", "o_proj", "down_proj")))
        ids = calib_ids(2, 48, seed=7)[0]
        with torch.no_grad():
            ref, got = base(ids).logits, model(ids).logits
        err[method] = ((got - ref).pow(2).sum() / ref.pow(2).sum()).item()
        if method == "awq":
            out = save_awq(model, tmp_path / "awq", dtype=torch.float32, report=report)
            log = json.loads((out / "quant_log.json").read_text())
            assert log["method"] == "awq" and len(log["layers"]) == 14 and len(log["scales"]) == 8
            loaded = load_awq_model(out)
            with torch.no_grad():
                assert torch.equal(loaded(ids).logits, got)
            assert loaded.config.quantization_config["meta"]["clip"] is True
    assert err["awq"] < err["rtn"], err


def test_rtn_is_data_free_and_the_same_grid():
    model = tiny_llama()
    W = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    quantize_model_awq(model, None, AWQConfig(group_size=32, method="rtn"), progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.dequantize(), fake_quantize(W, 4, 32))


@pytest.mark.parametrize("kw, msg", [(dict(group_size=48), "group size"), (dict(bits=3), "bits must be 4"),
                                     (dict(method="gptq"), "method"), (dict(search_tokens=0), "search tokens"),
                                     (dict(rounding="up"), "rounding must be one of nearest, feedback, dithered"),
                                     (dict(decorrelate=-0.1), "decorrelate")])
def test_config_validation(kw, msg):
    with pytest.raises(UserError, match=msg):
        AWQConfig(**kw).validate()


def test_quantize_refuses_bad_input():
    with pytest.raises(UserError, match="empty"):
        quantize_model_awq(tiny_llama(), [], AWQConfig(group_size=32), progress=False)
    with pytest.raises(UserError, match="multiple of 8"):
        quantize_model_awq(tiny_llama(intermediate=100), calib_ids(2), AWQConfig(group_size=32), progress=False)

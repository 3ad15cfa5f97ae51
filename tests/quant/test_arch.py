"""The architecture descriptions (quant.arch) against transformers' own models, and the block walker's per-block
inputs against a real forward of a model whose layer types differ (Gemma 3: sliding and full attention, each with
its own mask and rotary base)."""

from __future__ import annotations

import copy

import pytest
import torch
from arch_models import FAMILIES, MOE, tiny_config, tiny_model
from safetensors import safe_open

from quant.arch import SLIDING, describe
from quant.arch.layout import to_disk_tensors, to_memory_tensors
from quant.awq.blocks import quantize_blocks_awq
from quant.awq.solver import AWQConfig
from quant.blocks import QuantReport, drive_blocks
from quant.errors import UserError
from quant.gptq.blocks import quantize_blocks
from quant.gptq.solver import GPTQConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: far slower on two threads of a shared box


@pytest.mark.parametrize("family", list(FAMILIES))
def test_description_names_every_part_of_the_real_block(family):
    model = tiny_model(family, large_weights=False)
    arch = describe(model.config)
    assert arch.blocks == "model.layers" and arch.n_layer == 2
    block = model.get_submodule(arch.block(0))
    names = dict(block.named_modules())
    for leaf in arch.linear_names(0):
        path = next(n for n in names if n.endswith(f".{leaf}"))
        assert isinstance(names[path], torch.nn.Linear), path
    att = arch.family.attention
    for part in (att.q_norm, att.k_norm):
        if part:
            assert f"{att.path}.{part}" in names
    for norm in arch.family.norms.names:
        assert norm in names
    assert len([n for n, m in block.named_modules() if n.endswith("norm") or n.endswith("layernorm")]) == \
        len(arch.family.norms.names) + bool(att.q_norm) + bool(att.k_norm)
    if family in MOE:
        ex, router = arch.family.experts, arch.family.router
        experts, gate = block.get_submodule(ex.path), block.get_submodule(router.path)
        assert {n for n, _ in experts.named_parameters()} == set(ex.parameters)
        E, H, I = arch.n_experts, arch.hidden, arch.expert_intermediate
        shape = (E, H, 2 * I) if ex.transposed else (E, 2 * I, H)
        assert tuple(getattr(experts, ex.gate_up).shape) == shape
        assert tuple(getattr(gate, router.weight).shape) == (E, H)
        assert arch.renormalize == (family != "gpt_oss")
    assert arch.rotary_dim == (12 if family == "phi4mini" else 16)
    assert arch.tied == model.config.tie_word_embeddings


def test_values_read_from_the_config():
    gemma = describe(tiny_config("gemma3"))
    assert gemma.window(0) == 8 and gemma.window(1) is None and gemma.embed_scale == 8.0
    assert gemma.family.norms.offset == 1.0 and gemma.softmax_scale == 16 ** -0.5 and gemma.final_softcap == 30.0
    assert gemma.rope("sliding_attention")["rope_theta"] == 10000.0 and gemma.rope()["rope_theta"] == 1e6
    mistral = describe(tiny_config("mistral", sliding_window=32))
    assert mistral.layer_types == (SLIDING, SLIDING) and mistral.window(1) == 32  # no layer_types: every layer
    moe = describe(tiny_config("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False))
    assert moe.moe_layers == (True, False, True) and not moe.renormalize
    assert moe.linear_names(1)[-3:] == ("gate_proj", "up_proj", "down_proj") and "gate_proj" not in moe.linear_names(0)


def test_unknown_architectures_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"^config.json: architecture GPT2LMHeadModel is not supported; supported: "
                                        r"LlamaForCausalLM, .*GptOssForCausalLM"):
        describe({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_multimodal_gemma3_is_described_by_its_text_part(tmp_path):
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = {k: v for k, v in tiny_config("gemma3").to_dict().items() if k not in ("architectures",)}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    model = AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision,
                                                          mm_tokens_per_image=4))
    arch = describe(model.config)
    assert arch.name == "gemma3" and arch.blocks == "model.language_model.layers"
    assert isinstance(model.get_submodule(arch.blocks), torch.nn.ModuleList)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        disk = set(f.keys())
    memory = set(model.state_dict()) - {"lm_head.weight"}  # tied: not written
    assert {arch.to_disk(k) for k in memory} == disk
    assert {arch.to_memory(k) for k in disk} == memory
    assert {k for k in disk if not arch.is_text(k)} == {k for k in disk if k.startswith(("vision_tower.",
                                                                                          "multi_modal_projector."))}


@pytest.mark.parametrize("family", MOE)
def test_expert_layout_is_what_transformers_writes_and_reads(family, tmp_path):
    model = tiny_model(family)
    arch = describe(model.config)
    state = model.state_dict()
    disk = [kv for k, t in state.items() for kv in to_disk_tensors(arch, k, t)]
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    assert {k for k, _ in disk} == set(written)
    assert all(torch.equal(t, written[k]) for k, t in disk)
    back = dict(to_memory_tensors(arch, written.items()))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def _real_block_inputs(model, ids):
    """(hidden states, kwargs) each decoder block receives in a real forward."""
    seen = []
    blocks = model.get_submodule(describe(model.config).blocks)
    hooks = [b.register_forward_pre_hook(lambda _m, a, kw: seen.append((a[0] if a else kw["hidden_states"], kw)),
                                         with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _same_inputs(got, want):
    (h, kw), (h_ref, kw_ref) = got, want
    assert torch.allclose(h, h_ref, atol=1e-5, rtol=1e-5)
    mask, mask_ref = kw.get("attention_mask"), kw_ref.get("attention_mask")
    assert (mask is None) == (mask_ref is None) and (mask is None or torch.equal(mask, mask_ref))
    for a, b in zip(kw["position_embeddings"], kw_ref["position_embeddings"]):
        assert torch.equal(a, b)


def test_the_walker_hands_each_block_what_the_real_forward_does():
    """Data-free of any method first: the walker's inputs of every block equal the real forward's (block 1 is a
    full-attention layer: another mask, another rope base than block 0)."""
    model = tiny_model("gemma3")
    calib = [torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    got = []

    def record(block, name, hidden, kwargs):
        got.append([(h.clone(), kw) for h, kw in zip(hidden, kwargs)])
        return {}

    drive_blocks(model, calib, QuantReport("probe"), record, progress=False)
    for j, ids in enumerate(calib):
        real = _real_block_inputs(model, ids)
        assert len(real) == len(got) == 2
        for i in range(2):
            _same_inputs(got[i][j], real[i])
    sliding, full = got[0][0][1], got[1][0][1]  # the two layer types' arguments differ: mask and rope base
    assert sliding["attention_mask"] is not None and full["attention_mask"] is not sliding["attention_mask"]
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_see_the_quantized_models_own_block_inputs(method):
    """Each block is quantized on the inputs the quantized model's own forward gives it."""
    model = tiny_model("gemma3")
    calib = [torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    blocks = model.get_submodule(describe(model.config).blocks)
    first = {}

    def keep_first(i):
        def hook(block, args, kwargs):
            if "forward" not in block.__dict__:  # not the capture pass, where blocks hand their input on
                first.setdefault(i, (args[0].clone(), kwargs))  # returns None: the inputs go on unchanged
        return hook

    hooks = [b.register_forward_pre_hook(keep_first(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        if method == "gptq":
            quantize_blocks(model, calib, GPTQConfig(bits=4, group_size=32).validate(), progress=False)
        else:
            quantize_blocks_awq(model, calib, AWQConfig(group_size=32).validate(), progress=False)
    finally:
        for h in hooks:
            h.remove()
    real = _real_block_inputs(model, calib[0])
    for i in range(2):
        _same_inputs(first[i], real[i])


def test_walker_state_is_left_as_found():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    drive_blocks(model, [torch.randint(0, 256, (1, 8))], QuantReport("probe"), lambda *a: {}, progress=False)
    blocks = model.get_submodule("model.layers")
    assert all("forward" not in b.__dict__ for b in blocks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_awq_folds_scales_into_gemmas_one_plus_w_norms():
    """Gemma's norms multiply by (1 + w): AWQ folds its scales as w -> (1 + w) / s - 1 (the family's offset); a plain
    w / s fold would change the block's output, so the exactness check leaves those groups unscaled."""
    calib = [torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    folded = {}
    for offset in (None, 0.0):  # None: the description's 1.0
        model = tiny_model("gemma3")
        report = quantize_blocks_awq(model, calib, AWQConfig(group_size=32).validate(), progress=False,
                                     norm_offset=offset)
        folded[offset] = {e["fold"] for e in report.scales if e["fold"]}
    assert {"input_layernorm", "pre_feedforward_layernorm"} <= folded[None]
    assert not {"input_layernorm", "pre_feedforward_layernorm"} & folded[0.0]

"""Answer log-prob sums per sequence (chunked LM head: tests/test_linear_ce.py), and the reference with the adapter
switched off: the base alone, on NF4 and GPTQ bases, through the fast path's kernels too."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from finetune.data.preference_data import build_preference_data
from finetune.kernels import KernelOptions, install
from finetune.kernels.lora import Projection, project
from finetune.kernels.mlp import lora_mlp
from finetune.model import attach_lora, load_base
from finetune.recipe import BaseConfig, LoraConfig
from finetune.synthetic import byte_tokenizer, random_model, save_model_dir, save_rtn_gptq
from finetune.train.logprobs import adapter_disabled, reference_log_probs, sequence_log_probs
from finetune.train.loss import fusable_head
from quant.formats.registry import frozen_weight


ROWS = [{"prompt": [{"role": "user", "content": "pick " + "x" * k}], "chosen": "a" * (k + 1), "rejected": "bb" * k}
        for k in range(1, 5)]


def preference_batch(tmp_path, packed: bool, paired: bool = True, rows=ROWS) -> dict:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SimpleNamespace(train=str(path), split="train", max_examples=None, eval=None, eval_fraction=0.0,
                          max_length=128, packing=packed)
    bundle = build_preference_data(cfg, byte_tokenizer(), seed=0, paired=paired)
    return next(bundle.batches("train", len(bundle.train), shuffle=False, seed=0))


def test_sequence_sums_are_each_sequence_alone(tmp_path):
    """Packed, padded, fused or plain head: each sequence's sum is what the model gives that sequence by itself."""
    model = random_model("tiny").requires_grad_(False)
    head = fusable_head(model, sharded=False)[0]
    unpacked, packed = preference_batch(tmp_path, False), preference_batch(tmp_path, True)
    assert len(packed["input_ids"]) < len(unpacked["input_ids"]) == 8  # packing put several sequences in a row
    got = {name: sequence_log_probs(model, batch, h) for name, batch, h in
           [("unpacked", unpacked, head), ("packed", packed, head), ("plain head", unpacked, None)]}
    for r in range(8):
        n = int(unpacked["attention_mask"][r].sum())
        ids, labels = unpacked["input_ids"][r:r + 1, :n], unpacked["labels"][r, 1:n]
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
        want = logps[labels != -100].sum()
        for name, result in got.items():
            assert result.sums[r].item() == pytest.approx(want.item(), rel=1e-5), (name, r)
            assert result.counts[r] == int((labels != -100).sum()) > 0


def test_fused_projections_compute_the_base_alone_while_adapters_are_off():
    torch.manual_seed(0)
    flag = SimpleNamespace(disable_adapters=True)  # what peft's disable_adapter() sets on every LoRA layer

    def proj(n_in, n_out):
        base = torch.nn.Linear(n_in, n_out).requires_grad_(False)
        return Projection(base, frozen_weight(base), torch.nn.Parameter(torch.randn(4, n_in)),
                          torch.nn.Parameter(torch.randn(n_out, 4)), 2.0, torch.nn.Dropout(0.5), flag)

    gate, up, down = proj(16, 40), proj(16, 40), proj(40, 16)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(project([gate, up], x), [gate.base(x), up.base(x)])
    want = down.base(torch.nn.functional.silu(gate.base(x)) * up.base(x))
    torch.testing.assert_close(lora_mlp(gate, up, down, x, kernels=False), want)
    flag.disable_adapters = False
    assert (project([gate], x)[0] - gate.base(x)).abs().max() > 0.1


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref-bases")
    model = random_model("tiny")
    return {"nf4": save_model_dir(model, root / "dense"), "gptq": save_rtn_gptq(model, root / "gptq", group_size=32)}


@pytest.mark.parametrize("quantization", ["nf4", "gptq"])
@pytest.mark.parametrize("fast_path", [True, False])
def test_reference_with_the_adapter_off_is_the_base(tmp_path, base_dirs, quantization, fast_path):
    config = BaseConfig(model=str(base_dirs[quantization]), quantization=quantization, compute_dtype="float32")
    base = load_base(config, torch.device("cpu")).model
    model = attach_lora(load_base(config, torch.device("cpu")).model, LoraConfig(r=4, alpha=8, dropout=0.1), True)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    if fast_path:
        assert install(model, KernelOptions()).fused["fused LoRA mlp"] == 2
    model.train()  # as in training: LoRA dropout active, gradient checkpointing on
    batch = preference_batch(tmp_path, packed=True)
    head = fusable_head(model, sharded=False)[0]
    reference = reference_log_probs(model, batch, head)
    with torch.no_grad():
        alone = sequence_log_probs(base, batch, fusable_head(base, sharded=False)[0])
        policy = sequence_log_probs(model.eval(), batch, head)
    torch.testing.assert_close(reference.sums, alone.sums, rtol=1e-5, atol=1e-4)
    assert (policy.sums - alone.sums).abs().max() > 0.1  # the adapter on is another model: the test can fail
    assert not reference.sums.requires_grad
    with adapter_disabled(model):  # and it comes back on afterwards
        pass
    with torch.no_grad():
        torch.testing.assert_close(sequence_log_probs(model, batch, head).sums, policy.sums)

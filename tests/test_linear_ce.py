"""The chunked fused LM-head loss (and per-row log-probs) give the plain path's values and gradients, and training
with it is the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from support import tiny_recipe
from finetune.recipe import recipe_from_dict
from finetune.train.linear_ce import linear_cross_entropy_sum, linear_log_probs
from finetune.train.loss import fusable_head
from finetune.train.loop import train


def head_inputs(dtype, g):
    """hidden [50, 32] (a leaf), a frozen head [300, 32], labels with every 4th row ignored."""
    hidden = torch.randn(50, 32, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(300, 32, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, 300, (50,), generator=g)
    labels[::4] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("dtype,chunk", [(torch.float32, 7), (torch.float32, 4096), (torch.bfloat16, 16)])
def test_matches_plain_cross_entropy(dtype, chunk):
    hidden, weight, labels = head_inputs(dtype, torch.Generator().manual_seed(0))
    plain_h = hidden.detach().clone().requires_grad_()
    plain = F.cross_entropy((plain_h @ weight.T).float(), labels, ignore_index=-100, reduction="sum")
    plain.backward()
    fused = linear_cross_entropy_sum(hidden, weight, labels, chunk)
    (fused * 0.5).backward()  # the incoming gradient scales the saved one
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(fused.item() - plain.item()) <= tol * plain.item()
    assert hidden.grad[::4].abs().max() == 0  # ignored positions get no gradient
    err = (hidden.grad.float() - 0.5 * plain_h.grad.float()).abs().max() / plain_h.grad.float().abs().max()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype,chunk", [(torch.float32, 7), (torch.float32, 4096), (torch.bfloat16, 16)])
def test_log_probs_match_log_softmax(dtype, chunk):
    """Per-row log-probs (preference objectives) and their gradient under a different weight per row."""
    g = torch.Generator().manual_seed(0)
    hidden, weight, labels = head_inputs(dtype, g)
    upstream = torch.randn(50, generator=g)  # per-sequence sums and losses weigh each token differently
    dense_h = hidden.detach().clone().requires_grad_()
    dense = (dense_h @ weight.T).float().log_softmax(-1).gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    dense = torch.where(labels != -100, dense, 0.0)
    (dense * upstream).sum().backward()
    got = linear_log_probs(hidden, weight, labels, chunk)
    (got * upstream).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got - dense.detach()).abs().max() <= tol * dense.detach().abs().max()
    assert got[::4].abs().max() == 0 and hidden.grad[::4].abs().max() == 0  # ignored rows: nothing, either way
    err = (hidden.grad.float() - dense_h.grad.float()).norm() / dense_h.grad.float().norm()
    assert err < tol


@pytest.mark.parametrize("fn", [linear_cross_entropy_sum, linear_log_probs])
def test_refuses_a_trained_head(fn):
    with pytest.raises(ValueError, match="frozen"):
        fn(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(3).long())


def test_training_with_the_fused_loss_matches_the_plain_loss(tmp_path, tiny_model_dir, chat_files):
    adapters = {}
    for fused in (True, False):
        out = tmp_path / f"run-{fused}"
        recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, out, base={"quantization": "nf4"},
                                              train={"max_steps": 4, "fused_cross_entropy": fused}))
        result = train(recipe, echo=lambda *a: None)
        adapters[fused] = (load_file(str(result.adapter_dir / "adapter_model.safetensors")), result)
    (a, ra), (b, rb) = adapters[True], adapters[False]
    assert abs(ra.eval_loss_after - rb.eval_loss_after) < 1e-4 and ra.eval_loss_after < ra.eval_loss_before
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_fused_loss_stands_aside_where_it_cannot_apply(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.requires_grad_(False)
    assert fusable_head(model, sharded=False)[0] is model.lm_head
    assert "sharded" in fusable_head(model, sharded=True)[1]
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in fusable_head(model, sharded=False)[1]
    model.config.final_logit_softcapping = None
    model.lm_head.weight.requires_grad_(True)
    assert "trained" in fusable_head(model, sharded=False)[1]


def test_fused_and_plain_loss_agree_under_autocast_and_the_head_is_restored(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune.train.loss import causal_lm_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    head = fusable_head(model, sharded=False)[0]
    plain, n = causal_lm_loss(model, batch, None, torch.bfloat16)
    fused, m = causal_lm_loss(model, batch, head, torch.bfloat16)
    reference, _ = causal_lm_loss(model, batch, None)
    assert n == m == 2 * 19  # labels 1..23 predicted, 1..4 ignored
    assert abs(fused.item() - plain.item()) < 2e-2 * plain.item()
    assert abs(fused.item() - reference.item()) < 2e-2 * reference.item()
    assert "forward" not in vars(model.lm_head)  # logits again for generation and everything else
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size

"""DPO, ORPO and KTO: loss, gradients and reward metrics equal TRL 1.15's implementations and the papers' formulas.

Each test runs one micro-batch of our data pipeline through a tiny random Llama with a random LoRA adapter:
ours (chunked LM head, reference = adapter off) against TRL's trainer code on the same model and sequences.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from support import make_tiny_model
from trl_reference import plain_trl_head, trl_inputs, trl_trainer
from finetune.data.preference_data import build_preference_data
from finetune.model import attach_lora
from finetune.recipe import LoraConfig
from finetune.train.loss import fusable_head
from finetune.recipe_preference import PreferenceConfig
from finetune.train.objectives.preference import PreferenceObjective
from finetune.train.objectives.preference_losses import dpo_loss, log1mexp, metric_means
from quant.errors import UserError


def pair_rows(n: int = 4) -> list[dict]:
    questions = ["which colour is the sky", "name a prime", "say hi", "count to three", "spell cat", "2 + 2"]
    return [{"prompt": [{"role": "user", "content": questions[i % 6]}],
             "chosen": "the answer is " + "ok " * (i + 1),
             "rejected": "no" + "!" * (3 * i + 1)} for i in range(n)]


def data(tmp_path, tokenizer, rows, packed=False, paired=True):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SimpleNamespace(train=str(path), split="train", max_examples=None, eval=None, eval_fraction=0.0,
                          max_length=96, packing=packed)
    bundle = build_preference_data(cfg, tokenizer, seed=0, paired=paired)
    return next(bundle.batches("train", len(bundle.train), shuffle=False, seed=0))


@pytest.fixture()
def model(tokenizer):
    peft_model = attach_lora(make_tiny_model(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.0), False)
    torch.manual_seed(2)  # an adapter whose KTO KL estimate is positive here (a negative one is clamped to 0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: policy = reference, every log-ratio 0
            p.data.normal_(0, 0.3)
    return peft_model


def grads(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def ours(model, batch, **config):
    objective = PreferenceObjective(PreferenceConfig(**config), fusable_head(model, sharded=False)[0])
    loss_sum, count, stats = objective.loss(model, batch)
    loss = loss_sum / count
    loss.backward()
    return loss.item(), metric_means(stats), grads(model)


def assert_grads_close(got: dict, want: dict, tol: float = 1e-4):
    assert got.keys() == want.keys() and got
    for name in want:
        err = float((got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-12))
        assert err < tol, (name, err)


@pytest.mark.parametrize("packed", [False, True])
def test_dpo_equals_trl(tmp_path, tokenizer, model, packed):
    rows = pair_rows()
    batch = data(tmp_path, tokenizer, rows, packed)
    loss, stats, g = ours(model, batch, objective="dpo", beta=0.3)
    trainer = trl_trainer("dpo", model, tokenizer, tmp_path / "trl", beta=0.3)
    with plain_trl_head():
        want = trainer._compute_loss(model, trl_inputs(data(tmp_path, tokenizer, rows)), False)
    want.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert loss == pytest.approx(want.item(), rel=1e-5)
    assert_grads_close(g, grads(model))
    for name, theirs in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies")]:
        assert stats[name] == pytest.approx(metrics[theirs], rel=1e-4, abs=1e-6), name
    assert abs(stats["rewards/chosen"]) > 1e-3  # not vacuous: the adapter moves the policy off the reference


def test_kto_equals_trl(tmp_path, tokenizer, model):
    batch = data(tmp_path, tokenizer, pair_rows(3), paired=False)  # 3 pairs -> 6 examples, 3 desirable
    assert batch["desirable"].tolist() == [True, False] * 3
    settings = dict(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    loss, stats, g = ours(model, batch, objective="kto", **settings)
    trainer = trl_trainer("kto", model, tokenizer, tmp_path / "trl", **settings)
    inputs = {**trl_inputs(batch), **trl_inputs(batch["kl"], "KL_"), "label": batch["desirable"]}
    with plain_trl_head():
        want = trainer._compute_loss(model, inputs, False)
    want.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert loss == pytest.approx(want.item(), rel=1e-5)
    assert_grads_close(g, grads(model))
    assert stats["kl"] == pytest.approx(metrics["kl"], abs=2e-5) and stats["kl"] > 0.1  # differences of ~-100 sums
    for name, theirs in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margin", "rewards/margins")]:
        assert stats[name] == pytest.approx(metrics[theirs], rel=1e-4, abs=1e-6), name


def test_orpo_equals_trl_odds_ratio_and_the_papers_sft_term(tmp_path, tokenizer, model):
    from trl.experimental.orpo import ORPOTrainer

    lam = 0.25
    batch = data(tmp_path, tokenizer, pair_rows())
    loss, stats, g = ours(model, batch, objective="orpo", orpo_lambda=lam)

    # Reference: dense logits, TRL's length-normalised log-probs and odds-ratio loss; the SFT term is the paper's
    # NLL of the chosen answers (TRL's ORPOTrainer takes it over prompt + answer: see preference_losses.orpo_loss).
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels, pairs = batch["labels"], batch["pairs"]
    mean_logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    trl_self = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, reward_chosen, reward_rejected, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        trl_self, mean_logps[:pairs], mean_logps[pairs:])
    nll = F.cross_entropy(logits[:pairs, :-1].reshape(-1, logits.shape[-1]), labels[:pairs, 1:].reshape(-1))
    want = nll - losses.mean()
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-5)
    assert_grads_close(g, grads(model))
    assert stats["rewards/chosen"] == pytest.approx(reward_chosen.mean().item(), rel=1e-5)
    assert stats["rewards/rejected"] == pytest.approx(reward_rejected.mean().item(), rel=1e-5)
    assert stats["log_odds_ratio"] == pytest.approx(log_odds_ratio.item(), rel=1e-5)
    assert stats["log_odds_chosen"] == pytest.approx(log_odds_chosen.item(), abs=1e-6)  # a small difference
    assert stats["nll"] == pytest.approx(nll.item(), rel=1e-5)


def test_a_precomputed_reference_gives_the_same_step(tmp_path, tokenizer, model):
    """`reference: precomputed`: log-probs of the base computed once and carried by the batch, no reference pass."""
    from finetune.train.logprobs import reference_log_probs
    from finetune.train.objectives.preference import REFERENCE_KEY

    batch = data(tmp_path, tokenizer, pair_rows())
    loss, stats, g = ours(model, batch, objective="dpo")
    head = fusable_head(model, sharded=False)[0]
    batch[REFERENCE_KEY] = reference_log_probs(model, batch, head).sums
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("finetune.train.objectives.preference.reference_log_probs", None)  # no reference forward may run
        again, stats_again, g_again = ours(model, batch, objective="dpo")
    assert again == loss and stats_again == stats
    assert_grads_close(g_again, g, tol=1e-7)


def test_conservative_dpo_equals_trl_and_the_formula():
    """Label smoothing: TRL 1.15 keeps cDPO's formula in CPOTrainer.cpo_loss ('sigmoid'), fed the log-ratios."""
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (torch.randn(8, generator=g) * 3 for _ in range(4))
    beta, eps = 0.4, 0.15
    chosen.requires_grad_(True)
    loss_sum, pairs, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, eps)
    (got,) = torch.autograd.grad(loss_sum / pairs, chosen)
    trl_self = SimpleNamespace(beta=beta, label_smoothing=eps, loss_type="sigmoid", alpha=0.0, simpo_gamma=0.0,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, _, _ = CPOTrainer.cpo_loss(trl_self, chosen - ref_chosen, rejected - ref_rejected)
    (want,) = torch.autograd.grad(losses.mean(), chosen)
    assert (loss_sum / pairs).item() == pytest.approx(losses.mean().item(), rel=1e-6)
    torch.testing.assert_close(got, want)
    # The formula by hand, for one pair: -(1 - e) log s(z) - e log s(-z), z = beta * (margin of log-ratios).
    z = beta * ((chosen[0] - ref_chosen[0]) - (rejected[0] - ref_rejected[0])).item()
    by_hand = -(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z)))
    single, _, _ = dpo_loss(chosen[:1], rejected[:1], ref_chosen[:1], ref_rejected[:1], beta, eps)
    assert single.item() == pytest.approx(by_hand, rel=1e-5)


def test_log1mexp_is_accurate_on_both_branches():
    """fp32 log(1 - exp(x)) loses everything near 0 (1 - exp(-1e-6) keeps one digit); log1mexp keeps fp32
    accuracy on both sides of -log 2, against a float64 reference."""
    x = torch.tensor([-1e-6, -1e-3, -0.1, -0.69, -0.7, -5.0, -20.0], dtype=torch.float64)
    want = torch.log(-torch.expm1(x)).float()  # float64 is exact enough over this range
    torch.testing.assert_close(log1mexp(x.float()), want, rtol=1e-6, atol=0)
    naive = torch.log(1 - torch.exp(x.float()))
    assert (naive[0] - want[0]).abs() > 1e-2


@pytest.mark.parametrize("settings,message", [
    (dict(objective="dpp"), "preference.objective = 'dpp' is not one of dpo, orpo, kto (did you mean 'dpo'?)"),
    (dict(beta=0.0), "preference.beta = 0.0 must be > 0"),
    (dict(beta=-1), "preference.beta = -1 must be > 0"),
    (dict(beta=float("nan")), "preference.beta = nan must be a finite number"),
    (dict(beta=float("inf")), "preference.beta = inf must be a finite number"),
    (dict(beta="0.1"), "preference.beta = '0.1' must be a finite number"),
    (dict(label_smoothing=0.5), "preference.label_smoothing = 0.5 must be >= 0 and < 0.5"),
    (dict(objective="orpo", beta=0.1), "preference.beta does not apply to objective 'orpo'"),
    (dict(objective="orpo", orpo_lambda=float("nan")), "preference.orpo_lambda = nan must be a finite number"),
    (dict(objective="kto", label_smoothing=0.1), "preference.label_smoothing does not apply to objective 'kto'"),
    (dict(objective="kto", undesirable_weight=0), "preference.undesirable_weight = 0 must be > 0"),
    (dict(reference="cached"), "preference.reference = 'cached' is not one of adapter_off, precomputed"),
])
def test_bad_settings_are_one_line_naming_the_key(settings, message):
    with pytest.raises(UserError) as e:
        PreferenceConfig(**settings).validate()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_defaults_are_the_published_ones():
    assert PreferenceConfig().validate().beta == 0.1
    assert PreferenceConfig(objective="orpo").validate().orpo_lambda == 0.1
    kto = PreferenceConfig(objective="kto").validate()
    assert (kto.beta, kto.desirable_weight, kto.undesirable_weight, kto.paired) == (0.1, 1.0, 1.0, False)

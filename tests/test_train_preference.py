"""`finetune dpo|orpo|kto` end to end on tiny random Llamas: each objective learns its preference through the same run
as SFT (every base kind, accumulation, the precomputed reference, resume after a crash), and logs its rewards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import Crash, awq_base, crashing_optimizer, gptq_base, single_thread, tiny_recipe
from finetune.recipe import recipe_from_dict
from finetune.recipe_preference import PreferenceConfig
from finetune.train import setup
from finetune.train.loop import train
from finetune.train.objectives.preference import PreferenceObjective
from finetune.train.objectives.preference_losses import kto_loss
from quant.errors import UserError

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
           "logps/rejected")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


def preference_recipe(model_dir, files, out, objective="dpo", preference=None, **sections):
    recipe = tiny_recipe(model_dir, *files, out, **sections)
    recipe["preference"] = {"objective": objective, **(preference or {})}
    return recipe_from_dict(recipe)


def records(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, atol=1e-6, rtol=1e-5) -> None:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=rtol)


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_each_objective_learns_to_prefer_the_chosen_answers(tmp_path, tiny_model_dir, preference_files, objective):
    out = tmp_path / "run"
    recipe = preference_recipe(tiny_model_dir, preference_files, out, objective,
                               train={"max_steps": 8, "micro_batch_size": 4, "eval_every": 4, "log_every": 2})
    result = train(recipe, echo=lambda *a: None)
    steps, evals = records(out)
    extra = {"dpo": (), "orpo": ("nll", "log_odds_ratio"), "kto": ("kl",)}[objective]
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("loss", "tokens_per_s") + REWARDS + extra), r
    assert [r["step"] for r in evals] == [0, 4, 8]
    for r in evals:  # every reward metric per evaluation too; no perplexity of a preference loss
        assert all(f"eval_{k}" in r for k in REWARDS + extra) and "eval_ppl" not in r, r
    before, after = evals[0], evals[-1]
    assert result.eval_loss_after < result.eval_loss_before
    # ORPO's rewards are lambda x the mean token log-prob: a margin ~50x smaller than DPO's beta x log-ratio sums.
    assert after["eval_rewards/margin"] > before["eval_rewards/margin"] + (0.005 if objective == "orpo" else 0.05)
    assert after["eval_rewards/accuracy"] >= 0.75
    assert after["eval_logps/chosen"] > before["eval_logps/chosen"]  # the chosen answers became likelier
    if objective != "orpo":  # DPO/KTO rewards are log-ratios to the reference: all zero before training
        assert before["eval_rewards/chosen"] == before["eval_rewards/rejected"] == 0.0


@pytest.fixture(scope="module")
def quantized_bases(tmp_path_factory, tokenizer) -> dict:
    root = tmp_path_factory.mktemp("preference-bases")
    return {"gptq": gptq_base(root / "gptq", tokenizer), "awq": awq_base(root / "awq", tokenizer)}


@pytest.mark.parametrize("kind", ["fp4", "int8", "none", "gptq", "awq"])
def test_dpo_trains_on_every_base_kind(tmp_path, tiny_model_dir, preference_files, quantized_bases, kind):
    """NF4 is every other test's base; a GGUF-file base is the quickstart's (test_preference_quickstart.py)."""
    model_dir = quantized_bases.get(kind, tiny_model_dir)
    quantization = "auto" if kind in quantized_bases else kind
    out = tmp_path / "run"
    recipe = preference_recipe(model_dir, preference_files, out, base={"quantization": quantization},
                               train={"max_steps": 4, "micro_batch_size": 4, "gradient_checkpointing": False})
    result = train(recipe, echo=lambda *a: None)
    assert json.loads((result.adapter_dir / "base.json").read_text())["format"] == kind
    _, evals = records(out)
    assert evals[-1]["eval_rewards/margin"] > evals[0]["eval_rewards/margin"] + 0.02


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_precomputed_reference_trains_exactly_as_the_adapter_off_reference(tmp_path, tiny_model_dir,
                                                                             preference_files, objective):
    runs = {}
    for reference in ("adapter_off", "precomputed"):
        out = runs[reference] = tmp_path / reference
        train(preference_recipe(tiny_model_dir, preference_files, out, objective, {"reference": reference},
                                base={"quantization": "none"}, train={"max_steps": 4, "micro_batch_size": 4}),
              echo=lambda *a: None)
    (off, off_evals), (pre, pre_evals) = records(runs["adapter_off"]), records(runs["precomputed"])
    for a, b in zip(off + off_evals, pre + pre_evals):
        for key in ("loss", "eval_loss", "rewards/margin", "eval_rewards/margin", "kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a["step"])
    assert_same_adapter(runs["adapter_off"], runs["precomputed"], atol=1e-5, rtol=1e-4)


def test_accumulation_splits_the_same_global_batch_of_pairs_into_the_same_update(tmp_path, tiny_model_dir,
                                                                                 preference_files):
    """The loss is normalised by the pairs of the whole step: 2 x 2 accumulates to the update of 1 x 4."""
    outs = []
    for micro, accumulation in ((4, 1), (2, 2)):
        out = tmp_path / f"{micro}x{accumulation}"
        outs.append(out)
        train(preference_recipe(tiny_model_dir, preference_files, out, base={"quantization": "none"},
                                data={"packing": False},
                                train={"max_steps": 3, "micro_batch_size": micro, "gradient_accumulation": accumulation}),
              echo=lambda *a: None)
    (a, _), (b, _) = records(outs[0]), records(outs[1])
    for x, y in zip(a, b):
        for key in ("loss", "rewards/chosen", "rewards/margin", "rewards/accuracy"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x["step"])
    assert_same_adapter(*outs, atol=1e-5, rtol=1e-4)


def test_resume_after_a_crash_ends_with_the_same_adapter(tmp_path, tiny_model_dir, preference_files, monkeypatch):
    """KTO with the precomputed reference: the data's mismatched pairs, the reference pass (run again on resume)
    and the data position give the uninterrupted run's adapter."""
    sections = dict(preference={"reference": "precomputed"},
                    train={"max_steps": 6, "save_every": 2, "micro_batch_size": 2, "gradient_accumulation": 2,
                           "lr_scheduler": "cosine", "warmup_steps": 1})
    straight = tmp_path / "straight"
    train(preference_recipe(tiny_model_dir, preference_files, straight, "kto", **sections), echo=lambda *a: None)
    crashed = tmp_path / "crashed"
    recipe = preference_recipe(tiny_model_dir, preference_files, crashed, "kto", **sections)
    real_build = setup.build_optimizer
    monkeypatch.setattr(setup, "build_optimizer", crashing_optimizer(real_build, at_step=4))
    with pytest.raises(Crash):
        train(recipe, echo=lambda *a: None)
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-2"]
    monkeypatch.setattr(setup, "build_optimizer", real_build)
    train(recipe, resume=True, echo=lambda *a: None)
    assert_same_adapter(straight, crashed)
    (a, _), (b, _) = records(straight), records(crashed)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["kl"] for r in b] == pytest.approx([r["kl"] for r in a], rel=1e-5, abs=1e-7)


def test_resume_refuses_another_objective_and_allows_another_reference(tmp_path, tiny_model_dir, preference_files):
    out = tmp_path / "run"
    train(preference_recipe(tiny_model_dir, preference_files, out, train={"max_steps": 2, "save_every": 1}),
          echo=lambda *a: None)
    (out / "adapter").rename(tmp_path / "moved")  # so that --resume has something left to do
    orpo = preference_recipe(tiny_model_dir, preference_files, out, "orpo", train={"max_steps": 3, "save_every": 1})
    with pytest.raises(UserError, match=r"keys that decide what it already learned: preference\.objective 'dpo' -> "
                                        r"'orpo'"):
        train(orpo, resume=True, echo=lambda *a: None)
    precomputed = preference_recipe(tiny_model_dir, preference_files, out, preference={"reference": "precomputed"},
                                    train={"max_steps": 2, "save_every": 1})
    train(precomputed, resume=True, echo=lambda *a: None)  # the same numbers either way: allowed without --force
    assert (out / "adapter" / "adapter_model.safetensors").exists()


class _Training(torch.nn.Module):
    pass


def test_kto_averages_its_kl_estimate_over_ranks_before_clamping_it():
    """TRL's order: the mean over every process's micro-batch, then the clamp at 0. Here this rank's estimate is
    negative (alone it would clamp to 0) and the other rank's positive: the reference point is their mean."""
    policy, reference = torch.tensor([-3.0, -4.0]), torch.tensor([-3.5, -3.0])
    desirable = torch.tensor([True, False])
    kl_policy, kl_reference = torch.tensor([-9.0, -8.0]), torch.tensor([-8.0, -7.0])  # estimate -1.0
    other_rank = torch.tensor(3.0)
    mean = lambda t: (t + other_rank) / 2  # noqa: E731  (a 2-rank all-reduce mean)
    alone = kto_loss(policy, reference, desirable, kl_policy, kl_reference, 0.5)
    averaged = kto_loss(policy, reference, desirable, kl_policy, kl_reference, 0.5, mean_across=mean)
    assert float(alone[2]["kl"][0]) == 0.0 and float(averaged[2]["kl"][0]) == 1.0
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = (1 - sigmoid(0.5 * (0.5 - 1.0))) + (1 - sigmoid(0.5 * (1.0 - -1.0)))  # log-ratios 0.5 and -1.0
    assert float(averaged[0]) == pytest.approx(by_hand, rel=1e-6)

    # The objective reduces across ranks in training only: evaluation's batches are split unevenly over ranks.
    calls = []
    objective = PreferenceObjective(PreferenceConfig(objective="kto"), None, mean_across=lambda t: calls.append(t) or t)
    batch = {"desirable": desirable, "reference_logps": reference, "kl": {"reference_logps": kl_reference}}
    objective.log_probs = lambda model, b: type("L", (), {"sums": kl_policy if b is batch["kl"] else policy})()
    model = _Training()
    objective.loss(model.train(), batch)
    objective.loss(model.eval(), batch)
    assert len(calls) == 1


def test_a_kto_micro_batch_of_one_is_refused(tmp_path, tiny_model_dir, preference_files):
    with pytest.raises(UserError, match="train.micro_batch_size = 1 but KTO estimates its KL reference point"):
        preference_recipe(tiny_model_dir, preference_files, tmp_path / "run", "kto", train={"micro_batch_size": 1})


def test_sft_data_for_a_preference_objective_is_one_line(tmp_path, tiny_model_dir, chat_files):
    recipe = preference_recipe(tiny_model_dir, chat_files, tmp_path / "run")
    with pytest.raises(UserError, match=r"train\.jsonl: columns \['messages'\] are not a preference layout"):
        train(recipe, echo=lambda *a: None)

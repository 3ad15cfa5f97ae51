"""The run's parts on their own: the step accounting, the SFT objective, the objective surface a second objective
(DPO, ORPO, KTO) plugs into, and the engine chosen once."""

from __future__ import annotations

import json
import math

import torch

from support import make_tiny_model, tiny_recipe
from finetune.recipe import TrainConfig, recipe_from_dict
from finetune.train import setup
from finetune.train.loop import train
from finetune.train.loss import token_loss_sum
from finetune.train.meter import StepMeter
from finetune.train.objectives.sft import SFTObjective
from finetune.train.strategy.factory import create_strategy
from finetune.train.strategy.single import Single


def test_the_meter_averages_a_window_and_totals_the_run():
    meter = StepMeter()
    meter.add(100, 2.0, 3.0, {"acc": 0.5})
    meter.add(300, 2.0, 1.0, {"acc": 1.0})
    window = meter.window()
    assert (window.loss, window.tokens_per_s, window.metrics) == (2.0, 100.0, {"acc": 0.75})
    meter.reset_window()
    meter.add(50, 1.0, 0.5)
    window = meter.window()
    assert (window.loss, window.tokens_per_s, window.metrics) == (0.5, 50.0, {})
    # The run's totals span every window: 450 tokens in 5 s; the last step's loss is the run's last loss.
    assert (meter.tokens, meter.seconds, meter.tokens_per_s, meter.last_loss) == (450, 5.0, 90.0, 0.5)


def test_a_meter_without_steps_reports_zero_speed_instead_of_dividing_by_zero():
    meter = StepMeter()
    assert meter.tokens_per_s == 0.0 and meter.last_loss is None
    assert meter.window().tokens_per_s == 0.0


def _batch(vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[1, 9:] = -100  # padding of the second row
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_sft_counts_its_units_before_the_forward_as_the_loss_counts_them():
    model = make_tiny_model(64)
    batch = _batch(64, 0)
    objective = SFTObjective()
    loss_sum, count, metrics = objective.loss(model, batch)
    reference, reference_count = token_loss_sum(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert objective.units(batch) == count == reference_count == 7 + 4
    assert torch.allclose(loss_sum, reference) and metrics == {}
    loss_sum.backward()  # the loss is in the graph: it is what the step back-propagates
    assert any(p.grad is not None for p in model.parameters())


def test_sft_takes_the_fused_head_only_where_the_recipe_and_the_model_allow_it():
    model = make_tiny_model(64).requires_grad_(False)  # a frozen base, as LoRA leaves it
    said = []
    assert SFTObjective.for_model(model, TrainConfig(fused_cross_entropy=True), torch.float32, False,
                                  said.append).head is model.lm_head
    assert SFTObjective.for_model(model, TrainConfig(fused_cross_entropy=False), torch.float32, False,
                                  said.append).head is None
    sharded = SFTObjective.for_model(model, TrainConfig(fused_cross_entropy=True), torch.float32, True, said.append)
    assert sharded.head is None and said == ["train.fused_cross_entropy: off (parameters are sharded across "
                                             "processes); using the plain loss"]
    assert SFTObjective.for_model(model, TrainConfig(autocast=True), torch.bfloat16, False, said.append
                                  ).autocast_dtype is torch.bfloat16
    assert SFTObjective.for_model(model, TrainConfig(autocast=True), torch.float32, False, said.append
                                  ).autocast_dtype is None


class _EchoingSFT(SFTObjective):
    """SFT that also reports its own loss (sum, count) as a stat: logged, it must equal the loss exactly."""

    metric_names = ("echo",)

    def loss(self, model, batch):
        loss_sum, count, _ = super().loss(model, batch)
        return loss_sum, count, {"echo": (loss_sum.detach(), count)}


def test_an_objectives_metrics_are_reduced_and_logged_like_its_loss(tmp_path, tiny_model_dir, chat_files,
                                                                     monkeypatch):
    monkeypatch.setattr(setup.SFTObjective, "for_model", classmethod(lambda cls, *a: _EchoingSFT()))
    out = tmp_path / "run"
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, out, base={"quantization": "none"},
                                          train={"max_steps": 4, "log_every": 2, "eval_every": 2,
                                                 "gradient_accumulation": 2}))
    train(recipe, echo=lambda *a: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [2, 4] and [r["step"] for r in evals] == [0, 2, 4]
    for r in steps:  # the window's mean over two steps, each normalised by its global batch's label tokens
        assert math.isclose(r["echo"], r["loss"], rel_tol=1e-12)
    for r in evals:
        assert math.isclose(r["eval_echo"], r["eval_loss"], rel_tol=1e-12)


def test_one_process_without_a_launcher_is_the_single_engine(monkeypatch):
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    rt = create_strategy()
    assert type(rt) is Single and not rt.distributed and not rt.shards_parameters
    assert (rt.rank, rt.world_size, rt.eval_split, rt.is_main) == (0, 1, (0, 1), True)
    assert rt.describe() == f"NO, 1 process on {rt.device.type}"
    assert rt.sum_across(1.5, 3) == (1.5, 3) and rt.from_main(7) == 7

"""The evaluate phase: the objective's loss on the eval set (before training, every train.eval_every steps,
after training), and the before-training picture (eval loss, greedy samples) that finish compares against."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from finetune.train.batches import eval_batches
from finetune.train.objectives.base import add_stats, reduce_stats
from finetune.train.samples import Sample, generate_samples, prompts_from_examples
from finetune.train.setup import Run


def evaluate(run: Run) -> dict[str, float] | None:
    """`eval_loss`, `eval_ppl` where the objective has a perplexity, and the objective's metrics as
    `eval_<name>` (DPO: eval_rewards/accuracy, ...) over the eval set, reduced over ranks; None without an eval
    set. A collective: every rank must call it."""
    if run.data.eval is None:
        return None
    cfg, rt, objective = run.recipe.train, run.rt, run.objective
    loss_sum, count, totals = 0.0, 0, {}
    run.model.eval()
    with torch.no_grad():
        for batch in eval_batches(run.data.eval, cfg.micro_batch_size, run.data.collate, *rt.eval_split,
                                  cfg.eval_max_batches):
            s, n, metrics = objective.loss(run.model, rt.to_device(batch))
            loss_sum += float(s)
            count += n
            add_stats(totals, metrics)
    run.model.train()
    loss_sum, count = rt.sum_across(loss_sum, count)
    loss = loss_sum / max(count, 1)
    extra = {f"eval_{name}": value for name, value in
             objective.summarize(reduce_stats(totals, objective.metric_names, rt.sum_floats)).items()}
    return {"eval_loss": loss, **({"eval_ppl": math.exp(min(loss, 50))} if objective.perplexity else {}), **extra}


# What an eval line shows besides the loss, where the objective reports it.
_SHOWN = (("eval_ppl", "ppl", ".2f"), ("eval_rewards/accuracy", "reward accuracy", ".3f"),
          ("eval_rewards/margin", "reward margin", ".4f"))


def describe(metrics: dict[str, float]) -> str:
    """'loss 1.2345, ppl 3.44' (SFT) or 'loss 0.6931, reward accuracy 0.500, reward margin 0.0000' (DPO)."""
    return ", ".join([f"loss {metrics['eval_loss']:.4f}"] + [f"{label} {metrics[key]:{spec}}"
                                                             for key, label, spec in _SHOWN if key in metrics])


@dataclass
class Baseline:
    """The model before training, for finish to compare with (empty when the run resumed)."""

    eval: dict[str, float] | None = None
    prompts: list[list[int]] = field(default_factory=list)  # token ids of the sample prompts
    samples: list[Sample] = field(default_factory=list)


def baseline(run: Run) -> Baseline:
    """Eval loss and samples before the first step (logged at step 0); a resumed run has had its own."""
    recipe, rt = run.recipe, run.rt
    prompts = prompts_from_examples(run.data.eval or [], recipe.samples.count) if recipe.samples.count else []
    if prompts and rt.shards_parameters:
        # Generating on the main rank alone would wait forever for the other ranks' parameter shards.
        run.say("samples: skipped (parameters are sharded across processes)")
        prompts = []
    if run.resumed:
        return Baseline(None, prompts)
    before = evaluate(run)
    if before is not None:
        run.say(f"eval before training: {describe(before)}")
        run.tracker.log(0, before)
    samples = []
    if prompts and rt.is_main:
        samples = generate_samples(rt.unwrap(run.model), run.base.tokenizer, prompts, recipe.samples.max_new_tokens)
    return Baseline(before, prompts, samples)

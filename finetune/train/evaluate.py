"""The evaluate phase: the objective's loss on the eval set (before training, every train.eval_every steps,
after training), and the before-training picture (eval loss, greedy samples) that finish compares against."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from finetune.train.batches import eval_batches
from finetune.train.samples import Sample, generate_samples, prompts_from_examples
from finetune.train.setup import Run


def evaluate(run: Run) -> dict[str, float] | None:
    """`eval_loss`, `eval_ppl` (and the objective's metrics as `eval_<name>`) over the eval set, reduced over
    ranks; None without an eval set. A collective: every rank must call it."""
    if run.data.eval is None:
        return None
    cfg, rt = run.recipe.train, run.rt
    loss_sum, count, sums = 0.0, 0, {}
    run.model.eval()
    with torch.no_grad():
        for batch in eval_batches(run.data.eval, cfg.micro_batch_size, run.base.tokenizer.pad_token_id,
                                  run.recipe.data.packing, *rt.eval_split, cfg.eval_max_batches):
            s, n, metrics = run.objective.loss(run.model, rt.to_device(batch))
            loss_sum += float(s)
            count += n
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value)
    run.model.train()
    loss_sum, count = rt.sum_across(loss_sum, count)
    loss = loss_sum / max(count, 1)
    extra = {f"eval_{name}": rt.sum_across(value, 0)[0] / max(count, 1) for name, value in sums.items()}
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)), **extra}


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
        run.say(f"eval before training: loss {before['eval_loss']:.4f}, ppl {before['eval_ppl']:.2f}")
        run.tracker.log(0, before)
    samples = []
    if prompts and rt.is_main:
        samples = generate_samples(rt.unwrap(run.model), run.base.tokenizer, prompts, recipe.samples.max_new_tokens)
    return Baseline(before, prompts, samples)

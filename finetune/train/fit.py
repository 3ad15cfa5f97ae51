"""The fit phase: optimizer steps until the run's last, each followed by its log line, eval and checkpoint
when their cadence says so.

One step takes this rank's micro-batches of the global batch and normalises the loss by the objective's units
of the whole global batch (every micro-batch, every rank), so any world size and accumulation split of the
same global batch gives the same update.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from finetune.train.evaluate import describe, evaluate
from finetune.train.guard import NonFiniteGradient, check_loss, stop as guard_stop
from finetune.train.meter import StepMeter
from finetune.train.objectives.base import add_stats, reduce_stats
from finetune.train.setup import Run
from finetune.train.tracking import format_metrics


def fit(run: Run) -> StepMeter:
    """Train from `run.state` to the last step; the meter holds the steps' tokens, time and losses."""
    rt, state = run.rt, run.state
    run.model.train()
    bar = tqdm(total=run.total_steps, initial=state.step, desc="train", disable=not rt.is_main, dynamic_ncols=True)
    run.closers.append(bar.close)
    write = bar.write if rt.is_main else (lambda *a, **k: None)
    batches = run.stream.iterate(state.epoch, state.batch_offset)
    meter = StepMeter()
    rt.reset_peak_memory()
    while state.step < run.total_steps:
        t0 = time.perf_counter()
        micro, state.epoch, state.batch_offset = next(batches)
        loss, tokens, metrics, grad_norm = _step(run, micro)
        state.step += 1
        state.tokens_seen += tokens
        meter.add(tokens, time.perf_counter() - t0, loss, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        _after_step(run, meter, grad_norm, write)
    bar.close()
    return meter


_STEP = "_step_loss"  # the totals' entry for the loss: (summed loss, tokens)


def _step(run: Run, micro: list[dict]) -> tuple[float, int, dict[str, float], float]:
    """One optimizer step over this rank's micro-batches: (loss, tokens, objective metrics, grad norm), the
    first three reduced over ranks. A non-finite loss or gradient stops the run before the update."""
    rt, model, objective = run.rt, run.model, run.objective
    units = rt.sum_across(0.0, sum(objective.units(b) for b in micro))[1]
    totals = {}  # the loss (with the step's token count) and the objective's stats, summed on the device
    for i, batch in enumerate(micro):
        batch = rt.to_device(batch)
        with rt.no_sync(model, last=i == len(micro) - 1):
            loss, _, metrics = objective.loss(model, batch)
            # DDP averages gradients over ranks, so scale by world size to get the global-batch mean.
            rt.backward(loss * rt.world_size / max(units, 1))
        add_stats(totals, {**metrics, _STEP: (loss.detach(), batch["num_tokens"])})
    # One host transfer and one collective for all of them, after every micro-batch's backward is queued (a read
    # per micro-batch made the host wait for each backward before it could queue the next forward).
    reduced = reduce_stats(totals, (_STEP, *objective.metric_names), rt.sum_floats)
    loss_sum, tokens = reduced.pop(_STEP)
    tokens = int(tokens)
    step_loss = loss_sum / max(units, 1)
    metrics = objective.summarize(reduced)
    step = run.state.step + 1
    check_loss(run.recipe, run.out_dir, step, step_loss)  # the same on every rank: all stop together
    try:
        grad_norm = rt.step(model, run.optimizer, run.scheduler, run.recipe.train.max_grad_norm)
    except NonFiniteGradient as e:
        raise guard_stop(run.recipe, run.out_dir, step, "the gradient norm", e.norm) from None
    return step_loss, tokens, metrics, grad_norm


def _after_step(run: Run, meter: StepMeter, grad_norm: float, write) -> None:
    """The log line, eval and checkpoint that the step just done is due for (the last step's are finish's)."""
    cfg, state, rt = run.recipe.train, run.state, run.rt
    last = state.step == run.total_steps
    if state.step % cfg.log_every == 0 or last:
        window = meter.window()
        metrics = {"loss": window.loss, "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "tokens_per_s": window.tokens_per_s, "peak_mem_mb": rt.peak_memory_mb(), "epoch": state.epoch,
                   "tokens": state.tokens_seen, **window.metrics}
        run.tracker.log(state.step, metrics)
        write(f"step {state.step}/{run.total_steps} | " + format_metrics(metrics))
        meter.reset_window()
    if cfg.eval_every and state.step % cfg.eval_every == 0 and not last:
        after = evaluate(run)
        if after is not None:
            run.tracker.log(state.step, after)
            write(f"step {state.step}: eval {describe(after)}")
    if cfg.save_every and state.step % cfg.save_every == 0 and not last:
        run.save_checkpoint()

"""`finetune sft`: one run, in four phases.

    setup (setup.py)       base + LoRA + fast path, data, optimizer/schedule, engine, objective, resume, tracker
    evaluate (evaluate.py) eval loss and samples before training (and at every eval during fit)
    fit (fit.py)           optimizer steps, with their log lines, evals and checkpoints
    finish (finish.py)     final eval, last checkpoint, adapter, summary, samples after

The distributed engine (one process, DDP, DeepSpeed, FSDP) is chosen once as a strategy object
(strategy/factory.py); the phases read the same for all of them.
"""

from __future__ import annotations

from finetune.model import resolve_base
from finetune.recipe import Recipe
from finetune.train.evaluate import baseline
from finetune.train.finish import TrainResult, finish
from finetune.train.fit import fit
from finetune.train.rundir import prepare_run
from finetune.train.setup import setup
from finetune.train.strategy.factory import create_strategy

__all__ = ["TrainResult", "train"]


def train(recipe: Recipe, resume: bool = False, echo=print, force: bool = False) -> TrainResult:
    """Train as `recipe` says. `resume`: continue from the newest valid checkpoint in output.dir; `force`:
    allow recipe changes that alter the rest of the trajectory (finetune/train/resume.py)."""
    rt = create_strategy()
    say = echo if rt.is_main else (lambda *a, **k: None)
    # The base resolved once (format, settings, weights, compute dtype): the main process converts a GGUF base
    # (or fetches a hub one) into the cache before the other ranks look for it. Loading itself must not be
    # serialised (ZeRO-3 partitions while it loads). A base this engine cannot train is refused here, before
    # output.dir is touched.
    with rt.main_process_first():
        spec = resolve_base(recipe.base, rt.device)
    rt.check_base(spec)
    start = prepare_run(recipe, rt, resume, force, say)  # output.dir checked and locked before anything loads
    try:
        run = setup(recipe, rt, start, spec, say)
        before = baseline(run)
        meter = fit(run)
        return finish(run, before, meter)
    finally:
        start.close()

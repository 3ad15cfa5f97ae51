"""The finish phase: final eval, the last checkpoint, the adapter directory, the run's summary and the
before/after samples."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from finetune.model import LoadedBase
from finetune.recipe import Recipe, dump_recipe
from finetune.train.checkpoint import atomic_dir
from finetune.train.diskspace import disk_space_guard, tensor_bytes
from finetune.train.evaluate import Baseline, describe, evaluate
from finetune.train.meter import StepMeter
from finetune.train.samples import generate_samples
from finetune.train.setup import Run


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_loss_last: float | None
    wall_s: float
    tokens_per_s: float


def finish(run: Run, before: Baseline, meter: StepMeter) -> TrainResult:
    """Evaluate, checkpoint and save the adapter (every rank takes part), then summarise on the main process."""
    rt, state, say = run.rt, run.state, run.say
    after = evaluate(run)
    if after is not None:
        run.tracker.log(state.step, after)
    run.save_checkpoint()
    adapter_dir = run.out_dir / "adapter"
    _save_adapter(run, adapter_dir)
    wall = time.perf_counter() - run.started
    eval_before = before.eval["eval_loss"] if before.eval else None
    eval_after = after["eval_loss"] if after else None
    run.tracker.summary({"eval_loss_before": eval_before, "eval_loss_after": eval_after,
                         "tokens_per_s": meter.tokens_per_s, "wall_s": wall})
    run.tracker.finish()
    if eval_before is not None and eval_after is not None:
        say(f"eval before: {describe(before.eval)}\neval after:  {describe(after)}")
    elif eval_after is not None:
        say(f"eval after training: {describe(after)}")
    if before.samples and rt.is_main:
        samples = generate_samples(rt.unwrap(run.model), run.base.tokenizer, before.prompts,
                                   run.recipe.samples.max_new_tokens)
        for i, (b, a) in enumerate(zip(before.samples, samples)):
            say(f"--- sample {i + 1}: {b.prompt!r}\n  before: {b.text!r}\n  after:  {a.text!r}")
    say(f"done: {state.step} steps in {wall:.0f} s, {meter.tokens_per_s:.0f} tokens/s while training, "
        f"peak memory {rt.peak_memory_mb():.0f} MiB; adapter in {adapter_dir}")
    return TrainResult(run.out_dir, adapter_dir, state.step, eval_before, eval_after, meter.last_loss, wall,
                       meter.tokens_per_s)


def _save_adapter(run: Run, adapter_dir: Path) -> None:
    """The final adapter, gathered from the shards where parameters are sharded (a collective)."""
    rt = run.rt
    adapter_state = rt.full_adapter_state(run.model)
    if rt.is_main:
        model = rt.unwrap(run.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        with disk_space_guard(adapter_dir, tensor_bytes(trainable) + 2**20):  # + tokenizer files
            save_final_adapter(model, run.base, run.recipe, adapter_dir, adapter_state)
    rt.barrier()


def save_final_adapter(model, base: LoadedBase, recipe: Recipe, adapter_dir: Path,
                       adapter_state: dict | None = None) -> None:
    """peft's format plus tokenizer and the resolved recipe, so the directory is self-describing.

    `adapter_state`: the LoRA weights gathered from sharded parameters (ZeRO-3/FSDP), else None.
    """
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp, state_dict=adapter_state)
        base.tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        # The adapter names the base it was trained on (base.json): format, settings, the converted GGUF dir.
        base.spec.save(tmp)
        if not (tmp / "adapter_config.json").exists():
            raise RuntimeError(f"{adapter_dir}: adapter save produced no adapter_config.json")

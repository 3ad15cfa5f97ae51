"""TRL 1.15 as the reference implementation of DPO and KTO in tests: its trainers' own `_compute_loss` on our model.

TRL's DPO and KTO trainers compute per-token log-probs through a Triton-only fused LM head; `plain_trl_head`
(scripts/bench/trl_cpu.py) stands in for it on CPU with the computation its docstring defines, so that everything
else -- the reference pass through `use_adapter`, log-ratios, losses, KL estimate, rewards and metrics -- is TRL's
own code.
"""

from __future__ import annotations

from scripts.bench.trl_cpu import plain_trl_head, trl_inputs  # noqa: F401  (the tests import them from here)


def trl_trainer(kind: str, model, tokenizer, out_dir, **settings):
    """A TRL DPOTrainer or KTOTrainer around `model`, a PeftModel whose reference is its base (adapter off)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    common = dict(output_dir=str(out_dir), report_to=[], use_cpu=True, per_device_train_batch_size=4,
                  gradient_checkpointing=False, disable_tqdm=True, **settings)
    if kind == "dpo":
        rows = [{"prompt": "q", "chosen": "yes", "rejected": "no"}] * 4
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    else:
        rows = [{"prompt": "q", "completion": "yes", "label": k % 2 == 0} for k in range(4)]
        trainer = KTOTrainer(model=model, args=KTOConfig(**common), train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    # Given a PeftModel, TRL copies its adapter as a frozen "ref" adapter (re-training an existing adapter). Ours
    # is a new adapter whose reference is the base: TRL's path for that is the adapter switched off, taken when
    # there is no "ref" adapter.
    model.delete_adapter("ref")
    return trainer

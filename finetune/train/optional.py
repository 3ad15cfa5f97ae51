"""The optional packages a run may use, imported here on first use and nowhere else.

They are extras (`pip install qlora-finetune[wandb]`, `[deepspeed]`): a run that does not use them must
start without them installed (the development environment has no DeepSpeed), and one that does not log to W&B
should not pay for importing it (`python -X importtime`: wandb 2.8-4.6 s after torch and transformers, on 2
busy CPU cores).
"""

from __future__ import annotations

import importlib


def deepspeed():
    """The `deepspeed` package (accelerate has already imported it when a run uses DeepSpeed)."""
    import deepspeed

    return deepspeed


def wandb():
    """The `wandb` package, for runs that log to Weights & Biases."""
    import wandb

    return wandb


def deepspeed_globals(where) -> list:
    """The classes named by `where` ((module, (name, ...)), ...) that this DeepSpeed version has; none where
    DeepSpeed is not installed."""
    found = []
    for module, names in where:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, name) for name in names if hasattr(mod, name)]
    return found

"""`finetune eval --lm-eval TASKS`: EleutherAI's lm-evaluation-harness (the optional `lmeval` extra) on a loaded
model. TASKS is a comma-separated list of registered task names or task YAML files (a YAML task whose
`dataset_path`/`dataset_kwargs` point at local files runs offline). Task data that is not available (no network,
not cached) is a one-line skip, not a failure of the whole evaluation."""

from __future__ import annotations

import logging

from finetune.inference import Loaded
from quant.errors import UserError


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def run_lm_eval(m: Loaded, tasks: str, batch_size: int, echo=print) -> dict | None:
    """{task: {metric: value}} from lm-eval on `m`, or None when its task data could not be had."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError(f"--lm-eval {tasks!r}: no task names")
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=m.model, tokenizer=m.tokenizer, batch_size=batch_size)
    try:
        results = simple_evaluate(model=lm, tasks=names, log_samples=False, bootstrap_iters=0)
    except KeyError as e:
        raise UserError(f"--lm-eval: {_one_line(e)}") from None
    except (OSError, ConnectionError) as e:  # datasets' offline / not-found errors are OSErrors
        echo(f"lm-eval {','.join(names)}: skipped, task data not available ({_one_line(e)})")
        return None
    return {task: {k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "alias"}
            for task, values in (results or {}).get("results", {}).items()}

"""What the merge cost, measured: losses of (a) the quantized base alone, (b) the adapter on that base as it
was trained, (c) the merged output, on held-out data, plus the mean per-token KL(b‖c) and

    retention = (loss_a − loss_c) / (loss_a − loss_b)

the share of the fine-tune's improvement the merged model keeps (1 = all of it, 0 = none).

Loss is computed the way training computes it: examples rendered by the training data pipeline with the
run's data settings (chat template, answer-only labels), next-token cross-entropy over label tokens only.
KL is averaged over the same label tokens. (a) and (b) are one model: peft with its adapter disabled.
This is evaluation, not the streaming merge, so it loads whole models.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from finetune.data import build_datasets, collate
from finetune.merge.adapter import AdapterSource
from finetune.model import load_adapter, load_base
from finetune.recipe import DataConfig
from finetune.train.loss import IGNORE, model_inputs
from quant.errors import UserError
from quant.formats.registry import output_format

log = logging.getLogger(__name__)


def locate(path: str, run_dir: Path | None) -> str:
    """A recipe path as training saw it: from the current directory, else from the run or repository root."""
    candidates = [Path(path)]
    if run_dir is not None:
        candidates += [run_dir / path, run_dir.parent / path, run_dir.parent.parent / path]
    for c in candidates:
        if c.exists():
            return str(c)
    return path


def eval_plan(data: DataConfig | None, run_dir: Path | None, eval_data: str | None) -> tuple[DataConfig, str]:
    """The data settings the eval examples are built from and where they come from, decided without loading
    anything: the merge calls it before any model loads, so that a merge without eval data fails at once."""
    data = data or DataConfig()
    if eval_data:
        if not Path(eval_data).exists() and Path(eval_data).suffix:
            raise UserError(f"--eval {eval_data}: no such file")
        path, origin = eval_data, f"--eval {eval_data}"
    elif data.eval:
        path = locate(data.eval, run_dir)
        origin = f"the run's data.eval ({path})"
        if not Path(path).exists() and Path(path).suffix:  # a file that moved (hub dataset ids have no suffix)
            raise UserError(f"the run's data.eval '{data.eval}' was not found; pass --eval FILE or --no-report")
    elif data.eval_fraction and data.train:
        train = locate(data.train, run_dir)
        if not Path(train).exists() and Path(train).suffix:
            raise UserError(f"the run's data.train '{data.train}', whose eval_fraction {data.eval_fraction:g} is "
                            "the eval data, was not found; pass --eval FILE or --no-report")
        return replace(data, train=train, packing=False), \
            f"the run's eval_fraction {data.eval_fraction:g} of {train}"
    else:
        raise UserError("no eval data for the fidelity report: the run's recipe has no data.eval; pass --eval FILE "
                        "or --no-report")
    return replace(data, train=path, eval=None, eval_fraction=0.0, packing=False, max_examples=None), origin


def eval_examples(source: AdapterSource, tokenizer, eval_data: str | None) -> tuple[list[dict], str]:
    """Tokenized, unpacked eval examples and where they came from."""
    cfg, origin = eval_plan(source.data, source.run_dir, eval_data)
    bundle = build_datasets(cfg, tokenizer, source.train.seed if source.train else 42)
    return (bundle.eval if cfg.eval_fraction else bundle.train), origin


def load_adapter_model(source: AdapterSource, device: torch.device):
    """(b): the quantized base exactly as training built it (its record), with the adapter; (a) is it with the
    adapter off."""
    base = load_base(source.base, device)
    return load_adapter(base.model, source.adapter_dir).eval(), base.compute_dtype


def load_merged(out_dir: Path, fmt: str, device: torch.device, dtype: torch.dtype):
    """(c): the merged output loaded the way its users would (its format says how), computing in `dtype` like
    (b) so that the comparison measures the weights, not the arithmetic."""
    return output_format(fmt).load_merged(Path(out_dir), device, dtype)


@torch.no_grad()
def measure(model_b, merged: dict, examples: list[dict], pad_id: int, batch_size: int = 4, device=None,
            max_batches: int | None = None) -> dict:
    """Summed losses over label tokens of a (b with its adapter off), b and each merged model c, and the summed
    KL(b‖c) per c. (a) and (b) are computed once however many merged models are compared."""
    sums = {"a": 0.0, "b": 0.0, **{label: {"loss": 0.0, "kl": 0.0} for label in merged}}
    tokens = scored = 0
    n_batches = math.ceil(len(examples) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for i in range(n_batches):
        chunk = examples[i * batch_size:(i + 1) * batch_size]
        scored += len(chunk)
        batch = collate(chunk, pad_id, packed=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        if not mask.any():
            continue
        inputs = model_inputs(batch)
        target = labels[mask]

        def logp(model):
            return F.log_softmax(model(**inputs).logits[:, :-1].float()[mask], dim=-1)

        logp_b = logp(model_b)
        with model_b.disable_adapter():
            sums["a"] += F.nll_loss(logp(model_b), target, reduction="sum").item()
        sums["b"] += F.nll_loss(logp_b, target, reduction="sum").item()
        p_b = logp_b.exp()
        for label, model_c in merged.items():
            logp_c = logp(model_c)
            sums[label]["loss"] += F.nll_loss(logp_c, target, reduction="sum").item()
            sums[label]["kl"] += (p_b * (logp_b - logp_c)).sum().item()
        tokens += int(mask.sum())
    if tokens == 0:
        raise UserError("the eval data has no label tokens to score (all prompts?)")
    return {"tokens": tokens, "examples": scored, **sums}


def fidelity_many(source: AdapterSource, outputs: dict[str, tuple[Path, str]], device: torch.device,
                  eval_data: str | None = None, max_batches: int | None = None) -> dict[str, dict]:
    """The fidelity of several merged outputs of one adapter ({label: (directory, format)}), on one eval pass."""
    model_b, dtype = load_adapter_model(source, device)
    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    examples, origin = eval_examples(source, tokenizer, eval_data)
    merged = {label: load_merged(Path(d), fmt, device, dtype) for label, (d, fmt) in outputs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batch = source.train.micro_batch_size if source.train else 4
    # LLM.int8 layers log "inputs will be cast to float16" on every call: by design, not news.
    int8_log = logging.getLogger("bitsandbytes.autograd._functions")
    level = int8_log.level
    int8_log.setLevel(logging.ERROR)
    try:
        s = measure(model_b, merged, examples, pad, batch, device, max_batches)
    finally:
        int8_log.setLevel(level)
    del model_b, merged
    n = s["tokens"]
    la, lb = s["a"] / n, s["b"] / n
    gain = la - lb
    results = {}
    for label in outputs:
        lc = s[label]["loss"] / n
        results[label] = {
            "eval_data": origin,
            "eval_examples": s["examples"],
            "label_tokens": n,
            "compute_dtype": str(dtype).replace("torch.", ""),
            "loss_base": la, "loss_adapter": lb, "loss_merged": lc,
            "ppl_base": math.exp(min(la, 50)), "ppl_adapter": math.exp(min(lb, 50)),
            "ppl_merged": math.exp(min(lc, 50)),
            "kl_adapter_merged": s[label]["kl"] / n,
            # With no improvement to keep (gain ~ 0) the ratio is meaningless.
            "retention": (la - lc) / gain if abs(gain) > 1e-6 else None,
        }
    return results


def fidelity(source: AdapterSource, out_dir: Path, fmt: str, device: torch.device, eval_data: str | None = None,
             max_batches: int | None = None) -> dict:
    return fidelity_many(source, {fmt: (out_dir, fmt)}, device, eval_data, max_batches)[fmt]


def table(report: dict, fmt: str, base_quantization: str) -> str:
    f = report["fidelity"] if "fidelity" in report else report
    rows = [
        (f"(a) base ({base_quantization})", f["loss_base"], f["ppl_base"], ""),
        ("(b) base + adapter", f["loss_adapter"], f["ppl_adapter"], ""),
        (f"(c) merged ({fmt})", f["loss_merged"], f["ppl_merged"], f"{f['kl_adapter_merged']:.5f}"),
    ]
    lines = [f"{'model':<28} {'loss':>8} {'ppl':>9} {'KL(b||c)':>10}"]
    lines += [f"{name:<28} {loss:>8.4f} {ppl:>9.3f} {kl:>10}" for name, loss, ppl, kl in rows]
    ret = f["retention"]
    lines.append(f"retention (a-c)/(a-b): {ret:.4f}" if ret is not None else "retention: n/a (the adapter did not "
                 "change the eval loss)")
    lines.append(f"on {f['label_tokens']} label tokens of {f['eval_examples']} examples from {f['eval_data']}")
    return "\n".join(lines)


def log_to_wandb(source: AdapterSource, report: dict, fmt: str) -> None:
    """One W&B run (job_type 'merge') with the report as summary, when the run's recipe configured W&B."""
    wb = source.tracking.wandb if source.tracking else None
    if wb is None or not wb.project or wb.mode == "disabled":
        return
    import wandb

    run_dir = Path(wb.dir or source.run_dir or source.adapter_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{wb.name or source.adapter_dir.parent.name}-merge-{fmt}"
    run = wandb.init(project=wb.project, entity=wb.entity, mode=wb.mode, dir=str(run_dir), name=name,
                     job_type="merge", config={k: v for k, v in report.items() if k != "fidelity"})
    run.summary.update({f"merge/{k}": v for k, v in (report.get("fidelity") or {}).items()})
    run.finish()


def write_report(path: Path, report: dict) -> None:
    """merge_report.json, inside the merge's staged output directory."""
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")

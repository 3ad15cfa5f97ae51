"""What the merge cost, measured: losses of (a) the quantized base alone, (b) the adapter on that base as it
was trained, (c) the merged output, on held-out data, plus the mean per-token KL(b‖c) and

    retention = (loss_a − loss_c) / (loss_a − loss_b)

the share of the fine-tune's improvement the merged model keeps (1 = all of it, 0 = none).

Loss is computed the way training computes it: examples rendered by the training data pipeline with the
run's data settings (chat template, answer-only labels), next-token cross-entropy over label tokens only.
KL is averaged over the same label tokens. (a) and (b) are one model: peft with its adapter disabled.
This is evaluation, not the streaming merge, so it loads whole models. A preference-trained adapter is measured on
the chosen answers of held-out pairs, plus the reward accuracy of (b) and (c) on them (preference_report.py).

Bounded and visible: every batch runs three models (a, b, c), and on CPU (a) and (b) go through bitsandbytes'
4-bit layers, so scoring all 32 held-out ShareGPT rows of 512 tokens took 975 CPU-seconds on 2 cores, longer
than the 20-step training run. On CPU only the first CPU_EVAL_MAX_BATCHES batches are scored unless the caller
asks for more; each model has its own progress bar; the report names the rows scored.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from finetune.data import build_datasets, collate
from finetune.merge.adapter import AdapterSource
from finetune.merge.preference_report import holds_preferences, preference_eval, reward_accuracy
from finetune.model import load_adapter, load_base
from finetune.recipe import DataConfig
from finetune.train.loss import IGNORE, model_inputs
from quant.errors import UserError
from quant.formats.registry import output_format

log = logging.getLogger(__name__)
CPU_EVAL_MAX_BATCHES = 8  # fidelity batches scored on CPU unless asked otherwise (see the module docstring)
RETENTION_WARNING = 0.5  # below this share of the fine-tune kept, the merge says what else to try
# What else to try (scripts/tables/merge_alternatives.py measures each on a real adapter).
ALTERNATIVES = ("try a type with more bits (gguf Q6_K or Q8_0; gptq/awq --bits 8), --calib with the training data, "
                "or --merge-into original")


def eval_cap(max_batches: int | None, device: torch.device) -> int | None:
    """The batches to score: the caller's number, else all on a GPU and CPU_EVAL_MAX_BATCHES on CPU."""
    if max_batches is not None:
        return max_batches
    return CPU_EVAL_MAX_BATCHES if torch.device(device).type == "cpu" else None


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


def eval_examples(source: AdapterSource, tokenizer,
                  eval_data: str | None) -> tuple[list[dict], str, list[dict] | None]:
    """Tokenized, unpacked eval examples, where they came from, and the held-out preference pairs of a
    preference-trained adapter (whose eval examples are then the pairs' chosen answers), else None."""
    cfg, origin = eval_plan(source.data, source.run_dir, eval_data)
    if source.preference is not None and holds_preferences(cfg.train, cfg.split):
        return preference_eval(source, tokenizer, cfg, origin)
    bundle = build_datasets(cfg, tokenizer, source.train.seed if source.train else 42)
    return (bundle.eval if cfg.eval_fraction else bundle.train), origin, None


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
            max_batches: int | None = None, progress: bool = False) -> dict:
    """Summed losses over label tokens of a (b with its adapter off), b and each merged model c, and the summed
    KL(b‖c) per c. (a) and (b) are computed once however many merged models are compared. With `progress`, one
    bar per model (they advance together, batch by batch; each shows its own time)."""
    sums = {"a": 0.0, "b": 0.0, **{label: {"loss": 0.0, "kl": 0.0} for label in merged}}
    tokens = scored = 0
    n_batches = math.ceil(len(examples) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    names = ["(a) base", "(b) base + adapter", *(f"(c) merged {label}" for label in merged)]
    width = max(len(n) for n in names)
    bars = {name: tqdm(total=n_batches, desc=f"score {name:<{width}}", unit="batch", position=i, leave=True,
                       disable=not progress, dynamic_ncols=True) for i, name in enumerate(names)}
    try:
        for i in range(n_batches):
            chunk = examples[i * batch_size:(i + 1) * batch_size]
            scored += len(chunk)
            batch = collate(chunk, pad_id, packed=False)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"][:, 1:]
            mask = labels != IGNORE
            if not mask.any():
                for bar in bars.values():
                    bar.update(1)
                continue
            inputs = model_inputs(batch)
            target = labels[mask]

            def logp(model):
                return F.log_softmax(model(**inputs).logits[:, :-1].float()[mask], dim=-1)

            with model_b.disable_adapter():
                sums["a"] += F.nll_loss(logp(model_b), target, reduction="sum").item()
            bars[names[0]].update(1)
            logp_b = logp(model_b)
            sums["b"] += F.nll_loss(logp_b, target, reduction="sum").item()
            bars[names[1]].update(1)
            p_b = logp_b.exp()
            for name, (label, model_c) in zip(names[2:], merged.items()):
                logp_c = logp(model_c)
                sums[label]["loss"] += F.nll_loss(logp_c, target, reduction="sum").item()
                sums[label]["kl"] += (p_b * (logp_b - logp_c)).sum().item()
                bars[name].update(1)
            tokens += int(mask.sum())
    finally:
        for bar in bars.values():
            bar.close()
    if tokens == 0:
        raise UserError("the eval data has no label tokens to score (all prompts?)")
    return {"tokens": tokens, "examples": scored, "examples_total": len(examples), "batches": n_batches,
            "batch_size": batch_size, **sums}


def _training_eval(source: AdapterSource, eval_data: str | None) -> str | None:
    """What training's own eval loss (metrics.jsonl, 'eval before/after') was computed on, when it is the same
    held-out data: it differs from (a)/(b) here whenever the rows or their packing differ."""
    if eval_data or source.data is None or not (source.data.eval or source.data.eval_fraction):
        return None
    cap = source.train.eval_max_batches if source.train else None
    rows = f"the first {cap} batches" if cap else "all batches"
    packing = "packed several rows to a sequence" if source.data.packing else "one row per sequence"
    return f"{rows} of the same held-out rows, {packing}"


def fidelity_many(source: AdapterSource, outputs: dict[str, tuple[Path, str]], device: torch.device,
                  eval_data: str | None = None, max_batches: int | None = None,
                  progress: bool = False) -> dict[str, dict]:
    """The fidelity of several merged outputs of one adapter ({label: (directory, format)}), on one eval pass
    over the first `max_batches` batches (None: see eval_cap)."""
    model_b, dtype = load_adapter_model(source, device)
    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    examples, origin, pairs = eval_examples(source, tokenizer, eval_data)
    merged = {label: load_merged(Path(d), fmt, device, dtype) for label, (d, fmt) in outputs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batch = source.train.micro_batch_size if source.train else 4
    # LLM.int8 layers log "inputs will be cast to float16" on every call: by design, not news.
    int8_log = logging.getLogger("bitsandbytes.autograd._functions")
    level = int8_log.level
    int8_log.setLevel(logging.ERROR)
    try:
        cap = eval_cap(max_batches, device)
        s = measure(model_b, merged, examples, pad, batch, device, cap, progress)
        max_length = (source.data or DataConfig()).max_length
        rewards = reward_accuracy(model_b, merged, pairs, pad, max_length, batch, device, cap) \
            if pairs else None
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
            "eval_examples_total": s["examples_total"],
            "eval_batches": s["batches"],
            "eval_batch_size": s["batch_size"],
            "training_eval": _training_eval(source, eval_data),
            "label_tokens": n,
            "compute_dtype": str(dtype).replace("torch.", ""),
            "loss_base": la, "loss_adapter": lb, "loss_merged": lc,
            "ppl_base": math.exp(min(la, 50)), "ppl_adapter": math.exp(min(lb, 50)),
            "ppl_merged": math.exp(min(lc, 50)),
            "kl_adapter_merged": s[label]["kl"] / n,
            # With no improvement to keep (gain ~ 0) the ratio is meaningless.
            "retention": (la - lc) / gain if abs(gain) > 1e-6 else None,
        }
        if rewards is not None:
            results[label].update({
                "eval_pairs": rewards["pairs"],
                "reward_accuracy_adapter": rewards["adapter"][0], "reward_accuracy_merged": rewards[label][0],
                "reward_margin_adapter": rewards["adapter"][1], "reward_margin_merged": rewards[label][1]})
    return results


def fidelity(source: AdapterSource, out_dir: Path, fmt: str, device: torch.device, eval_data: str | None = None,
             max_batches: int | None = None, progress: bool = False) -> dict:
    return fidelity_many(source, {fmt: (out_dir, fmt)}, device, eval_data, max_batches, progress)[fmt]


def rows_scored(f: dict) -> str:
    """Which held-out rows the three losses were computed on, in words."""
    total = f.get("eval_examples_total", f["eval_examples"])
    rows = f"all {total}" if f["eval_examples"] >= total else f"the first {f['eval_examples']} of {total}"
    text = f"on {f['label_tokens']} label tokens of {rows} examples from {f['eval_data']}"
    if "eval_batches" in f:
        text += f" ({f['eval_batches']} batches of {f['eval_batch_size']}, one row per sequence"
        text += "; --eval-max-batches N to score more)" if f["eval_examples"] < total else ")"
    if f.get("training_eval"):
        text += f"; training's eval loss used {f['training_eval']}, so (a) and (b) differ from its numbers"
    return text


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
    lines.append(rows_scored(f))
    if "reward_accuracy_adapter" in f:
        lines.append(f"reward accuracy on {f['eval_pairs']} held-out pairs: (b) {f['reward_accuracy_adapter']:.4f} "
                     f"(margin {f['reward_margin_adapter']:.3f} nats), (c) {f['reward_accuracy_merged']:.4f} "
                     f"(margin {f['reward_margin_merged']:.3f} nats)")
    return "\n".join(lines)


def retention_warning(f: dict, fmt: str) -> str | None:
    """One line when the merged model keeps less than RETENTION_WARNING of the fine-tune, with what else to try
    (ALTERNATIVES)."""
    ret = f.get("retention")
    if ret is None or ret >= RETENTION_WARNING:
        return None
    return (f"the {fmt} merge keeps {max(ret, 0):.0%} of the fine-tune's improvement (retention {ret:.2f}, "
            f"KL {f['kl_adapter_merged']:.3f}); {ALTERNATIVES}")


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


def report_text(report: dict) -> str:
    return json.dumps(report, indent=2, default=str) + "\n"


def write_report(path: Path, report: dict) -> None:
    """merge_report.json, inside the merge's staged output directory (the fidelity is added once scored)."""
    path.write_text(report_text(report))

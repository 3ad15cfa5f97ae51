"""`finetune eval`: held-out loss/perplexity and generation metrics of several models in one table.

Each RUN_OR_MODEL is loaded by finetune.inference; a run (or adapter) gives two rows, its quantized base alone
('base', the adapter switched off) and the adapter on it; a merged output gives one row. Metrics:

- loss: next-token loss on answer tokens of the eval file rendered by the training data pipeline (the run's
  data settings: format, chat template, max_length, train_on_prompt; no packing), and its perplexity;
- exact_match: greedy generations that equal the reference answer (the last assistant turn, or the completion),
  compared after stripping surrounding whitespace;
- json_valid: greedy generations that parse as one JSON document.

`--lm-eval TASKS` runs EleutherAI's lm-evaluation-harness (optional extra) on each model, when installed and its
task data is available.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune.data import Chat, build_datasets, collate, convert, read_rows
from finetune.data.formats import resolve_format
from finetune.data.report import SourceStats
from finetune.generation import GenConfig, chat_prompt_ids, generate_batch, raw_prompt_ids
from finetune.harness import run_lm_eval
from finetune.inference import Loaded, input_paths, is_adapter_path, load, resolve_device
from finetune.merge.adapter import read_adapter
from finetune.merge.report import locate
from finetune.recipe import DataConfig
from finetune.train.loss import model_inputs, token_loss_sum
from quant.errors import UserError
from quant.files import check_output, write_output
log = logging.getLogger(__name__)
METRICS = ("loss", "exact_match", "json_valid")
GENERATION_METRICS = ("exact_match", "json_valid")
MAX_NEW_MARGIN = 32  # generated tokens allowed beyond the longest reference answer (by default)


@dataclass
class Reference:
    prompt: list[dict] | str  # chat turns before the answer, or raw prompt text (completion format)
    answer: str


def parse_metrics(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise UserError(f"--metric {text}: unknown metric {', '.join(bad) or '(none given)'}; choose from "
                        f"{', '.join(METRICS)}")
    return names


def _run_source(path: Path):
    """The AdapterSource a model came from: the run itself, or the adapter a merge_report.json names."""
    if is_adapter_path(path):
        return read_adapter(path)
    report = path / "merge_report.json"
    if report.is_file():
        adapter = json.loads(report.read_text()).get("adapter")
        if adapter and Path(adapter).exists():
            return read_adapter(adapter)
    return None


def data_settings(models: list[str], data: str | None) -> tuple[str, DataConfig, int]:
    """(eval file, data settings, seed): the first run's data section (directly or through a merge report),
    else the defaults; the file is --data, else that run's data.eval."""
    for model in models:
        source = _run_source(Path(model))
        if source is not None and source.data is not None:
            path = data or (locate(source.data.eval, source.run_dir) if source.data.eval else None)
            if path:
                return path, source.data, source.train.seed if source.train else 42
    if data is None:
        raise UserError("no eval data: pass --data FILE (none of the models is a run whose recipe has data.eval)")
    return data, DataConfig(train=data), 42


def references(path: str, cfg: DataConfig, limit: int | None) -> list[Reference]:
    """Prompt + reference answer of each row, converted by the training data pipeline's formats."""
    rows = read_rows(path, "train", limit, what="--data", split_fallbacks=("validation", "test"))
    fmt, _ = resolve_format(cfg.format, rows)
    if fmt == "text":
        raise UserError(f"--data {path}: text-format rows have no reference answers; exact_match and json_valid "
                        "need chat/sharegpt/alpaca or prompt/completion rows (or use --metric loss)")
    refs = []
    for item in convert(rows, fmt, SourceStats(rows.source)):
        if isinstance(item, Chat):
            refs.append(Reference([{"role": r, "content": c} for r, c in item.turns[:-1]], item.turns[-1][1]))
        else:
            refs.append(Reference("".join(t for t, trained in item.parts if not trained),
                                  "".join(t for t, trained in item.parts if trained)))
    if not refs:
        raise UserError(f"--data {path}: no usable rows")
    return refs


@torch.no_grad()
def eval_loss(model, tokenizer, path: str, cfg: DataConfig, seed: int, batch_size: int,
              limit: int | None) -> tuple[float, int]:
    """Mean loss over answer tokens and their count."""
    data = replace(cfg, train=path, eval=None, eval_fraction=0.0, packing=False, max_examples=limit)
    examples = build_datasets(data, tokenizer, seed).train
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for lo in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[lo:lo + batch_size], pad, packed=False).items()}
        s, n = token_loss_sum(model(**model_inputs(batch)).logits, batch["labels"])
        total += float(s)
        count += n
    return total / max(count, 1), count


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def generation_scores(m: Loaded, refs: list[Reference], batch_size: int, max_new_tokens: int | None,
                      label: str) -> dict:
    tok = m.tokenizer
    prompts = [chat_prompt_ids(tok, r.prompt) if isinstance(r.prompt, list) else raw_prompt_ids(tok, r.prompt)
               for r in refs]
    if max_new_tokens is None:
        max_new_tokens = max(len(tok(r.answer, add_special_tokens=False)["input_ids"]) for r in refs) + MAX_NEW_MARGIN
    bar = tqdm(total=len(prompts), desc=f"generate {label}", leave=False, dynamic_ncols=True)
    gens = generate_batch(m.model, tok, prompts, GenConfig(max_new_tokens=max_new_tokens), batch_size, bar.update)
    bar.close()
    texts = [g.text.strip() for g in gens]
    return {"examples": len(refs),
            "exact_match": sum(t == r.answer.strip() for t, r in zip(texts, refs)),
            "json_valid": sum(_is_json(t) for t in texts),
            "gen_tokens_per_s": sum(g.new_tokens for g in gens) / max(sum(g.seconds for g in gens), 1e-9),
            "samples": [{"answer": t, "reference": r.answer} for t, r in list(zip(texts, refs))[:3]]}


@dataclass
class Plan:
    """What every model is scored on, decided once before any model loads."""

    metrics: list[str]
    path: str  # the eval file
    data: DataConfig  # the run's data settings, rendering the file as training did
    seed: int
    refs: list[Reference] | None  # prompts + reference answers, when a generation metric is asked for
    batch_size: int
    max_new_tokens: int | None
    limit: int | None


def _score(m: Loaded, label: str, plan: Plan) -> dict:
    row: dict = {"model": label}
    if "loss" in plan.metrics:
        loss, tokens = eval_loss(m.model, m.tokenizer, plan.path, plan.data, plan.seed, plan.batch_size, plan.limit)
        row.update(loss=loss, ppl=math.exp(min(loss, 50)), label_tokens=tokens)
    if plan.refs is not None:
        row.update(generation_scores(m, plan.refs, plan.batch_size, plan.max_new_tokens, label))
    return row


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def evaluate(models: list[str], data: str | None = None, metrics: list[str] = METRICS, include_base: bool = True,
             batch_size: int = 8, max_new_tokens: int | None = None, limit: int | None = None,
             lm_eval_tasks: str | None = None, device: str | None = None, dtype: str | None = None,
             out: str | None = None, echo=print, overwrite: bool = False) -> list[dict]:
    """Score every model (see the module docstring); returns the table's rows and prints the table. `out`
    follows the output rule (quant.files.claim_output), checked before any model loads."""
    if lm_eval_tasks and not lm_eval_available():
        raise UserError("--lm-eval needs EleutherAI's lm-evaluation-harness: pip install 'qlora-finetune[lmeval]' "
                        "(and its task data available locally)")
    for model in models:
        if not Path(model).exists():
            raise UserError(f"{model}: no such run or model directory")
    path, cfg, seed = data_settings(models, data)
    if not Path(path).exists() and Path(path).suffix:
        raise UserError(f"--data {path}: no such file")
    inputs = [*(p for m in models for p in input_paths(m)), (path, "the eval data")] if out else []
    if out:
        check_output(out, overwrite, inputs=inputs, file=True)  # before any model loads
    refs = references(path, cfg, limit) if any(m in GENERATION_METRICS for m in metrics) else None
    plan = Plan(list(metrics), path, cfg, seed, refs, batch_size, max_new_tokens, limit)
    dev = resolve_device(device)
    rows = []
    for model in models:
        m = load(model, dev, dtype)
        echo(f"eval: {model} ({'adapter on its ' + m.source.base.format + ' base' if m.is_adapter else m.kind})")
        if m.is_adapter and include_base:
            with m.model.disable_adapter():
                rows.append(_score(m, f"{model} base ({m.source.base.format})", plan))
        rows.append(_score(m, f"{model} adapter" if m.is_adapter else f"{model} ({m.kind})", plan))
        if lm_eval_tasks:
            rows[-1]["lm_eval"] = run_lm_eval(m, lm_eval_tasks, batch_size, echo)
        del m
    echo(table(rows, path, metrics))
    for r in rows:
        if r.get("samples"):
            echo(f"first answer of {r['model']}: {r['samples'][0]['answer'][:160]!r}")
    if out:
        write_output(out, json.dumps({"data": path, "rows": rows}, indent=2) + "\n", overwrite, inputs=inputs)
    return rows


def table(rows: list[dict], path: str, metrics: list[str] = METRICS) -> str:
    width = max(len(r["model"]) for r in rows)
    head = f"{'model':<{width}}"
    head += f" {'loss':>8} {'ppl':>9}" if "loss" in metrics else ""
    head += f" {'exact match':>12}" if "exact_match" in metrics else ""
    head += f" {'valid JSON':>12}" if "json_valid" in metrics else ""
    lines = [head]
    for r in rows:
        line = f"{r['model']:<{width}}"
        if "loss" in metrics:
            line += f" {r['loss']:>8.4f} {r['ppl']:>9.3f}"
        for key in ("exact_match", "json_valid"):
            if key in metrics:
                line += f" {str(r[key]) + '/' + str(r['examples']):>12}"
        lines.append(line)
    tokens = next((r["label_tokens"] for r in rows if "label_tokens" in r), None)
    lines.append(f"on {path}" + (f": loss over {tokens} answer tokens" if tokens else "")
                 + ("; greedy generations compared with the reference answers" if any("examples" in r for r in rows)
                    else ""))
    return "\n".join(lines)

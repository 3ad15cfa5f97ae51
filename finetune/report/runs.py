"""What a `finetune sft` run directory records, read for the report.

A run directory holds `metrics.jsonl` (train rows with loss/lr/grad_norm/tokens_per_s/peak_mem_mb/tokens, eval
rows with eval_loss/eval_ppl), `recipe.yaml`, `data_report.json` (what the data pipeline kept, dropped and
truncated) and, when merged, the merges' `merge_report.json`.

Which merges belong to a run: every `RUN/merges/*/merge_report.json` (`finetune merge RUN --out
RUN/merges/NAME`), plus the merges in directories passed with `--merges DIR` (a merge output, or a folder of
them) whose report names this run's adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finetune.merge.adapter import MERGES_DIR
from finetune.recipe_checks import read_yaml
from finetune.report.validate import check_data_report, check_merge_report, check_recipe, read_metrics
from finetune.train.resume import flatten
from quant.errors import UserError
from quant.model_checks import read_json_object
DATA_REPORT = "data_report.json"  # written by finetune.train.loop


@dataclass
class Merge:
    path: Path
    report: dict

    @property
    def label(self) -> str:
        fmt = self.report.get("format", "?")
        encoded = self.report.get(fmt)  # what a quantizing encoder recorded (GPTQ, AWQ: method, bits, group size)
        if isinstance(encoded, dict) and "bits" in encoded:
            fmt = f"{encoded.get('method', fmt)} {encoded['bits']}b g{encoded.get('group_size', '?')}"
        return f"{fmt} ({self.path.name})"

    @property
    def fidelity(self) -> dict | None:
        return self.report.get("fidelity")


@dataclass
class Run:
    path: Path
    name: str
    train: list[dict]  # metrics rows with a training loss
    eval: list[dict]  # metrics rows with eval_loss
    recipe: dict
    data_report: dict | None
    merges: list[Merge] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what reading the run's files skipped

    @property
    def has_tokens(self) -> bool:
        return any("tokens" in r for r in self.train)

    def tokens_at(self, step: int) -> int | None:
        """Tokens seen by `step` (0 before training), from the train rows."""
        if step == 0:
            return 0
        for r in self.train:
            if r["step"] >= step:
                return r.get("tokens") if r["step"] == step else None
        return None


def read_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path}: no metrics.jsonl; pass a `finetune sft` output directory (output.dir)")
    rows, skipped = read_metrics(metrics)
    train = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])
    evals = sorted((r for r in rows if "eval_loss" in r), key=lambda r: r["step"])
    if not train and not evals:
        raise UserError(f"{metrics}: no logged metrics (no row has 'loss' or 'eval_loss')")
    recipe = read_yaml(path / "recipe.yaml", "a run's recipe") if (path / "recipe.yaml").is_file() else None
    merges = [Merge(p.parent, rep) for p in sorted((path / MERGES_DIR).glob("*/merge_report.json"))
              if (rep := check_merge_report(read_json_object(p), p)) is not None]
    run = Run(path, path.name, train, evals, check_recipe(recipe, path / "recipe.yaml"),
              check_data_report(read_json_object(path / DATA_REPORT), path / DATA_REPORT), merges)
    if skipped:
        run.notes.append(f"{metrics}: {skipped} lines or values skipped (not a JSON object with an integer step, "
                         "or a metric that is not a finite number)")
    return run


def attach_merges(runs: list[Run], dirs: list[str]) -> list[str]:
    """Add the merges found in `dirs` to the runs whose adapter they were made from; returns notes on the
    merges that matched no run."""
    notes = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise UserError(f"--merges {d}: no such directory")
        reports = [d / "merge_report.json"] if (d / "merge_report.json").is_file() else \
            sorted(d.glob("*/merge_report.json"))
        if not reports:
            raise UserError(f"--merges {d}: no merge_report.json in it or its subdirectories")
        for p in reports:
            report = check_merge_report(read_json_object(p), p)
            owner = _owner(runs, report.get("adapter"))
            if owner is None:
                notes.append(f"{p.parent}: made from {report.get('adapter')}, which is none of the runs; left out")
            elif all(m.path.resolve() != p.parent.resolve() for m in owner.merges):
                owner.merges.append(Merge(p.parent, report))
    return notes


def _owner(runs: list[Run], adapter: str | None) -> Run | None:
    if not adapter:
        return None
    a = Path(adapter).resolve()
    for run in runs:
        r = run.path.resolve()
        if a == r or r in a.parents:
            return run
    return None


def unique_names(runs: list[Run]) -> None:
    """Runs are named by their directory; two runs with the same directory name get their full paths."""
    names = [r.path.name for r in runs]
    for run in runs:
        run.name = run.path.name if names.count(run.path.name) == 1 else str(run.path)


# Keys that differ between any two runs without saying anything about training.
_NOT_A_DIFFERENCE = ("output.dir", "tracking.wandb.name", "tracking.wandb.dir", "description")


def recipe_differences(runs: list[Run]) -> dict[str, list]:
    """{dotted key: [value in each run]} for the recipe keys whose values differ between the runs."""
    flat = [flatten(r.recipe) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    return {k: [f.get(k) for f in flat] for k in keys
            if k not in _NOT_A_DIFFERENCE and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}

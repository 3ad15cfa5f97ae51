"""The report as one self-contained HTML page: tables of the runs, their recipe differences, their data and
their merges, and the charts embedded as base64 PNGs (the page opens anywhere, offline, as one file)."""

from __future__ import annotations

import base64
import html
import json
import statistics
import time

from finetune.report.plots import Plot
from finetune.report.runs import Run, recipe_differences

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 12px 0 20px 0; } figcaption { font-size: 12px; color: #555; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; font-size: 13px; }
"""


def _e(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def _table(head: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = "".join(f"<td class='num'>{_e(v)}</td>" if i in numeric else f"<td>{_e(v)}</td>"
                        for i, v in enumerate(row))
        out.append(f"<tr>{cells}</tr>")
    return "\n".join(out) + "</table>"


def _summary_rows(runs: list[Run]) -> list[list]:
    rows = []
    for r in runs:
        base = r.recipe.get("base") or {}
        tps = [x["tokens_per_s"] for x in r.train if isinstance(x.get("tokens_per_s"), (int, float))]
        mem = [x["peak_mem_mb"] for x in r.train if isinstance(x.get("peak_mem_mb"), (int, float))]
        evals = [x["eval_loss"] for x in r.eval]
        rows.append([
            r.name, str(r.path), f"{base.get('model', '?')} ({base.get('quantization', '?')})",
            r.train[-1]["step"] if r.train else None, r.train[-1].get("tokens") if r.train else None,
            r.train[-1]["loss"] if r.train else None,
            f"{evals[0]:.4f} → {evals[-1]:.4f}" if len(evals) > 1 else (evals[0] if evals else None),
            statistics.median(tps) if tps else None, max(mem) if mem else None, len(r.merges)])
    return rows


def _runs_section(runs: list[Run]) -> str:
    head = ["run", "directory", "base (quantization)", "steps", "tokens seen", "last train loss",
            "eval loss first → last", "median tokens/s", "peak memory MiB", "merges"]
    return "<h2>Runs</h2>" + _table(head, _summary_rows(runs), {3, 4, 5, 7, 8, 9})


def _recipe_section(runs: list[Run]) -> str:
    if len(runs) == 1:
        r = runs[0].recipe
        keys = [("lora", "r"), ("lora", "alpha"), ("lora", "target_modules"), ("train", "learning_rate"),
                ("train", "lr_scheduler"), ("train", "max_steps"), ("train", "epochs"), ("train", "micro_batch_size"),
                ("train", "gradient_accumulation"), ("data", "max_length"), ("data", "packing")]
        rows = [[f"{s}.{k}", (r.get(s) or {}).get(k)] for s, k in keys if (r.get(s) or {}).get(k) is not None]
        return "<h2>Recipe</h2>" + (_table(["key", "value"], rows) if rows else
                                    "<p class='note'>no recipe.yaml in the run directory</p>")
    diffs = recipe_differences(runs)
    if not diffs:
        return "<h2>Recipe differences</h2><p class='note'>The runs' recipes are identical (output.dir aside).</p>"
    return ("<h2>Recipe differences</h2><p class='note'>Keys whose values differ between the runs "
            "(output.dir and W&amp;B names left out).</p>"
            + _table(["key"] + [r.name for r in runs], [[k, *v] for k, v in diffs.items()]))


def _dropped(counts: dict) -> str:
    return ", ".join(f"{n} {why}" for why, n in counts.items()) if counts else "none"


def _data_section(runs: list[Run]) -> str:
    parts = ["<h2>Data</h2>"]
    for r in runs:
        d = r.data_report
        parts.append(f"<h3>{html.escape(r.name)}</h3>")
        if d is None:
            parts.append("<p class='note'>No data_report.json in the run directory (runs trained before "
                         "finetune recorded it); the data summary is in the run's log.</p>")
            continue
        scope = "every token" if d.get("format") == "text" or d.get("train_on_prompt") else "answer tokens only"
        parts.append(f"<p class='note'>format {_e(d.get('format'))} ({_e(d.get('format_reason'))}); "
                     f"{_e(d.get('rendering'))}; loss on {scope}; max_length {_e(d.get('max_length'))}, packing "
                     f"{_e(d.get('packing'))}; eval from {_e(d.get('eval_from'))}.</p>")
        rows = []
        for split, s in (d.get("splits") or {}).items():
            src = (d.get("sources") or {}).get(split) or {}
            rows.append([split, src.get("source"), src.get("rows_read"), src.get("rows_kept"),
                         _dropped({**(src.get("dropped") or {}), **(s.get("dropped") or {})}), s.get("examples"),
                         s.get("truncated"), s.get("tokens"), s.get("label_tokens"),
                         f"{100 * s.get('prompt_token_share', 0):.1f}%", s.get("sequences")])
        parts.append(_table(["split", "source", "rows read", "rows kept", "dropped", "examples", "truncated",
                             "tokens", "tokens trained on (labels)", "prompt-token share", "sequences"],
                            rows, {2, 3, 5, 6, 7, 8, 10}))
    return "\n".join(parts)


def _merges_section(runs: list[Run]) -> str:
    rows = []
    for r in runs:
        for m in r.merges:
            f = m.fidelity or {}
            rep = m.report
            size = rep.get("output_bytes")
            rows.append([r.name, str(m.path), m.label, rep.get("merge_into"), f.get("loss_base"),
                         f.get("loss_adapter"), f.get("loss_merged"), f.get("kl_adapter_merged"), f.get("retention"),
                         rep.get("merge_seconds"), size / 2**20 if size else None,
                         f.get("reward_accuracy_adapter"), f.get("reward_accuracy_merged")])
    if not rows:
        return ("<h2>Merges</h2><p class='note'>No merges found (put them under RUN/merges/NAME, or pass "
                "--merges DIR).</p>")
    head = ["run", "output", "format", "merged into", "loss (a) base", "loss (b) adapter", "loss (c) merged",
            "KL(b‖c)", "retention", "merge s", "size MiB", "reward acc. (b)", "reward acc. (c)"]
    if all(row[-1] is None for row in rows):  # no preference-trained adapter among them
        head, rows = head[:-2], [row[:-2] for row in rows]
    note = "" if len(head) == 11 else ("<p class='note'>Preference-trained adapters: losses on the chosen answers "
                                       "of held-out pairs; reward accuracy = share of pairs whose chosen answer "
                                       "gets the higher log-ratio to the base (a).</p>")
    return "<h2>Merges</h2>" + note + _table(head, rows, set(range(4, len(head))))


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
    return (f"<figure id='{plot.name}'><img alt='{html.escape(plot.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(plot.title)} ({plot.path.name})</figcaption></figure>")


def render(runs: list[Run], plots: list[Plot], notes: list[str]) -> str:
    names = ", ".join(r.name for r in runs)
    charts = [p for p in plots if p.name != "merges"]
    merge_chart = [p for p in plots if p.name == "merges"]
    body = [f"<h1>Training report: {html.escape(names)}</h1>",
            f"<p class='note'>finetune report, {time.strftime('%Y-%m-%d %H:%M')}</p>",
            *[f"<p class='note'>{html.escape(n)}</p>" for n in notes],
            _runs_section(runs), _recipe_section(runs), "<h2>Training curves</h2>",
            *[_figure(p) for p in charts], _data_section(runs), _merges_section(runs),
            *[_figure(p) for p in merge_chart]]
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>finetune report: {html.escape(names)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")

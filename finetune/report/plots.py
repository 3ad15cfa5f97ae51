"""The report's charts as PNG files (matplotlib, headless): each training metric against step and against
tokens seen, every run overlaid in its own colour, the preference objectives' rewards (DPO, ORPO, KTO runs), and
the merges' fidelity per output format."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only (before pyplot is imported anywhere)
import matplotlib.pyplot as plt  # noqa: E402

from finetune.report.runs import Run  # noqa: E402

DPI = 110
PANEL = (5.4, 3.5)  # inches per panel


@dataclass
class Plot:
    name: str  # file stem
    title: str
    path: Path


@dataclass
class Metric:
    name: str
    key: str
    title: str
    ylabel: str
    log: bool = False


METRICS = [
    Metric("lr", "lr", "Learning rate", "learning rate"),
    Metric("grad_norm", "grad_norm", "Gradient norm (before clipping)", "grad norm"),
    Metric("tokens_per_s", "tokens_per_s", "Throughput", "tokens/s"),
    Metric("peak_mem", "peak_mem_mb", "Peak memory", "MiB"),
]


@dataclass
class Panel:
    """Metrics drawn together, each as a line from the train rows and as dots from the eval rows (`eval_<key>`)."""

    name: str
    title: str
    ylabel: str
    keys: tuple[str, ...]


PREFERENCE = [
    Panel("rewards", "Implicit rewards (beta x log-ratio to the reference): chosen, rejected, margin; eval as dots",
          "reward", ("rewards/chosen", "rewards/rejected", "rewards/margin")),
    Panel("reward_accuracy", "Reward accuracy: share of pairs whose chosen answer out-rewards the rejected one; "
          "eval as dots", "accuracy", ("rewards/accuracy",)),
    Panel("kl", "KTO's KL estimate (the reference point of its rewards); eval as dots", "KL", ("kl",)),
]
_STYLES = ("-", "--", ":")


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): the first point is itself."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** i) if weight > 0 else v)
    return out


def _colors(runs: list[Run]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {r.name: cycle[i % len(cycle)] for i, r in enumerate(runs)}


def _axes(runs: list[Run], title: str):
    """One panel against step, and one against tokens when the runs record tokens."""
    by_tokens = any(r.has_tokens for r in runs)
    n = 2 if by_tokens else 1
    fig, axes = plt.subplots(1, n, figsize=(PANEL[0] * n, PANEL[1]), squeeze=False)
    fig.suptitle(title, fontsize=11)
    axes = list(axes[0])
    axes[0].set_xlabel("step")
    if by_tokens:
        axes[1].set_xlabel("tokens seen")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _xy(run: Run, rows: list[dict], key: str, by: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        x = r["step"] if by == "step" else r.get("tokens", run.tokens_at(r["step"]))
        if isinstance(v, (int, float)) and math.isfinite(v) and x is not None:
            xs.append(x)
            ys.append(v)
    return xs, ys


def _save(fig, out_dir: Path, name: str, title: str) -> Plot:
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Plot(name, title, path)


def loss_plot(runs: list[Run], out_dir: Path, smooth: float) -> Plot:
    title = f"Training loss (faint: raw, solid: smoothed, EMA {smooth:g}); eval loss as dots"
    fig, axes = _axes(runs, title)
    colors = _colors(runs)
    for ax, by in zip(axes, ("step", "tokens")):
        for run in runs:
            c = colors[run.name]
            xs, ys = _xy(run, run.train, "loss", by)
            if xs:
                ax.plot(xs, ys, color=c, alpha=0.3, linewidth=1)
                ax.plot(xs, ema(ys, smooth), color=c, linewidth=2, label=f"{run.name} train")
            ex, ey = _xy(run, run.eval, "eval_loss", by)
            if ex:
                ax.plot(ex, ey, "o--", color=c, markersize=5, linewidth=1, label=f"{run.name} eval")
        ax.set_ylabel("loss")
    axes[0].legend(fontsize=8)
    return _save(fig, out_dir, "loss", title)


def eval_plot(runs: list[Run], out_dir: Path) -> Plot | None:
    if not any(r.eval for r in runs):
        return None
    title = "Eval loss (left axis) and perplexity = exp(loss) (right axis)"
    fig, axes = _axes(runs, title)
    colors = _colors(runs)
    for ax, by in zip(axes, ("step", "tokens")):
        for run in runs:
            xs, ys = _xy(run, run.eval, "eval_loss", by)
            if xs:
                ax.plot(xs, ys, "o-", color=colors[run.name], label=run.name)
        ax.set_ylabel("eval loss")
        ax.secondary_yaxis("right", functions=(_exp, _log)).set_ylabel("perplexity")
    axes[0].legend(fontsize=8)
    return _save(fig, out_dir, "eval", title)


def _exp(v):
    import numpy as np

    return np.exp(np.clip(v, -50, 50))


def _log(p):
    import numpy as np

    return np.log(np.clip(p, 1e-12, None))


def metric_plot(runs: list[Run], metric: Metric, out_dir: Path) -> Plot | None:
    if not any(_xy(r, r.train, metric.key, "step")[0] for r in runs):
        return None
    fig, axes = _axes(runs, metric.title)
    colors = _colors(runs)
    for ax, by in zip(axes, ("step", "tokens")):
        for run in runs:
            xs, ys = _xy(run, run.train, metric.key, by)
            if xs:
                ax.plot(xs, ys, "-", marker="." if len(xs) < 50 else None, color=colors[run.name], label=run.name)
        ax.set_ylabel(metric.ylabel)
    axes[0].legend(fontsize=8)
    return _save(fig, out_dir, metric.name, metric.title)


def panel_plot(runs: list[Run], panel: Panel, out_dir: Path) -> Plot | None:
    keys = [k for key in panel.keys for k in (key, f"eval_{key}")]
    if not any(_xy(r, rows, k, "step")[0] for r in runs for rows in (r.train, r.eval) for k in keys):
        return None
    fig, axes = _axes(runs, panel.title)
    colors = _colors(runs)
    for ax, by in zip(axes, ("step", "tokens")):
        for run in runs:
            for key, style in zip(panel.keys, _STYLES):
                label = f"{run.name} {key.rpartition('/')[2]}" if len(panel.keys) > 1 else run.name
                xs, ys = _xy(run, run.train, key, by)
                if xs:
                    ax.plot(xs, ys, style, color=colors[run.name], marker="." if len(xs) < 50 else None, label=label)
                ex, ey = _xy(run, run.eval, f"eval_{key}", by)
                if ex:
                    ax.plot(ex, ey, "o", linestyle=style, color=colors[run.name], markersize=5, linewidth=1,
                            alpha=0.8, label=None if xs else f"{label} (eval)")
        ax.set_ylabel(panel.ylabel)
    axes[0].legend(fontsize=8)
    return _save(fig, out_dir, panel.name, panel.title)


def merge_plot(runs: list[Run], out_dir: Path) -> Plot | None:
    """Retention and KL(adapter || merged) per merged output, from the merges' fidelity reports."""
    bars = [(f"{run.name}: {m.label}" if len(runs) > 1 else m.label, m.fidelity, run.name)
            for run in runs for m in run.merges if m.fidelity]
    if not bars:
        return None
    title = "Merge fidelity: retention of the fine-tune's gain, and KL(adapter || merged) per token"
    width = max(PANEL[0], 0.9 * len(bars) + 2)
    fig, (ra, ka) = plt.subplots(1, 2, figsize=(2 * width, PANEL[1] + 1))
    fig.suptitle(title, fontsize=11)
    colors = _colors(runs)
    labels = [b[0] for b in bars]
    x = range(len(bars))
    retention = [b[1].get("retention") for b in bars]
    kl = [b[1].get("kl_adapter_merged") for b in bars]
    bar_width = 0.6
    ra.bar(x, [r if r is not None else 0 for r in retention], width=bar_width, color=[colors[b[2]] for b in bars])
    for i, r in enumerate(retention):
        ra.text(i, (r or 0) + 0.01, f"{r:.3f}" if r is not None else "n/a", ha="center", fontsize=8)
    ra.set_ylim(min(0.0, *[r for r in retention if r is not None], 0.0), 1.1)
    ra.set_ylabel("retention (a-c)/(a-b)")
    ka.bar(x, kl, width=bar_width, color=[colors[b[2]] for b in bars])
    for i, k in enumerate(kl):
        ka.text(i, k, f"{k:.2g}", ha="center", va="bottom", fontsize=8)
    if kl and min(kl) > 0 and max(kl) / min(kl) > 50:
        ka.set_yscale("log")
    ka.set_ylabel("KL(b || c), nats/token")
    for ax in (ra, ka):
        ax.set_xlim(-0.5 - max(0, 3 - len(bars)) / 2, len(bars) - 0.5 + max(0, 3 - len(bars)) / 2)  # slim bars
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out_dir, "merges", title)


def render_all(runs: list[Run], out_dir: Path, smooth: float = 0.6) -> list[Plot]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [loss_plot(runs, out_dir, smooth), eval_plot(runs, out_dir)]
    plots += [metric_plot(runs, m, out_dir) for m in METRICS]
    plots += [panel_plot(runs, p, out_dir) for p in PREFERENCE]
    plots.append(merge_plot(runs, out_dir))
    return [p for p in plots if p is not None]

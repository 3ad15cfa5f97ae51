"""The step accounting of a run: tokens, time and losses of optimizer steps, for the log lines and the summary."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Window:
    """The steps since the last log line: their mean loss (and objective metrics) and their throughput."""

    loss: float
    tokens_per_s: float
    metrics: dict[str, float] = field(default_factory=dict)


class StepMeter:
    """Add each optimizer step as it ends; read `window()` at a log line (then `reset_window()`), and the run's
    totals at the end. Time counts the steps only: evaluation, checkpoints and set-up are not training speed."""

    def __init__(self):
        self.tokens = 0  # the run's totals (this process's run: a resumed run counts from where it resumed)
        self.seconds = 0.0
        self.last_loss: float | None = None
        self.reset_window()

    def add(self, tokens: int, seconds: float, loss: float, metrics: dict[str, float] | None = None) -> None:
        """One step: the tokens it trained on (all ranks), its wall time, its loss and metrics (global means)."""
        self.tokens += tokens
        self.seconds += seconds
        self.last_loss = loss
        self._tokens += tokens
        self._seconds += seconds
        self._loss += loss
        self._steps += 1
        for name, value in (metrics or {}).items():
            self._metrics[name] = self._metrics.get(name, 0.0) + value

    def window(self) -> Window:
        """Means over the steps added since the last reset (at least one)."""
        steps = max(self._steps, 1)
        return Window(self._loss / steps, self._tokens / max(self._seconds, 1e-9),
                      {name: total / steps for name, total in self._metrics.items()})

    def reset_window(self) -> None:
        self._tokens, self._seconds, self._loss, self._steps = 0, 0.0, 0.0, 0
        self._metrics: dict[str, float] = {}

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second over all steps of the run."""
        return self.tokens / max(self.seconds, 1e-9)

"""What the data pipeline did to the user's rows, as numbers (`to_dict`) and as one readable paragraph (`summary`).

Every stage that drops, rewrites or cuts something counts it here, so that a user can tell from the run log
whether the data they trained on is the data they meant.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

TRUNCATION_HINT = 0.10  # above this share of examples cut at max_length, the summary says what would keep 95%


@dataclass
class SourceStats:
    """One source file's rows: how many were read, kept, dropped (by reason), and how turns were repaired."""

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    roles_mapped: Counter = field(default_factory=Counter)  # "bing->assistant" -> turns
    unknown_roles: Counter = field(default_factory=Counter)  # raw role -> turns dropped
    turn_fixes: Counter = field(default_factory=Counter)  # "empty turns dropped" etc. -> turns
    notes: list[str] = field(default_factory=list)  # what the reader repaired (e.g. a truncated JSON file)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1


@dataclass
class SplitStats:
    """One split after tokenization (and packing)."""

    examples: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    tokens: int = 0
    label_tokens: int = 0
    sequences: int = 0  # rows the sampler sees: packed rows, or examples when not packing
    # Each example's token length before truncation; estimated from its characters where text far beyond
    # max_length was never tokenized (finetune.data.tokenize). For the truncation hint; not in to_dict.
    lengths: list = field(default_factory=list, repr=False, compare=False)

    @property
    def prompt_share(self) -> float:
        return 1.0 - self.label_tokens / self.tokens if self.tokens else 0.0

    def length_keeping(self, share: float = 0.95) -> int | None:
        """The smallest max_length that would keep `share` of the examples whole."""
        if not self.lengths:
            return None
        ordered = sorted(self.lengths)
        return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@dataclass
class DataReport:
    format: str
    format_reason: str
    rendering: str  # how conversations become text: the tokenizer's template, the plain fallback, or none
    max_length: int
    packing: bool
    train_on_prompt: bool
    eval_from: str = "none"  # "file '...'", "eval_fraction 0.05 of train", or "none"
    sources: dict[str, SourceStats] = field(default_factory=dict)
    splits: dict[str, SplitStats] = field(default_factory=dict)

    def to_dict(self) -> dict:
        def plain(obj):
            if isinstance(obj, Counter):
                return dict(obj.most_common())
            if isinstance(obj, (SourceStats, SplitStats)):
                out = {k: plain(v) for k, v in vars(obj).items() if k != "lengths"}
                if isinstance(obj, SplitStats):
                    out["prompt_token_share"] = round(obj.prompt_share, 4)
                    out["max_length_keeping_95pct"] = obj.length_keeping()
                return out
            if isinstance(obj, dict):
                return {k: plain(v) for k, v in obj.items()}
            return obj

        return {
            "format": self.format, "format_reason": self.format_reason, "rendering": self.rendering,
            "max_length": self.max_length, "packing": self.packing, "train_on_prompt": self.train_on_prompt,
            "eval_from": self.eval_from, "sources": plain(self.sources), "splits": plain(self.splits),
        }

    def summary(self) -> str:
        scope = "every token" if self.format == "text" else \
            "every token (train_on_prompt)" if self.train_on_prompt else "answer tokens only"
        parts = [f"Data format '{self.format}' ({self.format_reason}); {self.rendering}; loss on {scope}."]
        for name, src in self.sources.items():
            parts.append(_source_sentence(name, src))
        for name, split in self.splits.items():
            parts.append(_split_sentence(name, split, self))
        parts.append(f"Eval examples come from {self.eval_from}." if self.eval_from != "none" else "No eval split.")
        return " ".join(parts)


def _counts(counter: Counter, fmt: str = "{n:,} {k}") -> str:
    return ", ".join(fmt.format(k=k, n=n) for k, n in counter.most_common())


def _source_sentence(name: str, src: SourceStats) -> str:
    text = f"{name.capitalize()} source {src.source}: read {src.rows_read:,} rows, kept {src.rows_kept:,}"
    text += f", dropped {sum(src.dropped.values()):,} ({_counts(src.dropped)})" if src.dropped else ", dropped none"
    fixes = []
    if src.roles_mapped:
        fixes.append(f"turns with unusual roles mapped: {_counts(src.roles_mapped, '{k} {n:,}')}")
    if src.unknown_roles:
        fixes.append(f"turns with unknown roles dropped: {_counts(src.unknown_roles, '{k} {n:,}')}")
    if src.turn_fixes:
        fixes.append(_counts(src.turn_fixes))
    text += f"; {'; '.join(fixes)}." if fixes else "."
    if src.notes:
        text += " Note: " + " ".join(src.notes)
    return text


def _split_sentence(name: str, split: SplitStats, report: DataReport) -> str:
    text = (f"{name.capitalize()}: {split.examples:,} examples, {split.truncated:,} truncated at "
            f"{report.max_length:,} tokens")
    if split.dropped:
        text += f", {sum(split.dropped.values()):,} dropped ({_counts(split.dropped)})"
    text += (f"; {split.tokens:,} tokens, {split.label_tokens:,} trained on, "
             f"prompt-token share {split.prompt_share:.1%}")
    if report.packing:
        fill = split.tokens / (split.sequences * report.max_length) if split.sequences else 0.0
        text += f"; packed into {split.sequences:,} sequences ({fill:.0%} full)."
    else:
        text += "; not packed."
    return text + (truncation_hint(name, split, report.max_length) if name == "train" else "")


def truncation_hint(name: str, split: SplitStats, max_length: int) -> str:
    """One sentence when more than TRUNCATION_HINT of a split's examples were cut: the max_length keeping 95%."""
    cut = split.truncated / len(split.lengths) if split.lengths else 0.0  # of all tokenized, kept or not
    keep = split.length_keeping()
    if cut <= TRUNCATION_HINT or keep is None or keep <= max_length:
        return ""
    return (f" Hint: {cut:.0%} of the {name} examples were cut at data.max_length {max_length:,}; "
            f"data.max_length {keep:,} would keep 95% of them whole (each step then costs more).")

"""The data pipeline of `finetune sft`: rows -> common form -> tokens + labels -> (packed) examples -> batches.

    bundle = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)
    log.info(bundle.report.summary())
    for batch in bundle.batches("train", micro_batch_size=4, shuffle=True, seed=seed, epoch=epoch, start=offset):
        model(**batch, use_cache=False)   # see collate.py for the batch contract

One job per module: sources (read files / hub datasets), formats (detect + convert + normalise turns),
tokenize (render, mask, truncate), pack, collate (batches and their order), report (counts and the summary).
Nothing here knows about models, quantization or the training loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from quant.errors import UserError

from .collate import IGNORE, batch_indices, batches, collate, count_label_tokens, num_micro_batches
from .formats import FORMATS, Chat, Plain, convert, detect_format, resolve_format
from .pack import pack
from .report import DataReport, SourceStats, SplitStats
from .sources import Rows, read_rows
from .tokenize import PLAIN_TEMPLATE, encode, make_renderer

__all__ = [
    "DataBundle", "DataReport", "build_datasets", "collate", "batches", "batch_indices", "num_micro_batches",
    "count_label_tokens", "read_rows", "detect_format", "convert", "pack", "IGNORE", "FORMATS", "Chat", "Plain",
    "PLAIN_TEMPLATE", "Rows",
]

# Eval sources that are hub datasets or directories rarely have a "train"-named eval split.
_EVAL_SPLITS = ("validation", "test", "train")


@dataclass
class DataBundle:
    train: list[dict]  # examples (or packed rows): int32 arrays input_ids, labels[, position_ids]
    eval: list[dict] | None
    report: DataReport
    packed: bool
    pad_token_id: int
    max_length: int

    def batches(self, split: str = "train", micro_batch_size: int = 1, *, shuffle: bool, seed: int, epoch: int = 0,
                start: int = 0, rank: int = 0, world_size: int = 1, pad_to: int | None = None) -> Iterator[dict]:
        dataset = self.train if split == "train" else self.eval
        if dataset is None:
            raise ValueError("this bundle has no eval split")
        return batches(dataset, micro_batch_size, pad_token_id=self.pad_token_id, packed=self.packed,
                       shuffle=shuffle, seed=seed, epoch=epoch, start=start, rank=rank, world_size=world_size,
                       pad_to=pad_to)

    def collate(self, examples: list[dict]) -> dict:
        """One micro-batch of `examples` (collate.py's contract) and `num_tokens`, the tokens it holds."""
        batch = collate(examples, self.pad_token_id, packed=self.packed)
        batch["num_tokens"] = sum(len(ex["input_ids"]) for ex in examples)
        return batch


def build_datasets(cfg, tokenizer, seed: int) -> DataBundle:
    """Read, convert, tokenize and pack `cfg.train` (and the eval source) as `cfg` (a recipe DataConfig) says.

    `max_examples` caps the rows read from the train source only. `eval_fraction` takes a seeded random share of
    the converted train items (at least one), before tokenization, so the split does not depend on max_length.
    """
    train_rows = read_rows(cfg.train, cfg.split, cfg.max_examples, what="data.train")
    fmt, reason = resolve_format(cfg.format, train_rows)
    renderer = make_renderer(tokenizer, fmt)
    report = DataReport(format=fmt, format_reason=reason, rendering=renderer.description,
                        max_length=cfg.max_length, packing=cfg.packing, train_on_prompt=cfg.train_on_prompt)

    items = _convert(train_rows, fmt, "train", report)
    eval_items, eval_rows = None, None
    if cfg.eval:
        eval_rows = read_rows(cfg.eval, _EVAL_SPLITS[0], None, what="data.eval", split_fallbacks=_EVAL_SPLITS[1:])
        eval_items = _convert(eval_rows, fmt, "eval", report)
        report.eval_from = f"file {eval_rows.source}"
    elif cfg.eval_fraction:
        items, eval_items = split_items(items, cfg.eval_fraction, seed)
        eval_rows = train_rows
        report.eval_from = (f"a seeded eval_fraction {cfg.eval_fraction:g} of the train rows "
                            f"({len(eval_items)} rows)")

    train = _tokenize(items, train_rows, "train", renderer, cfg, seed, report)
    if not train:
        raise UserError(f"data.train: no usable examples in {train_rows.source} (read "
                        f"{report.sources['train'].rows_read} rows; dropped: {_reasons(report, 'train') or 'none'})")
    evaluation = None
    if eval_items is not None:
        evaluation = _tokenize(eval_items, eval_rows, "eval", renderer, cfg, seed, report)
        if not evaluation:
            raise UserError(f"data.eval: no usable examples from {report.eval_from} "
                            f"(dropped: {_reasons(report, 'eval') or 'none were read'})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataBundle(train, evaluation, report, cfg.packing, pad if pad is not None else 0, cfg.max_length)


def _reasons(report: DataReport, split: str) -> str:
    counts = report.splits[split].dropped.copy()
    if split in report.sources:
        counts += report.sources[split].dropped
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def _convert(rows: Rows, fmt: str, name: str, report: DataReport) -> list:
    stats = report.sources[name] = SourceStats(rows.source, notes=list(rows.notes))
    return convert(rows, fmt, stats)


def _tokenize(items: list, rows: Rows, name: str, renderer, cfg, seed: int, report: DataReport) -> list[dict]:
    stats = report.splits[name] = SplitStats()
    examples = encode(items, renderer, cfg.max_length, cfg.train_on_prompt, stats, rows.where)
    if cfg.packing:
        examples = pack(examples, cfg.max_length, seed)
    stats.sequences = len(examples)
    return examples


def split_items(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split into (train, eval); both keep file order. Eval gets round(n * fraction), at least 1."""
    n = len(items)
    if n < 2:
        raise UserError(f"data.eval_fraction = {fraction:g} needs at least 2 usable train rows, got {n}")
    k = min(n - 1, max(1, round(n * fraction)))
    picked = set(random.Random(f"eval-split/{seed}").sample(range(n), k))
    return [x for i, x in enumerate(items) if i not in picked], [x for i, x in enumerate(items) if i in picked]

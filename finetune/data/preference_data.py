"""The data pipeline of preference training: rows -> PreferenceItems -> token ids -> micro-batches.

    bundle = build_preference_data(recipe.data, tokenizer, seed=recipe.train.seed, paired=True)
    log.info(bundle.report.summary())
    for batch in bundle.batches("train", micro_batch_size=4, shuffle=True, seed=seed, epoch=epoch, start=offset):
        ...  # preference_collate.py: the batch contract

The recipe's data section means what it means for SFT (sources, split, max_examples, eval / eval_fraction,
max_length, packing); `format` and `train_on_prompt` do not apply (the layout is read from the columns, and only
answers are scored). The report is the SFT pipeline's DataReport: rows read, kept and dropped by reason per
source; examples (pairs, or KTO examples), truncations and drops per split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from quant.errors import UserError

from . import _EVAL_SPLITS, split_items
from .collate import batch_indices
from .preference import PreferenceItem, convert_preferences, detect_layout, unpair
from .preference_collate import collate_preferences
from .preference_encode import encode_preferences
from .report import DataReport, SourceStats, SplitStats
from .sources import Rows, read_rows
from .tokenize import make_renderer


@dataclass
class PreferenceBundle:
    train: list[dict]  # examples of preference_encode
    eval: list[dict] | None
    report: DataReport
    paired: bool  # pairs (DPO, ORPO) or KTO examples
    packed: bool
    pad_token_id: int
    max_length: int

    def batches(self, split: str = "train", micro_batch_size: int = 1, *, shuffle: bool, seed: int, epoch: int = 0,
                start: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        """Micro-batches in collate.batch_indices' order (resumable mid-epoch from `start`, sharded by rank)."""
        dataset = self.train if split == "train" else self.eval
        if dataset is None:
            raise ValueError("this bundle has no eval split")
        for indices in batch_indices(len(dataset), micro_batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                     start=start, rank=rank, world_size=world_size):
            yield self.collate([dataset[i] for i in indices])

    def preferred(self, split: str = "train") -> list[tuple]:
        """(prompt ids, answer ids) of every chosen (KTO: desirable) answer of `split`."""
        return [(e["prompt"], e["answers"][0]) for e in (self.train if split == "train" else self.eval)
                if e["desirable"] is not False]

    def collate(self, examples: list[dict]) -> dict:
        """One micro-batch of `examples` (preference_collate.py's contract)."""
        return collate_preferences(examples, self.pad_token_id, self.packed, self.max_length)


def build_preference_data(cfg, tokenizer, seed: int, paired: bool | None = None) -> PreferenceBundle:
    """Read, convert, split and tokenize `cfg.train` (and the eval source) for a paired objective (DPO, ORPO) or
    for KTO (`paired=False`: pairs are split into a desirable and an undesirable example); None: as the file's
    layout is (scoring held-out data)."""
    rows = read_rows(cfg.train, cfg.split, cfg.max_examples, what="data.train")
    layout, chat, reason = detect_layout(rows)
    paired = layout != "unpaired" if paired is None else paired
    renderer = make_renderer(tokenizer, "chat" if chat else "completion")
    # The examples themselves are not packed (report.packing): packing happens per micro-batch, at collation.
    rendering = renderer.description + ("; the sequences of each micro-batch are packed into rows of max_length"
                                        if cfg.packing else "")
    report = DataReport(format=f"preference {layout}", format_reason=reason, rendering=rendering,
                        max_length=cfg.max_length, packing=False, train_on_prompt=False)
    items = _convert(rows, layout, chat, "train", report, paired)
    eval_items, eval_rows = None, rows
    if cfg.eval:
        eval_rows = read_rows(cfg.eval, _EVAL_SPLITS[0], None, what="data.eval", split_fallbacks=_EVAL_SPLITS[1:])
        eval_layout, eval_chat, _ = detect_layout(eval_rows)
        if eval_chat != chat:
            kinds = {True: "chat message lists", False: "strings"}
            raise UserError(f"data.eval: {eval_rows.source} holds {kinds[eval_chat]} but data.train holds "
                            f"{kinds[chat]}; both must render the same way")
        eval_items = _convert(eval_rows, eval_layout, chat, "eval", report, paired)
        report.eval_from = f"file {eval_rows.source}"
    elif cfg.eval_fraction:
        items, eval_items = split_items(items, cfg.eval_fraction, seed)
        report.eval_from = f"a seeded eval_fraction {cfg.eval_fraction:g} of the train rows ({len(eval_items)} rows)"
    if not paired:  # after the split: the two halves of a pair stay on the same side
        items, eval_items = unpair(items), unpair(eval_items) if eval_items is not None else None
    train = _encode(items, rows, "train", renderer, cfg.max_length, report)
    evaluation = _encode(eval_items, eval_rows, "eval", renderer, cfg.max_length, report) \
        if eval_items is not None else None
    if not paired:
        for split in (train, evaluation):
            if split:
                kl_partners(split, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PreferenceBundle(train, evaluation, report, paired, cfg.packing, pad if pad is not None else 0,
                            cfg.max_length)


def kl_partners(examples: list[dict], seed: int) -> None:
    """KTO's mismatched completions, fixed when the data is built (as TRL builds its KL dataset before training,
    and so that `reference: precomputed` can score them once): each example takes the completion of the example
    before it in a seeded permutation, skipping those of the same source row (a pair's other half has the same
    prompt, so it would be no mismatch). Sets `kl_answer` on every example."""
    order = list(range(len(examples)))
    random.Random(f"kto-kl/{seed}").shuffle(order)
    for pos, k in enumerate(order):
        partner = next((order[pos - back] for back in range(1, len(order))
                        if examples[order[pos - back]]["row"] != examples[k]["row"]), order[pos - 1])
        examples[k]["kl_answer"] = examples[partner]["answers"][0]


def _convert(rows: Rows, layout: str, chat: bool, name: str, report: DataReport,
             paired: bool) -> list[PreferenceItem]:
    if paired and layout == "unpaired":
        raise UserError(f"data.{name}: {rows.source} holds unpaired rows (prompt/completion/label, for KTO); DPO "
                        f"and ORPO compare two answers per prompt: 'prompt' + 'chosen' + 'rejected'")
    stats = report.sources[name] = SourceStats(rows.source, notes=list(rows.notes))
    return convert_preferences(rows, layout, chat, stats)


def _encode(items: list[PreferenceItem], rows: Rows, name: str, renderer, max_length: int,
            report: DataReport) -> list[dict]:
    stats = report.splits[name] = SplitStats()
    examples = encode_preferences(items, renderer, max_length, stats, rows.where)
    stats.sequences = len(examples)
    if not examples:
        dropped = stats.dropped + report.sources[name].dropped if name in report.sources else stats.dropped
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.most_common()) or "none"
        raise UserError(f"data.{name}: no usable preference examples in {rows.source} (dropped: {reasons})")
    return examples

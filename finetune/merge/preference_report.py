"""The fidelity report of a preference-trained adapter (DPO, ORPO, KTO): what the SFT report measures, on the
CHOSEN answers of held-out pairs (the answers the adapter learned to prefer: losses of (a) the base, (b) the
adapter, (c) the merged model, KL(b‖c) and retention), plus the reward accuracy of (b) and of (c) on the pairs.

A model's implicit reward of an answer is its log-ratio to the quantized base, log pi(y|x) - log pi_a(y|x) (DPO's
reward up to beta, which changes no comparison); reward accuracy is the share of pairs whose chosen answer gets
the higher reward. (a) is the reference, reward 0 for every answer. Held-out data in KTO's unpaired layout has
no pairs: there the accuracy is the share of desirable answers with a positive reward and undesirable ones with
a negative one.
"""

from __future__ import annotations

import torch

from finetune.data import read_rows
from finetune.data.preference import is_preference
from finetune.data.preference_collate import collate_preferences, sequence_example
from finetune.data.preference_data import build_preference_data
from finetune.recipe import DataConfig
from finetune.train.logprobs import sequence_log_probs
from quant.errors import UserError


def holds_preferences(path: str, split: str) -> bool:
    """Whether the eval data at `path` is preference data (else it is SFT data: scored as SFT's report does)."""
    return is_preference(read_rows(path, split, 1, what="the eval data").columns)


def preference_eval(source, tokenizer, cfg: DataConfig, origin: str) -> tuple[list[dict], str, list[dict]]:
    """(the chosen answers as SFT examples, where they came from, the held-out pairs / KTO examples), rendered as
    training rendered them (unpacked). `cfg`: report.eval_plan's, an eval file, or the run's train file whose
    seeded eval_fraction training held out."""
    bundle = build_preference_data(cfg, tokenizer, source.train.seed if source.train else 42)
    split = "eval" if cfg.eval_fraction else "train"
    chosen = [sequence_example(prompt, answer, k) for k, (prompt, answer) in enumerate(bundle.preferred(split))]
    if not chosen:
        raise UserError(f"{origin}: no chosen or desirable answers to score")
    return chosen, f"{origin}, chosen answers", bundle.eval if cfg.eval_fraction else bundle.train


@torch.no_grad()
def reward_accuracy(model_b, merged: dict, examples: list[dict], pad_id: int, max_length: int, batch_size: int,
                    device, max_batches: int | None = None) -> dict:
    """{'adapter' and each merged label: (reward accuracy, mean reward margin in nats)} and the pairs scored."""
    labels = ["adapter", *merged]
    right = dict.fromkeys(labels, 0.0)
    margin = dict.fromkeys(labels, 0.0)
    scored = 0
    for start in range(0, len(examples), batch_size):
        if max_batches is not None and start // batch_size >= max_batches:
            break
        chunk = examples[start:start + batch_size]
        batch = collate_preferences(chunk, pad_id, False, max_length)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with model_b.disable_adapter():
            base = sequence_log_probs(model_b, batch, None).sums
        models = {"adapter": model_b, **merged}
        for label in labels:
            reward = sequence_log_probs(models[label], batch, None).sums - base
            if "pairs" in batch:
                gap = reward[:len(chunk)] - reward[len(chunk):]
                right[label] += float((gap > 0).sum())
                margin[label] += float(gap.sum())
            else:
                right[label] += float(torch.where(batch["desirable"], reward > 0, reward < 0).sum())
                margin[label] += float(torch.where(batch["desirable"], reward, -reward).sum())
        scored += len(chunk)
    return {"pairs": scored, **{label: (right[label] / scored, margin[label] / scored) for label in labels}}

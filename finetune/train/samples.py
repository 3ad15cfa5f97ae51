"""Greedy generations for a few eval prompts: the before/after picture a user reads first."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    prompt: str
    text: str


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[Sample]:
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    out = []
    for ids in prompts:
        input_ids = torch.tensor([ids], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        text = tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True).strip()
        prompt = _last_user_text(tokenizer.decode(ids, skip_special_tokens=True))
        out.append(Sample(prompt, text))
    if was_training:
        model.train()
    return out


def _last_user_text(rendered: str) -> str:
    # Chat templates render role names as plain lines once special tokens are dropped; show the user's words.
    lines = [line for line in rendered.strip().splitlines() if line.strip() not in ("user", "assistant", "system")]
    return lines[-1] if lines else rendered.strip()


def prompts_from_examples(examples, count: int) -> list[list[int]]:
    """The prompt tokens (everything before the first trained token) of the first `count` examples.

    Works on packed rows too: position ids restart at 0 at every example, which splits a row into examples;
    and on preference examples, which hold their prompt.
    """
    prompts = []
    for ex in examples:
        if "prompt" in ex:
            ids = [int(t) for t in ex["prompt"]]
            if prompts and prompts[-1] == ids:
                continue  # the two halves of a pair as KTO examples
            prompts.append(ids)
            if len(prompts) == count:
                return prompts
            continue
        ids, labels = list(ex["input_ids"]), list(ex["labels"])
        positions = list(ex["position_ids"]) if ex.get("position_ids") is not None else list(range(len(ids)))
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            first = next((i for i in range(a + 1, b) if labels[i] != -100), None)
            if first is not None:
                prompts.append([int(t) for t in ids[a:first]])
            if len(prompts) == count:
                return prompts
    return prompts

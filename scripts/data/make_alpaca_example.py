"""Write data/examples/orders_alpaca.json: the quickstart's order notes as an Alpaca-style JSON array.

    python -m scripts.data.make_alpaca_example

Each row is {"instruction", "input", "output"}: one fixed instruction, the free-text note as the input and the
one-line JSON as the output, the layout of Stanford Alpaca's `alpaca_data.json` that many instruction datasets
copy. recipes/alpaca.yaml trains on it; tests read it. Deterministic: the same quickstart data writes the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "data" / "quickstart" / "train.jsonl"
TARGET = ROOT / "data" / "examples" / "orders_alpaca.json"
INSTRUCTION = ("Extract the order from the note as one line of JSON with the keys item, qty, color, name, city "
               "and due.")


def main() -> None:
    rows = []
    for line in SOURCE.read_text().splitlines():
        turns = json.loads(line)["messages"]
        rows.append({"instruction": INSTRUCTION, "input": turns[0]["content"], "output": turns[1]["content"]})
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    tmp = TARGET.with_name(f".{TARGET.name}.tmp")
    tmp.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(TARGET)
    print(f"wrote {len(rows)} rows to {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

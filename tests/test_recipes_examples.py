"""The example recipes for the data people bring (recipes/sharegpt.yaml, alpaca.yaml, hub_dataset.yaml), each
run as a user runs it on a small slice of its own data, with the tiny model standing in for SmolLM2: the data is
read in the format the recipe says, trained on, and the eval_fraction rows land in the run. The hub dataset id is
served offline from a `datasets` cache the test builds, as a download leaves it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.data.check import EVAL_SPLIT_FILE

REPO = Path(__file__).resolve().parents[1]


def _small(tiny_model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--set", f"base.model={tiny_model_dir}", "--set", "train.max_steps=1", "--set", f"output.dir={out}",
            "--set", "train.micro_batch_size=1", "--set", "train.gradient_accumulation=1", "--set", "lora.r=4",
            "--set", "train.eval_max_batches=1", "--set", "train.warmup_steps=0", *extra]


def _trained(out: Path, fmt: str, rows_read: int, fraction: float) -> dict:
    report = json.loads((out / "data_report.json").read_text())
    assert report["format"] == fmt and report["sources"]["train"]["rows_read"] == rows_read, report
    assert (out / "adapter" / "adapter_config.json").exists()
    held_out = (out / EVAL_SPLIT_FILE).read_text().splitlines()
    assert len(held_out) == max(1, round(report["sources"]["train"]["rows_kept"] * fraction))  # the split's rows
    return report


def test_sharegpt_recipe_reads_the_real_dump_from_its_package(tmp_path, tiny_model_dir):
    out = tmp_path / "sharegpt"
    assert main(["sft", str(REPO / "recipes" / "sharegpt.yaml"), "-q",
                 *_small(tiny_model_dir, out, "--set", "data.max_examples=40", "--set", "data.max_length=1024",
                         "--set", "data.eval_fraction=0.1")]) == 0
    report = _trained(out, "sharegpt", 40, 0.1)
    assert report["sources"]["train"]["notes"] == []  # 40 complete items: the truncated end is never reached
    held_out = [json.loads(line) for line in (out / EVAL_SPLIT_FILE).read_text().splitlines()]
    assert all("conversations" in row for row in held_out)  # the rows as the dump has them


def test_alpaca_recipe_trains_on_its_json_array(tmp_path, tiny_model_dir):
    out = tmp_path / "alpaca"
    assert main(["sft", str(REPO / "recipes" / "alpaca.yaml"), "-q",
                 *_small(tiny_model_dir, out, "--set", "data.max_examples=30", "--set", "data.max_length=256")]) == 0
    _trained(out, "alpaca", 30, 0.1)
    rows = json.loads((REPO / "data" / "examples" / "orders_alpaca.json").read_text())
    held_out = [json.loads(line) for line in (out / EVAL_SPLIT_FILE).read_text().splitlines()]
    assert len(held_out) == 3 and all(row in rows[:30] for row in held_out)


def _hub_cache(cache: Path, repo_id: str, rows: list[dict], work: Path) -> None:
    """What `datasets.load_dataset(repo_id)` leaves in HF_DATASETS_CACHE after a download: the prepared arrow
    files under <namespace>___<name>/default/<version>/<hash>/, read back offline by datasets' cache builder."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    source = work / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = Json(cache_dir=str(work / "build"), dataset_name=name, data_files={"train": str(source)})
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    target = cache / f"{namespace}___{name}" / "default" / built.parent.name / built.name
    target.parent.mkdir(parents=True)
    shutil.copytree(built, target)
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default"}))


def test_hub_dataset_recipe_reads_a_hub_id_from_the_local_datasets_cache(tmp_path, tiny_model_dir):
    rows = json.loads((REPO / "data" / "examples" / "orders_alpaca.json").read_text())[:40]
    cache = tmp_path / "hf-datasets"
    _hub_cache(cache, "yahma/alpaca-cleaned", rows, tmp_path)
    out = tmp_path / "hub"
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "finetune", "sft", str(REPO / "recipes" / "hub_dataset.yaml"), "-q",
                           *_small(tiny_model_dir, out, "--set", "data.max_examples=40", "--set", "data.max_length=256",
                                   "--set", "data.eval_fraction=0.1")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _trained(out, "alpaca", 40, 0.1)
    assert report["sources"]["train"]["source"] == "yahma/alpaca-cleaned[train]"
    held_out = [json.loads(line) for line in (out / EVAL_SPLIT_FILE).read_text().splitlines()]
    assert len(held_out) == 4 and all(row in rows for row in held_out)


@pytest.mark.parametrize("name", ["quickstart", "quickstart_gptq", "sharegpt", "alpaca", "hub_dataset"])
def test_every_recipe_loads(name):
    from finetune.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.data.train and recipe.output.dir.startswith("runs/")

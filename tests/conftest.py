"""Shared fixtures: a byte-level ChatML tokenizer and tiny random Llama models, built offline from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import chat_rows, make_tiny_model, make_tokenizer, write_jsonl

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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

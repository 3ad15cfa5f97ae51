"""Fixtures for the merge tests: tiny adapters really trained by `finetune sft` on an NF4 and a GPTQ base.

Training (8 steps on the tiny random Llama of tests/conftest.py) takes seconds; each run is shared by the
session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.recipe import recipe_from_dict
from finetune.train.loop import train
from support import gptq_base, tiny_recipe


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core box: OpenMP hand-offs between 2 threads made them ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(out: Path, model_dir: Path, chat_files, quantization: str) -> Path:
    recipe = tiny_recipe(model_dir, *chat_files, out, base={"quantization": quantization},
                         train={"gradient_checkpointing": False, "log_every": 100})
    train(recipe_from_dict(recipe), echo=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def nf4_run(tmp_path_factory, tiny_model_dir, chat_files) -> Path:
    return _train(tmp_path_factory.mktemp("merge") / "nf4-run", tiny_model_dir, chat_files, "nf4")


@pytest.fixture(scope="session")
def gptq_base_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny model quantized by our GPTQ with act-order (non-monotone g_idx), 4-bit g32."""
    return gptq_base(tmp_path_factory.mktemp("tiny-gptq"), tokenizer)


@pytest.fixture(scope="session")
def gptq_run(tmp_path_factory, gptq_base_dir, chat_files) -> Path:
    return _train(tmp_path_factory.mktemp("merge") / "gptq-run", gptq_base_dir, chat_files, "gptq")

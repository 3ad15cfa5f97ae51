"""What `finetune sft` prints: progress and results, no warning a user cannot act on.

Run as a user runs it (a subprocess, the CLI), with bitsandbytes' import and layers both taking their
AVX512-BF16 branches (tests/avx512bf16/sitecustomize.py): that is where bitsandbytes warns about a hub kernel
at import, and where, with the old packed path, PyTorch warned that the backward "may lead to silently
incorrect behavior".
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
_WARNING = re.compile(r"warn|deprecat|kernels-community|silently incorrect", re.IGNORECASE)


def test_sft_console_is_quiet(tmp_path, tiny_model_dir, chat_files):
    recipe = tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "run", train={"max_steps": 2},
                         samples={"count": 1, "max_new_tokens": 4})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "QLORA_TEST_BNB_IMPORT_AS_AVX512BF16": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "finetune", "sft", str(path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "eval before training" in output and "done: 2 steps" in output
    noisy = [line for line in output.splitlines() if _WARNING.search(line)]
    assert not noisy, noisy


def _env() -> dict:
    return {**os.environ, "QLORA_TEST_BNB_IMPORT_AS_AVX512BF16": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


def test_imports_are_silent():
    """Importing any of our entry points prints nothing, whichever libraries they pull in and in what order."""
    code = ("import finetune.cli, finetune.merge, finetune.chat, finetune.inference, finetune.evaluate, "
            "finetune.report, finetune.train.loop, quant.cli, quant.formats.registry")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr[-3000:]


@pytest.mark.slow
def test_quickstart_console_has_no_library_lines(tmp_path):
    """The README's quickstart command on the real SmolLM2 GGUF (one short step of it, with its eval, a sample and
    the adapter save): our lines only, no library warnings, no per-tensor loading bars."""
    small = ["train.max_steps=1", "train.warmup_steps=0", "train.gradient_accumulation=1", "train.eval_max_batches=1",
             "samples.count=1", "samples.max_new_tokens=2", f"output.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "finetune", "sft", str(REPO / "recipes" / "quickstart.yaml"),
                           *(arg for key in small for arg in ("--set", key))],
                          env={**_env(), "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "data: first rows checked" in output and "done: 1 steps" in output
    lines = [line for chunk in output.splitlines() for line in chunk.split("\r") if line.strip()]
    noisy = [line for line in lines if _WARNING.search(line) or line.startswith("Loading weights")]
    assert not noisy, noisy

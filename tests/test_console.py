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

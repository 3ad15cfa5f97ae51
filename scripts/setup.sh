#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the CPU torch wheel first (a plain `torch`
# requirement would pull a multi-GB CUDA build), then this package with its test/asset extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.4"
.venv/bin/python -m pip install -q -e ".[test]"
echo "setup: $(.venv/bin/python -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)')"

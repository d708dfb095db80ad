#!/usr/bin/env bash
# Every GPU check in one run (<= 8 min on one GPU): see benchmarks/gpu_suite.py.
# Without a GPU each step reports "skipped: no GPU". Extra arguments go to the driver.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" -m benchmarks.gpu_suite "$@"

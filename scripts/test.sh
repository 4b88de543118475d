#!/usr/bin/env bash
# README command 2: set up (idempotent) and run the test suite; this is what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check hssl_cli tests benchmarks scripts
.venv/bin/python -m pytest -q "$@"

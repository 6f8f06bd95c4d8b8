#!/usr/bin/env bash
# The test suite: install everything, lint, run the tests (CPU; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh dev
bash scripts/fashion-mnist.sh >/dev/null || echo "Fashion-MNIST unavailable: its tests will skip" >&2
.venv/bin/hadolint docker/Dockerfile
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/ruff format --check src tests benchmarks examples
# one pytest-xdist worker a core (each worker's torch then runs a thread a core: conftest.py); worksteal hands a
# finished worker the queued tests of a busy one, so the long DDP tests do not end the run on one worker
.venv/bin/python -m pytest -q -rs -n auto --dist worksteal "$@"

#!/usr/bin/env bash
# Batch mode: any freezetune sub-command (train, eval, predict, inspect, export).
# Notebook mode: `jupyter` starts JupyterLab on port 8888.
set -euo pipefail
if [ "${1:-}" = "jupyter" ]; then
  shift
  exec jupyter lab --ip=0.0.0.0 --port=8888 --no-browser --allow-root --ServerApp.root_dir=/work "$@"
fi
exec freezetune "$@"

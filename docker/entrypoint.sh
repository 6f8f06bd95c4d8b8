#!/usr/bin/env bash
# Batch mode: any freezetune sub-command (train, eval, predict, inspect, export).
# Notebook mode: `jupyter` starts JupyterLab on port 8888, always behind a token: $JUPYTER_TOKEN, or a generated one
# printed here (a notebook server without one runs code for anyone who reaches the port).
# Shell tools: `bash`, `tmux`, `nvidia-smi`, `python` run as given.
set -euo pipefail
case "${1:-}" in
  jupyter)
    shift
    if [ -z "${JUPYTER_TOKEN:-}" ]; then
      JUPYTER_TOKEN="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
      echo "JupyterLab token (set JUPYTER_TOKEN to choose your own): ${JUPYTER_TOKEN}"
      echo "open http://127.0.0.1:8888/lab?token=${JUPYTER_TOKEN}"
    fi
    export JUPYTER_TOKEN
    exec jupyter lab --ip=0.0.0.0 --port=8888 --no-browser --ServerApp.root_dir=/work \
      --IdentityProvider.token="${JUPYTER_TOKEN}" "$@"
    ;;
  bash | sh | tmux | nvidia-smi | python | watch)
    exec "$@"
    ;;
esac
exec freezetune "$@"

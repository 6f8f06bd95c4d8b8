#!/usr/bin/env bash
# Batch mode: a freezetune sub-command (train, sweep, eval, predict, inspect, export) or its options.
# Notebook mode: `jupyter` (or `jupyter lab`) starts JupyterLab on $JUPYTER_PORT (8888), always behind a token:
# $JUPYTER_TOKEN, or a generated one printed here (a notebook server without one runs code for anyone who reaches the
# port). Options after it go to JupyterLab; a --port or --ip of yours replaces the default.
# Any other program in the image runs as given: torchrun, tensorboard, bash, tmux, python, pip, nvidia-smi, watch...
set -euo pipefail

# `--user "$(id -u):$(id -g)"` with a uid the image does not know leaves HOME=/, where nothing can be written:
# JupyterLab, matplotlib, Hugging Face and pip keep their files under HOME
if [ ! -w "${HOME:-/}" ]; then
  export HOME="${TMPDIR:-/tmp}/home"
  mkdir -p "$HOME"
fi

case "${1:-}" in
  jupyter)
    shift
    if [ "${1:-}" = lab ]; then
      shift
    fi
    port="${JUPYTER_PORT:-8888}"
    own_port="" own_ip="" previous=""
    # the user's --port/--ip (`--port=N` or `--port N`, as JupyterLab takes both) replace the defaults; the URL below
    # names the port JupyterLab will listen on (it named 8888 for `--port 9999`)
    for arg in "$@"; do
      case "$previous" in --port | --ServerApp.port) port="$arg" ;; esac
      case "$arg" in
        --port=* | --ServerApp.port=*) own_port=1 port="${arg#*=}" ;;
        --port | --ServerApp.port) own_port=1 ;;
        --ip | --ip=* | --ServerApp.ip | --ServerApp.ip=*) own_ip=1 ;;
      esac
      previous="$arg"
    done
    defaults=()
    if [ -z "$own_port" ]; then
      defaults+=("--port=${port}")
    fi
    if [ -z "$own_ip" ]; then
      defaults+=("--ip=0.0.0.0")
    fi
    if [ -z "${JUPYTER_TOKEN:-}" ]; then
      JUPYTER_TOKEN="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
      echo "JupyterLab token (set JUPYTER_TOKEN to choose your own): ${JUPYTER_TOKEN}"
      echo "open http://127.0.0.1:${port}/lab?token=${JUPYTER_TOKEN}"
    fi
    export JUPYTER_TOKEN
    exec jupyter lab "${defaults[@]}" --no-browser --ServerApp.root_dir=/work \
      --IdentityProvider.token="${JUPYTER_TOKEN}" "$@"
    ;;
  "" | -* | train | sweep | eval | predict | inspect | export)
    exec freezetune "$@"
    ;;
esac
if type -P "$1" > /dev/null; then  # a program of the image (not a shell builtin such as export)
  exec "$@"
fi
exec freezetune "$@"  # names the sub-commands it has

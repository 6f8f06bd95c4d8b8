#!/usr/bin/env bash
# The one-GPU benchmark run, sized for about 6 minutes on one H100/H200: the CUDA tests, coldstart.py (what a fresh
# process pays for each new shape's first calls), throughput.py (frozen training vs inference, cached head-only run
# vs one inference pass), memory.py (frozen training peak vs inference peak, inspect's estimate vs the measured
# peaks), loader.py (JPEG folder: GPU path vs CPU loader), then transfer.py at 224 px, 10 epochs, 100 images per
# class; then one summary. Each step runs under its own time limit and a failed step does not stop the others (its
# status is in the summary).
#
#   bash scripts/bench-env.sh && bash benchmarks/gpu.sh     # a CUDA machine of your own (.venv-bench: the peers)
#   bash scripts/device-bundle.sh                           # here, for the lent GPU machine: data + weights into
#   device run: bash benchmarks/gpu.sh, carry [".device"]   #   .device/, which that machine lacks
#
# Python: $PYTHON, else .venv-bench, else .venv, else python3 (the lent machine's, with torch, timm, lightning);
# freezetune comes from src/ when it is not installed. Results: one text file per step in $BENCH_OUT (default $OUT
# when set, else a new temp dir). TRANSFER_ONLY=a,b,... picks transfer contenders.
#
# Issue D's GPU line (transfer at 10, 100 and 1000 images per class) does not fit beside the rest in one device call.
# The default transfer step is its 100-a-class run (D's contenders, seed 0); a second call, at once while the machine
# is still warm (30 s), runs the other two sizes, each under its own limit (STEPS picks steps, TRANSFER_* size them):
#   STEPS=transfer TRANSFER_PER_CLASS="10 1000" bash benchmarks/gpu.sh
# Both fit a 15-minute device budget only just; more seeds (TRANSFER_SEEDS=1,2) need a later session.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 # the Lite0 ImageNet weights are packaged: never wait on a hub

py="${PYTHON:-}"
for candidate in .venv-bench/bin/python .venv/bin/python python3; do
  [ -n "$py" ] && break
  command -v "$candidate" >/dev/null 2>&1 && py=$candidate
done
if [ -d .device/site ]; then export PYTHONPATH="$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH}"; fi
if ! "$py" -c 'import freezetune' 2>/dev/null; then export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; fi
if [ -d .device/fashion-mnist ]; then export FREEZETUNE_FASHION_MNIST="$PWD/.device/fashion-mnist"; fi
# Every step passes --device cuda: fail here and now rather than after minutes of set-up.
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu.sh: $py sees no CUDA device; for CPU numbers see benchmarks/README.md" >&2
  exit 2
fi

out="${BENCH_OUT:-${OUT:-$(mktemp -d -t freezetune-bench-XXXXXX)}}"
mkdir -p "$out"
: >"$out/steps.txt"
start=$SECONDS

step() { # step NAME LIMIT_S COMMAND...: run with a time limit, keep the output in $out/NAME.txt
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s) =="
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  rc=${PIPESTATUS[0]}
  echo "$name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (time limit)')" | tee -a "$out/steps.txt"
}

steps=" ${STEPS:-tests coldstart throughput memory loader transfer} "
wanted() { [[ "$steps" == *" $1 "* ]]; }

step env 30 "$py" -c 'import sys, torch, torchvision, timm; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__, "|", torch.cuda.get_device_name(0), "|", torch.get_num_threads(), "threads")'
wanted tests && step tests 90 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/device/test_cuda.py tests/data/test_gpu.py
wanted coldstart && step coldstart 100 "$py" benchmarks/coldstart.py --device cuda
wanted throughput && step throughput 100 "$py" benchmarks/throughput.py --device cuda
wanted memory && step memory 45 "$py" benchmarks/memory.py --device cuda
wanted loader && step loader 50 "$py" benchmarks/loader.py --device cuda
transfers=()
if wanted transfer; then
  for k in ${TRANSFER_PER_CLASS:-100}; do
    name=transfer$([ "$k" = 100 ] || echo "-$k") # transfer.txt for the usual 100 a class
    transfers+=("$name")
    # the full fine-tune and the default command first: a step cut by its limit keeps the comparison D asks for;
    # 1000 a class is ten times the images of 100
    step "$name" "${TRANSFER_LIMIT:-$([ "$k" -ge 1000 ] && echo 420 || echo 150)}" "$py" benchmarks/transfer.py \
      --device cuda --res 224 --epochs 10 --per-class "$k" --seeds "${TRANSFER_SEEDS:-0}" \
      --only "${TRANSFER_ONLY:-full,ft-default,lightning,fastai,seed}"
  done
fi

echo
echo "================================ summary ($((SECONDS - start)) s, files in $out) ================================"
cat "$out/env.txt" "$out/steps.txt"
[ -f "$out/tests.txt" ] && tail -n 3 "$out/tests.txt"
for name in coldstart throughput memory loader "${transfers[@]}"; do
  [ -f "$out/$name.txt" ] || continue
  echo
  if grep -q "^${name%%-*}" "$out/$name.txt"; then
    sed -n "/^${name%%-*}/,\$p" "$out/$name.txt" # each benchmark's table starts with a line naming it
  else # cut before its table: the rows it printed as it went (each model's, each contender's)
    tail -n 30 "$out/$name.txt"
  fi
done

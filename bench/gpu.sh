#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the `device` tool runs it from the repository root; its image has torch
# with CUDA, transformers and peft, not diffusers). Before calling it, download the wheels it lacks into .whl/ here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers importlib_metadata peft==0.21.2
# then run `bash bench/gpu.sh [quick|full|compile]` with carry [".whl"] and a timeout of about 540 s; everything it
# writes lands in $OUT: the GPU tests' log, each benchmark's log, and their RESULTS.md sections (each with the
# routes table: what the unfused forward adds per route, layer by layer, to tune the route rule on this GPU).
#   quick:   the GPU tests and the 512 px benchmark (about 4 minutes on an H200)
#   full:    quick, the training-step benchmark (bench/train.py) and the 1024 px benchmark (about 7 minutes)
#   compile: the GPU tests and the 512 px benchmark with the UNet compiled (CUDA graphs)
set -u
what=${1:-quick}
out=${OUT:-/tmp/lora-kit-gpu}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$out/gpu.txt" 2>&1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$out/test_gpu.log" 2>&1
echo "test_gpu: rc $?" >> "$out/summary.txt"
run() {  # name, timeout, benchmark script, its arguments...
  local name=$1 limit=$2 script=$3
  shift 3
  timeout "$limit" python3 "bench/$script" "$@" --results "$out/RESULTS.md" > "$out/$name.log" 2>&1
  echo "$name: rc $?" >> "$out/summary.txt"
}
case "$what" in
  quick) run bench64 240 inference.py --steps 10 --rounds 3 ;;
  full) run bench64 240 inference.py --steps 10 --rounds 3 && run train64 60 train.py --steps 10 &&
    run bench128 180 inference.py --steps 6 --rounds 2 --latent 128 ;;
  compile) run compiled64 330 inference.py --compile reduce-overhead --steps 10 --rounds 1 ;;
  *) echo "usage: bash bench/gpu.sh [quick|full|compile]" >&2; exit 2 ;;
esac
cat "$out/summary.txt"

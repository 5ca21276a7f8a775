#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the `device` tool runs it from the repository root; its image has torch
# with CUDA, transformers and peft, not diffusers or torchao). Before calling it, download the wheels it lacks into
# .whl/ here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers importlib_metadata peft==0.21.2 torchao
# then run `bash bench/gpu.sh [quick|full|compile]` with carry [".whl"] and a timeout of about 540 s; everything it
# writes lands in $OUT: the GPU tests' log, each benchmark's log, and their RESULTS.md sections (each with the
# routes table: what the unfused forward adds per route, layer by layer, to tune the route rule on this GPU).
#   quick:   the GPU tests and the 512 px benchmark (about 4 minutes on an H200)
#   full:    every GPU row of issue 27 in one call, each within what is left of $BUDGET seconds (530), in this order:
#            the training step at SD1.5 512 px batch 4 (bench/train.py: frozen floor, lora_kit, diffusers+peft,
#            int8 base, offloaded), whole lora-train runs against the diffusers example (bench/e2e.py), SDXL 1024 px
#            batch 1 peak memory, the FLUX.1-sized transformer at 1024 px with an int8 base and 32 blocks offloaded
#            (bench/memory.py), the compiled training step (a run and section of its own: a compile that runs out of
#            time loses only that row), then the inference rows at 512 and 1024 px (bench/inference.py).
#            No GPU tests (run quick for them).
#   compile: the GPU tests and the 512 px benchmark with the UNet compiled (CUDA graphs)
# `bash bench/gpu.sh full cpu` tries the same sequence on a CPU: the GPU checks skipped (nvidia-smi, tests/test_gpu.py),
# every benchmark in its --quick form on tiny models (minutes), $OUT (default /tmp/lora-kit-gpu) holding the same files.
set -u
what=${1:-quick}
cpu=$([ "${2:-}" = cpu ] && echo 1 || echo 0)
out=${OUT:-/tmp/lora-kit-gpu}
budget=${BUDGET:-530}
mkdir -p "$out"
: > "$out/summary.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python=$(command -v python3)
[ -x .venv/bin/python ] && [ "$cpu" = 1 ] && python=.venv/bin/python
if [ "$cpu" = 0 ]; then
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$out/gpu.txt" 2>&1
fi
run() {  # name, timeout, benchmark script, its arguments... (the timeout cut to what is left of the budget)
  local name=$1 limit=$2 script=$3 left=$((budget - SECONDS))
  shift 3
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "$name: skipped (the budget of $budget s is spent)" >> "$out/summary.txt"
    return 0
  fi
  timeout "$limit" "$python" "bench/$script" "$@" --results "$out/RESULTS.md" > "$out/$name.log" 2>&1
  echo "$name: rc $? ($((SECONDS))s of $budget)" >> "$out/summary.txt"
}
tests() {
  if [ "$cpu" = 1 ]; then
    echo "test_gpu: skipped (cpu)" >> "$out/summary.txt"
    return 0
  fi
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$out/test_gpu.log" 2>&1
  echo "test_gpu: rc $?" >> "$out/summary.txt"
}
# the GPU sizes, or (cpu) the tiny models of each benchmark's --quick form
if [ "$cpu" = 1 ]; then
  q=(--quick) train=(--quick --steps 2 --compile-backend aot_eager) e2e=(--quick --steps 2 --batch 1 --images 2)
  flux=(--quick --quantize int8 --offload-blocks 1 --steps 1) sdxl=(--quick --steps 1) infer=(--quick --steps 2 --rounds 1)
else
  q=() train=(--steps 8) e2e=(--pairs 1 --steps 150) flux=(--quantize int8 --offload-blocks 32 --steps 3)
  sdxl=(--steps 3) infer=(--steps 6 --rounds 2)
fi
case "$what" in
  quick) tests; run bench64 240 inference.py "${q[@]}" --steps 10 --rounds 3 ;;
  full)
    run train64 100 train.py "${train[@]}" --rows floor,lora_kit,diffusers+peft,int8,offload
    run e2e 150 e2e.py "${e2e[@]}"
    run sdxl1024 60 memory.py --arch sdxl "${sdxl[@]}"
    run flux1024 120 memory.py --arch flux "${flux[@]}"
    run train64c 150 train.py "${train[@]}" --rows lora_kit,diffusers+peft,compile --tag compiled
    run bench64 90 inference.py "${infer[@]}"
    [ "$cpu" = 1 ] || run bench128 90 inference.py --steps 4 --rounds 1 --latent 128 ;;
  compile) tests; run compiled64 330 inference.py "${q[@]}" --compile reduce-overhead --steps 10 --rounds 1 ;;
  *) echo "usage: bash bench/gpu.sh [quick|full|compile] [cpu]" >&2; exit 2 ;;
esac
cat "$out/summary.txt"

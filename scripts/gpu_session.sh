#!/usr/bin/env bash
# The GPU checks of the data-path issue, prepared for a session lent a GPU machine (15 minutes
# of device time, 10 per command; nothing but the repo and carried paths travel there).
#
# Here, once:     bash scripts/gpu_session.sh prepare     (CIFAR-10 subset -> gpu_carry/, git-ignored)
# On the device:  run(command="bash scripts/gpu_session.sh tests cifar cifar_wdecode",
#                     carry=["gpu_carry"], timeout_s=590)
#                 run(command="bash scripts/gpu_session.sh bench simclr_r50 dino_vits16 mae_vitb16 cifar_compile",
#                     carry=["gpu_carry"], timeout_s=590)
#
#   prepare [PER_CLASS]  copy the first PER_CLASS (1000) images of each CIFAR-10 train class
#   tests [BENCH ...]    environment, the GPU-marked tests (DeepSpeed's left out: not installed
#                        there), then the named benches of scripts/bench_gpu.sh
#   bench BENCH ...      the named benches only
# Results land in $OUT (the device tool's folder; ./gpu_out here): env.txt, pytest.log,
# bench.log, bench.jsonl (one JSON report per bench).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
CARRY=gpu_carry/data
PY=${PY:-python3}

prepare() {
  local per_class=${1:-1000} src=${SSLPIPE_DATA:-../shared/data}/cifar10/train
  rm -rf "$CARRY" && mkdir -p "$CARRY/cifar10/train"
  for class_dir in "$src"/*/; do
    local name; name=$(basename "$class_dir")
    mkdir -p "$CARRY/cifar10/train/$name"
    find "$class_dir" -maxdepth 1 -type f | sort | head -n "$per_class" |
      xargs cp -t "$CARRY/cifar10/train/$name"
  done
  du -sh --apparent-size gpu_carry
}

environment() {
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
    "$PY" -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)"
  } >"$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
}

tests() {
  SSLPIPE_DATA=$PWD/$CARRY PYTHONUNBUFFERED=1 timeout 330 "$PY" -m pytest -q -m gpu \
    -k "not deepspeed" --durations=10 -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
}

bench() {
  [ $# -gt 0 ] || return 0
  PYTHONUNBUFFERED=1 bash scripts/bench_gpu.sh "$CARRY/cifar10/train" /tmp/bench-work "$OUT" "$@"
}

case ${1:-} in
  prepare) shift; prepare "$@" ;;
  tests) shift; environment; tests; bench "$@" ;;
  bench) shift; environment; bench "$@" ;;
  *) echo "usage: bash scripts/gpu_session.sh prepare [PER_CLASS] | tests [BENCH ...] | bench BENCH ..." >&2
     exit 2 ;;
esac

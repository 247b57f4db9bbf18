#!/usr/bin/env bash
# The issue-7 benchmark table on one GPU machine, each bench with synthetic input, the CPU
# pipeline (workers) and the device pipeline, from shards:
#
#   bash scripts/bench_gpu.sh CIFAR_TRAIN_FOLDER WORK_DIR OUT_DIR [NAME ...]
#
# NAMEs, run in the order given (default: all, in this order):
#   cifar          SimCLR ResNet-18 (CIFAR stem), CIFAR-10, batch 512, bf16
#   cifar_wdecode  the same with data.decode=workers (workers decode, the GPU augments)
#   cifar_compile  the same with engine.compile=true (synthetic and device only)
#   simclr_r50     SimCLR ResNet-50 2x224, ImageNet-sized JPEGs, batch 256
#   dino_vits16    DINO ViT-S/16 2x224 + 10x96, batch 256
#   mae_vitb16     MAE ViT-B/16, batch 256
#
# CIFAR_TRAIN_FOLDER: a labelled image folder (../shared/data/cifar10/train, or the subset
# scripts/gpu_session.sh carries). The ImageNet-sized input is made from it (upscaled to 500x375,
# quality-90 JPEGs: scripts/make_bench_images.py) on first use. Shards go to WORK_DIR; each
# bench appends its JSON report as one line to OUT_DIR/bench.jsonl and its output to
# OUT_DIR/bench.log, so what finished survives a run cut short. Environment: PY (python3),
# WORKERS (loader workers, 15), and for a smoke test on the CPU, STEPS and WARMUP (timed, and
# warm-up = split steps of every bench) and EXTRA (overrides appended to every bench, e.g. "run.global_batch_size=4").
set -euo pipefail
SRC=$1; WORK=$2; OUT=$3; shift 3
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(cifar cifar_wdecode cifar_compile simclr_r50 dino_vits16 mae_vitb16)
PY=${PY:-python3}; WORKERS=${WORKERS:-15}
mkdir -p "$WORK" "$OUT"

cifar_shards() {
  [ -f "$WORK/cifar/manifest.json" ] ||
    "$PY" -m data_prep write "$SRC" "$WORK/cifar" --workers "$WORKERS" --shard-size 2000 >&2
  echo "$WORK/cifar"
}
in1k_shards() {
  if [ ! -f "$WORK/in1k-like/manifest.json" ]; then
    "$PY" scripts/make_bench_images.py "$SRC" "$WORK/in1k-like-images" --per-class 300 \
      --workers "$WORKERS" >&2
    "$PY" -m data_prep write "$WORK/in1k-like-images" "$WORK/in1k-like" --workers "$WORKERS" \
      --shard-size 500 >&2
  fi
  echo "$WORK/in1k-like"
}
bench() {  # NAME RECIPE DATA BATCH INPUTS STEPS [overrides...]
  local name=$1 recipe=$2 data=$3 batch=$4 inputs=$5 steps=$6; shift 6
  echo "== $name ($(date +%T))" | tee -a "$OUT/bench.log"
  "$PY" -m pretrain.bench "pretrain/recipes/$recipe.yaml" "data.train=$data" \
    "run.global_batch_size=$batch" "data.num_workers=$WORKERS" "$@" ${EXTRA:-} \
    --inputs "$inputs" --steps "${STEPS:-$steps}" --warmup "${WARMUP:-5}" \
    --split-steps "${WARMUP:-5}" --json "$WORK/$name.json" 2>&1 |
    tee -a "$OUT/bench.log"
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); r['name']=sys.argv[2]; \
print(json.dumps(r))" "$WORK/$name.json" "$name" >>"$OUT/bench.jsonl"
}
ALL=synthetic,workers,device
for name in "${NAMES[@]}"; do
  case $name in
    cifar) bench cifar simclr_resnet18_cifar10 "$(cifar_shards)" 512 $ALL 30 ;;
    cifar_wdecode) bench cifar_wdecode simclr_resnet18_cifar10 "$(cifar_shards)" 512 \
      synthetic,device 30 data.decode=workers ;;
    cifar_compile) bench cifar_compile simclr_resnet18_cifar10 "$(cifar_shards)" 512 \
      synthetic,device 30 engine.compile=true ;;
    simclr_r50) bench simclr_r50 simclr_resnet50_in1k "$(in1k_shards)" 256 $ALL 15 ;;
    dino_vits16) bench dino_vits16 dino_vit_small_in1k "$(in1k_shards)" 256 $ALL 15 ;;
    mae_vitb16) bench mae_vitb16 mae_vit_base_in1k "$(in1k_shards)" 256 $ALL 15 ;;
    *) echo "bench_gpu.sh: unknown bench $name" >&2; exit 2 ;;
  esac
done

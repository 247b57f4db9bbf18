#!/usr/bin/env bash
# The issue-7 benchmark table on one GPU machine: SimCLR ResNet-50 2x224, DINO ViT-S/16
# 2x224 + 10x96, MAE ViT-B/16 and SimCLR ResNet-18 on CIFAR-10 (batch 512, bf16), each with
# synthetic input, the CPU pipeline (workers) and the device pipeline, from shards.
#
#   bash scripts/bench_gpu.sh CIFAR_TRAIN_FOLDER OUT_DIR [WORKERS]
#
# CIFAR_TRAIN_FOLDER: a labelled image folder (e.g. ../shared/data/cifar10/train, or a subset
# carried to the device machine). The ImageNet-sized input is made from it (upscaled to 500x375,
# quality-90 JPEGs: scripts/make_bench_images.py). JSON reports and logs land in OUT_DIR.
set -euo pipefail
SRC=$1; OUT=$2; WORKERS=${3:-15}; PY=${PY:-python3}
mkdir -p "$OUT"
if [ ! -f "$OUT/in1k-like/manifest.json" ]; then
  "$PY" scripts/make_bench_images.py "$SRC" "$OUT/in1k-like-images" --per-class 600
  "$PY" -m data_prep write "$OUT/in1k-like-images" "$OUT/in1k-like" --workers "$WORKERS" --shard-size 500
fi
if [ ! -f "$OUT/cifar/manifest.json" ]; then
  "$PY" -m data_prep write "$SRC" "$OUT/cifar" --workers "$WORKERS" --shard-size 2000
fi
bench() {  # NAME RECIPE DATA BATCH [overrides...]
  local name=$1 recipe=$2 data=$3 batch=$4; shift 4
  "$PY" -m pretrain.bench "pretrain/recipes/$recipe.yaml" "data.train=$data" \
    "run.global_batch_size=$batch" "data.num_workers=$WORKERS" "$@" \
    --inputs synthetic,workers,device --steps 30 --warmup 10 --split-steps 10 --json "$OUT/$name.json" \
    2>&1 | tee "$OUT/$name.log"
}
bench simclr_r50 simclr_resnet50_in1k "$OUT/in1k-like" 256
bench dino_vits16 dino_vit_small_in1k "$OUT/in1k-like" 256
bench mae_vitb16 mae_vit_base_in1k "$OUT/in1k-like" 256
bench cifar_simclr_r18 simclr_resnet18_cifar10 "$OUT/cifar" 512
bench cifar_simclr_r18_compile simclr_resnet18_cifar10 "$OUT/cifar" 512 engine.compile=true
# CIFAR's 32x32 JPEGs decoded in the workers (data.decode=workers), augmented on the GPU
bench cifar_simclr_r18_wdecode simclr_resnet18_cifar10 "$OUT/cifar" 512 data.decode=workers
bench cifar_simclr_r18_wdecode_compile simclr_resnet18_cifar10 "$OUT/cifar" 512 \
  data.decode=workers engine.compile=true

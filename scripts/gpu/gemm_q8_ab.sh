#!/usr/bin/env bash
# A/B of two builds' Q8_0 prefill GEMM (gemm_q8.cu) on the GPU machine: the GEMM's throughput on
# the model's shapes for both (gemm_gpu gemm_q8_0_throughput), then prefill_ab.sh (the second
# pack's tests, gemm_gpu's bit-equality to the scalar vec_dot among them, and prefill 2K-8K and
# 30K-32K alternating the two). Results in $OUT/r.txt.
#   bash scripts/gpu/gemm_q8_ab.sh BASE_PACK NEW_PACK     (packs: scripts/gpu/pack.sh)
# Session 29 measured session 28's 32-bit ldmatrix addresses, full-tile path and scales in the
# lanes' read order with it (docs/speed-log.md "Session 29").
set -u
BASE=${1:?usage: gemm_q8_ab.sh BASE_PACK NEW_PACK}
NEW=${2:?usage: gemm_q8_ab.sh BASE_PACK NEW_PACK}
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export OUT=${OUT:-gemm-q8-out}
mkdir -p "$OUT"
for P in "$BASE" "$NEW"; do
    v=$(basename "$P")
    bash "$P/unpack.sh" "/tmp/k-$v" > /dev/null
    echo "== $v" | tee -a "$OUT/r.txt"
    DS4_KERNEL_CACHE=/tmp/k-$v timeout 120 "$P/gemm_gpu" gemm_q8_0_throughput --ignored --nocapture --test-threads 1 2>&1 |
        grep 'gemm_q8_0 ' | tee -a "$OUT/r.txt"
done
bash scripts/gpu/prefill_ab.sh "$BASE" "$NEW"

#!/usr/bin/env bash
# A/B of two builds' Q8_0 prefill GEMM (gemm_q8.cu) on the GPU machine: the second build's
# bits (gemm_gpu: each output bit-equal to the scalar vec_dot; forward_fixtures), the GEMM's
# throughput on the model's shapes for both (gemm_q8_0_throughput), then prefill 2K-8K
# alternating the two, three rounds (mean t/s of the four rows). Results in $OUT/r.txt.
#   bash scripts/gpu/gemm_q8_ab.sh BASE_PACK NEW_PACK     (packs: scripts/gpu/pack.sh)
# Session 29 measured session 28's 32-bit ldmatrix addresses, full-tile path and scales in the
# lanes' read order with it (BENCHMARKS.md "Session 29").
set -u
BASE=${1:?usage: gemm_q8_ab.sh BASE_PACK NEW_PACK}
NEW=${2:?usage: gemm_q8_ab.sh BASE_PACK NEW_PACK}
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
OUT=${OUT:-gemm-q8-out}; mkdir -p "$OUT"
bash "$BASE/unpack.sh" /tmp/k-base > /dev/null
bash "$NEW/unpack.sh" /tmp/k-new > /dev/null
MODEL=/dev/shm/q2.gguf
[ -f $MODEL ] || "$NEW/ds4" synth -o $MODEL --experts q2 --alias-layers > /dev/null 2>&1 &
for t in gemm_gpu forward_fixtures; do
    echo "$t: $(DS4_KERNEL_CACHE=/tmp/k-new timeout 120 "$NEW/$t" --test-threads 1 2>&1 | grep 'test result')" | tee -a "$OUT/r.txt"
done
for v in base new; do
    P=$BASE; [ $v = new ] && P=$NEW
    echo "== $v" | tee -a "$OUT/r.txt"
    DS4_KERNEL_CACHE=/tmp/k-$v timeout 120 "$P/gemm_gpu" gemm_q8_0_throughput --ignored --nocapture --test-threads 1 2>&1 |
        grep 'gemm_q8_0 ' | tee -a "$OUT/r.txt"
done
wait
for r in 1 2 3; do
    for v in base new; do
        P=$BASE; [ $v = new ] && P=$NEW
        DS4_KERNEL_CACHE=/tmp/k-$v timeout 100 "$P/ds4" bench -m $MODEL --backend cuda --ctx-start 2048 --ctx-max 8192 \
            --step-incr 2048 --gen-tokens 4 --csv /tmp/b.csv > /dev/null 2>&1
        echo "$r $v $(python3 -c "import csv; r=list(csv.DictReader(open('/tmp/b.csv'))); print(' '.join(x['prefill_tps'] for x in r), '%.1f' % (sum(float(x['prefill_tps']) for x in r) / len(r)))")" | tee -a "$OUT/r.txt"
    done
done

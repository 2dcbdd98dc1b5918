#!/usr/bin/env bash
# Session 28 (branch s28-q8-ldsm, not yet run on a GPU): the Q8_0 prefill GEMM with 32-bit
# ldmatrix addresses and a full-tile path without per-block tests (2678f16; SASS: 1 444 -> 1 345
# instructions in a K tile's math, registers 116 -> 112), then the activation scales stored in
# the order the lanes read them, two 16-byte loads a block instead of four 8-byte ones (the
# next commit: 1 345 -> 1 328, registers 112 -> 125 of the 128 two CTAs allow, no spills).
# MAIN and BRANCH: packs of main and of this branch (scripts/gpu/pack.sh); a pack of 2678f16
# as BRANCH measures the first change alone. Bits (gemm_gpu, forward_fixtures), the GEMM's throughput
# on the model's shapes for both, then prefill 2K-8K alternating the two, three rounds. $OUT.
set -u
MAIN=${1:?usage: s28_q8.sh MAIN_PACK BRANCH_PACK}
BRANCH=${2:?usage: s28_q8.sh MAIN_PACK BRANCH_PACK}
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
OUT=${OUT:-s28-out}; mkdir -p "$OUT"
bash "$MAIN/unpack.sh" /tmp/k-main > /dev/null
bash "$BRANCH/unpack.sh" /tmp/k-branch > /dev/null
MODEL=/dev/shm/q2.gguf
[ -f $MODEL ] || "$BRANCH/ds4" synth -o $MODEL --experts q2 --alias-layers > /dev/null 2>&1 &
for t in gemm_gpu forward_fixtures; do
    echo "$t: $(DS4_KERNEL_CACHE=/tmp/k-branch timeout 120 "$BRANCH/$t" --test-threads 1 2>&1 | grep 'test result')" | tee -a "$OUT/r.txt"
done
for v in main branch; do
    P=$MAIN; [ $v = branch ] && P=$BRANCH
    echo "== $v" | tee -a "$OUT/r.txt"
    DS4_KERNEL_CACHE=/tmp/k-$v timeout 120 "$P/gemm_gpu" gemm_q8_0_throughput --ignored --nocapture --test-threads 1 2>&1 |
        grep 'gemm_q8_0 ' | tee -a "$OUT/r.txt"
done
wait
for r in 1 2 3; do
    for v in main branch; do
        P=$MAIN; [ $v = branch ] && P=$BRANCH
        DS4_KERNEL_CACHE=/tmp/k-$v timeout 100 "$P/ds4" bench -m $MODEL --backend cuda --ctx-start 2048 --ctx-max 8192 \
            --step-incr 2048 --gen-tokens 4 --csv /tmp/b.csv > /dev/null 2>&1
        echo "$r $v $(python3 -c "import csv; r=list(csv.DictReader(open('/tmp/b.csv'))); print(' '.join(x['prefill_tps'] for x in r), '%.1f' % (sum(float(x['prefill_tps']) for x in r) / len(r)))")" | tee -a "$OUT/r.txt"
    done
done

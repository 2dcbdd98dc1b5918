#!/usr/bin/env bash
# Prefill A/B of two packs (scripts/gpu/pack.sh) on one GPU machine, in one device call: the
# second pack's tests that hold prefill to the reference and the CPU backend (forward_fixtures,
# kv_roundtrip, gpu_kernels; gemm_gpu and gemm_experts_gpu, which hold the prefill GEMMs to the
# scalar dot products bit for bit; those the pack carries), then `ds4 bench` prefill at 2K-8K and at
# 30K-32K (where the attention weighs more), alternating the two packs, three rounds. Each line:
# range, round, pack, the rows' prefill t/s and their mean. Results in $OUT/r.txt (./prefill-ab-out
# when unset). ~2 minutes on an H200 once the q2 aliased model is synthesized.
#   bash scripts/gpu/prefill_ab.sh BASE_PACK NEW_PACK
set -u
BASE=${1:?usage: prefill_ab.sh BASE_PACK NEW_PACK}
NEW=${2:?usage: prefill_ab.sh BASE_PACK NEW_PACK}
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
OUT=${OUT:-prefill-ab-out}
mkdir -p "$OUT"
b=$(basename "$BASE")
n=$(basename "$NEW")
[ "$b" != "$n" ] || { echo "prefill_ab.sh: the packs need different folder names" >&2; exit 2; }
bash "$BASE/unpack.sh" "/tmp/k-$b" > /dev/null
bash "$NEW/unpack.sh" "/tmp/k-$n" > /dev/null
MODEL=/dev/shm/q2.gguf
[ -f $MODEL ] || "$BASE/ds4" synth -o $MODEL --experts q2 --alias-layers > /dev/null 2>&1 &
for t in forward_fixtures kv_roundtrip gpu_kernels gemm_gpu gemm_experts_gpu; do
    [ -x "$NEW/$t" ] || continue
    echo "$n $t: $(DS4_KERNEL_CACHE=/tmp/k-$n timeout 150 "$NEW/$t" --test-threads 1 2>&1 | grep 'test result')" | tee -a "$OUT/r.txt"
done
wait
for range in "2048 8192" "30720 32768"; do
    set -- $range
    for r in 1 2 3; do
        for P in "$BASE" "$NEW"; do
            v=$(basename "$P")
            DS4_KERNEL_CACHE=/tmp/k-$v timeout 150 "$P/ds4" bench -m $MODEL --backend cuda --ctx-start "$1" --ctx-max "$2" \
                --step-incr 2048 --gen-tokens 4 --csv /tmp/prefill-ab.csv > /dev/null 2>&1
            echo "$1-$2 $r $v $(python3 -c "import csv; r=list(csv.DictReader(open('/tmp/prefill-ab.csv'))); print(' '.join(x['prefill_tps'] for x in r), '%.1f' % (sum(float(x['prefill_tps']) for x in r) / len(r)))")" | tee -a "$OUT/r.txt"
        done
    done
done

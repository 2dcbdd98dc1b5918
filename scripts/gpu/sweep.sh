#!/usr/bin/env bash
# The CUDA-speed acceptance run on the GPU machine (BENCHMARKS.md "CUDA end to end"), in one
# command, with timeouts that leave room for the slowest part (the q2 sweep takes ~3 minutes
# on an H100):
#   bash scripts/gpu/sweep.sh DIR          GPU test suites, q2 and q4 aliased sweeps, ds4 -p
#   bash scripts/gpu/sweep.sh DIR --full   the full 80.76 GiB q2 model from a tmpfs (H200)
# DIR is a pack from scripts/gpu/pack.sh. Results (CSVs, logs, sampled GPU memory, a summary)
# go to $OUT, the device tool's output folder (./sweep-out when unset).
set -u
DIR=${1:?usage: sweep.sh PACK_DIR [--full]}
MODE=${2:-}
OUT=${OUT:-sweep-out}
mkdir -p "$OUT"
[ -x "$DIR/ds4" ] || bash "$DIR/unpack.sh"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export DS4_KERNEL_CACHE=${DS4_KERNEL_CACHE:-/tmp/ds4-kernels}
DS4=$DIR/ds4
SWEEP=(--backend cuda --ctx-start 2048 --ctx-max 65536 --gen-tokens 128)
SUMMARY=$OUT/summary.txt
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$SUMMARY"

# Runs "$@" while sampling the GPU's memory every 0.5 s into $1; the peak goes to the summary.
with_memory() {
    local file=$1
    shift
    : > "$file"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$file" &
    local sampler=$!
    "$@"
    local rc=$?
    kill "$sampler" 2> /dev/null
    echo "$(basename "$file" .txt): peak $(sort -n "$file" | tail -1) MiB (rc $rc)" >> "$SUMMARY"
}

if [ "$MODE" = --full ]; then
    # 81 GiB of file: /dev/shm when it has the room, else a tmpfs of our own (needs root).
    DST=/dev/shm
    if [ "$(df --output=avail -B1G /dev/shm | tail -1)" -lt 84 ]; then
        DST=/mnt/ds4-full
        mkdir -p "$DST" && mount -t tmpfs -o size=84g tmpfs "$DST" || {
            echo "no tmpfs with 84 GiB free for the full model" | tee -a "$SUMMARY"
            exit 1
        }
    fi
    { time "$DS4" synth -o "$DST/full.gguf" --experts q2; } > "$OUT/synth_full.txt" 2>&1
    with_memory "$OUT/mem_full.txt" timeout 1200 "$DS4" bench -m "$DST/full.gguf" "${SWEEP[@]}" \
        --step-incr 2048 --csv "$OUT/bench-h200-q2-full.csv" > "$OUT/sweep_full.txt" 2>&1
    grep -v uploading "$OUT/sweep_full.txt" | tail -4 >> "$SUMMARY"
    rm -f "$DST/full.gguf"
    cat "$SUMMARY"
    exit 0
fi

# The GPU test suites the pack carries (each prints its own `test result` line).
for t in ds4_cuda forward_fixtures decode_graph kv_roundtrip gpu_kernels gemm_experts_gpu gemm_f16_gpu \
    gemm_gpu hc_gpu index_scores_gpu index_select_gpu vector_ops_gpu; do
    [ -x "$DIR/$t" ] || continue
    timeout 180 "$DIR/$t" --test-threads=1 > "$OUT/test_$t.txt" 2>&1
    echo "$t: rc $? $(grep -E '^test result' "$OUT/test_$t.txt" | tail -1)" >> "$SUMMARY"
done

"$DS4" synth -o /dev/shm/q2.gguf --experts q2 --alias-layers > /dev/null 2>&1
with_memory "$OUT/mem_q2.txt" timeout 420 "$DS4" bench -m /dev/shm/q2.gguf "${SWEEP[@]}" \
    --step-incr 2048 --csv "$OUT/bench-h100-q2.csv" > "$OUT/sweep_q2.txt" 2>&1
grep -v uploading "$OUT/sweep_q2.txt" | tail -3 >> "$SUMMARY"
# ds4 -p on ~1 900 words of pseudo-English (its own speed report).
python3 - > /tmp/ds4-prompt.txt << 'PY'
import random
random.seed(7)
w = ("the of and to in is that for it as with was on be by this are from at or an have not "
     "which but all were when we there can more one will other some into time has its two may "
     "first only new like these any see most over such make then them").split()
print(" ".join(random.choice(w) for _ in range(1900)))
PY
timeout 120 "$DS4" -m /dev/shm/q2.gguf --backend cuda --prompt-file /tmp/ds4-prompt.txt -n 128 \
    --temp 0 > "$OUT/p_q2.txt" 2>&1
grep -E "prefill|generation" "$OUT/p_q2.txt" >> "$SUMMARY"
rm -f /dev/shm/q2.gguf

"$DS4" synth -o /dev/shm/q4.gguf --experts q4 --alias-layers > /dev/null 2>&1
with_memory "$OUT/mem_q4.txt" timeout 300 "$DS4" bench -m /dev/shm/q4.gguf "${SWEEP[@]}" \
    --step-incr 8192 --csv "$OUT/bench-h100-q4.csv" > "$OUT/sweep_q4.txt" 2>&1
grep -v uploading "$OUT/sweep_q4.txt" | tail -3 >> "$SUMMARY"
rm -f /dev/shm/q4.gguf
cat "$SUMMARY"

#!/usr/bin/env bash
# The CUDA-speed acceptance run on the GPU machine (BENCHMARKS.md "CUDA end to end"), in parts
# that each fit the device tool's 10-minute call (the q2 sweep takes ~3 minutes on an H100):
#   bash scripts/gpu/sweep.sh DIR [PART...]
#     tests    the GPU test suites the pack carries
#     q2       the q2 aliased sweep, 2K -> 64K in 2 048-token steps
#     prompt   ds4 -p on ~1 900 words (its own speed report), q2 aliased
#     trace    the decode critical path per kernel, per layer kind and per call site at 2K
#              (CUPTI; scripts/gpu/critical_path.py), and the trace itself (xz)
#     prefill  where a 2K and a 32K prefill's GPU time goes, per kernel (CUPTI;
#              scripts/gpu/prefill_path.py)
#     q4       the q4 aliased sweep, 2K -> 64K in 8 192-token steps
#     full     the full 80.76 GiB q2 model from a tmpfs (H200), 2K -> 64K in 2 048-token steps
#   no PART: tests q2 prompt trace q4.
# DIR is a pack from scripts/gpu/pack.sh. Results (CSVs, logs, sampled GPU memory, a summary)
# go to $OUT, the device tool's output folder (./sweep-out when unset).
set -u
DIR=${1:?usage: sweep.sh PACK_DIR [tests|q2|prompt|trace|prefill|q4|full ...]}
shift
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(tests q2 prompt trace q4)
OUT=${OUT:-sweep-out}
mkdir -p "$OUT"
HERE=$(dirname "$0")
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export DS4_KERNEL_CACHE=${DS4_KERNEL_CACHE:-/tmp/ds4-kernels}
bash "$DIR/unpack.sh" "$DS4_KERNEL_CACHE"
DS4=$DIR/ds4
SWEEP=(--backend cuda --ctx-start 2048 --ctx-max 65536 --gen-tokens 128)
SUMMARY=$OUT/summary.txt
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$SUMMARY"
# The CSVs are named after the GPU they ran on (bench-h100-q2.csv, bench-h200-q4.csv, ...):
# the lowercase model word of its name (H100, H200, B200), or "gpu".
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oE '[A-Z][0-9]{3}' | head -1 | tr 'A-Z' 'a-z')
GPU=${GPU:-gpu}

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

q2_model() {
    [ -f /dev/shm/q2.gguf ] || "$DS4" synth -o /dev/shm/q2.gguf --experts q2 --alias-layers > /dev/null 2>&1
}

part_tests() {
    for t in ds4_cuda forward_fixtures decode_graph kv_roundtrip gpu_kernels gemm_experts_gpu \
        gemm_f16_gpu gemm_gpu hc_gpu index_scores_gpu index_select_gpu vector_ops_gpu; do
        [ -x "$DIR/$t" ] || continue
        # One log for all suites: the device tool brings back at most 8 files.
        echo "=== $t" >> "$OUT/tests.txt"
        timeout 180 "$DIR/$t" --test-threads=1 > /tmp/ds4-test.txt 2>&1
        echo "$t: rc $? $(grep -E '^test result' /tmp/ds4-test.txt | tail -1)" >> "$SUMMARY"
        cat /tmp/ds4-test.txt >> "$OUT/tests.txt"
    done
}

part_q2() {
    q2_model
    with_memory "$OUT/mem_q2.txt" timeout 420 "$DS4" bench -m /dev/shm/q2.gguf "${SWEEP[@]}" \
        --step-incr 2048 --csv "$OUT/bench-$GPU-q2.csv" > "$OUT/sweep_q2.txt" 2>&1
    grep -v uploading "$OUT/sweep_q2.txt" | tail -3 >> "$SUMMARY"
}

part_prompt() {
    q2_model
    python3 - > /tmp/ds4-prompt.txt << 'PY'
import random
random.seed(7)
w = ("the of and to in is that for it as with was on be by this are from at or an have not "
     "which but all were when we there can more one will other some into time has its two may "
     "first only new like these any see most over such make then them").split()
print(" ".join(random.choice(w) for _ in range(1900)))
PY
    timeout 120 "$DS4" -m /dev/shm/q2.gguf --backend cuda --prompt-file /tmp/ds4-prompt.txt \
        -n 128 --temp 0 > "$OUT/p_q2.txt" 2>&1
    grep -E "prefill|generation" "$OUT/p_q2.txt" >> "$SUMMARY"
}

part_trace() {
    q2_model
    LD_LIBRARY_PATH=$LD_LIBRARY_PATH:/usr/local/cuda/extras/CUPTI/lib64 DS4_CUDA_PROFILE=trace \
        DS4_CUDA_TRACE_FILE=/tmp/ds4-trace.csv timeout 120 "$DS4" bench -m /dev/shm/q2.gguf \
        --backend cuda --ctx-start 2048 --ctx-max 2048 --gen-tokens 128 > /tmp/ds4-trace-bench.txt 2>&1
    # Per kernel, per layer kind and per call site in one file; the trace itself compressed
    # (tens of MB as CSV), for analysis off the machine.
    local cp=$OUT/critical_path_q2.txt
    python3 "$HERE/critical_path.py" /tmp/ds4-trace.csv --top 40 > "$cp" 2>&1
    head -1 "$cp" >> "$SUMMARY"
    python3 "$HERE/critical_path.py" /tmp/ds4-trace.csv --layers | tee -a "$cp" >> "$SUMMARY" 2>&1
    python3 "$HERE/critical_path.py" /tmp/ds4-trace.csv --sites --bytes "$HERE/decode_sites_q2.csv" >> "$cp" 2>&1
    tail -3 /tmp/ds4-trace-bench.txt >> "$cp"
    xz -T0 -6 -c /tmp/ds4-trace.csv > "$OUT/trace_q2.csv.xz"
}

part_prefill() {
    q2_model
    local c
    for c in 2048 32768; do
        LD_LIBRARY_PATH=$LD_LIBRARY_PATH:/usr/local/cuda/extras/CUPTI/lib64 DS4_CUDA_PROFILE=trace \
            DS4_CUDA_TRACE_FILE=/tmp/ds4-ptrace.csv timeout 200 "$DS4" bench -m /dev/shm/q2.gguf \
            --backend cuda --ctx-start $c --ctx-max $c --gen-tokens 1 > /tmp/ds4-ptrace.txt 2>&1
        echo "== prefill to $c tokens: $(grep -A1 'prefill t/s' /tmp/ds4-ptrace.txt | tail -1)" >> "$OUT/prefill_path.txt"
        python3 "$HERE/prefill_path.py" /tmp/ds4-ptrace.csv --top 40 --idle >> "$OUT/prefill_path.txt" 2>&1
    done
    head -4 "$OUT/prefill_path.txt" >> "$SUMMARY"
}

part_q4() {
    "$DS4" synth -o /dev/shm/q4.gguf --experts q4 --alias-layers > /dev/null 2>&1
    with_memory "$OUT/mem_q4.txt" timeout 300 "$DS4" bench -m /dev/shm/q4.gguf "${SWEEP[@]}" \
        --step-incr 8192 --csv "$OUT/bench-$GPU-q4.csv" > "$OUT/sweep_q4.txt" 2>&1
    grep -v uploading "$OUT/sweep_q4.txt" | tail -3 >> "$SUMMARY"
    rm -f /dev/shm/q4.gguf
}

part_full() {
    rm -f /dev/shm/q2.gguf
    # 81 GiB of file: /dev/shm when it has the room, else a tmpfs of our own (needs root).
    local dst=/dev/shm
    if [ "$(df --output=avail -B1G /dev/shm | tail -1)" -lt 84 ]; then
        dst=/mnt/ds4-full
        mkdir -p "$dst" && mount -t tmpfs -o size=84g tmpfs "$dst" || {
            echo "no tmpfs with 84 GiB free for the full model" | tee -a "$SUMMARY"
            return 1
        }
    fi
    { time "$DS4" synth -o "$dst/full.gguf" --experts q2; } > "$OUT/synth_full.txt" 2>&1
    with_memory "$OUT/mem_full.txt" timeout 480 "$DS4" bench -m "$dst/full.gguf" "${SWEEP[@]}" \
        --step-incr 2048 --csv "$OUT/bench-$GPU-q2-full.csv" > "$OUT/sweep_full.txt" 2>&1
    grep -v uploading "$OUT/sweep_full.txt" | tail -4 >> "$SUMMARY"
    rm -f "$dst/full.gguf"
}

for part in "${PARTS[@]}"; do
    case $part in
        tests | q2 | prompt | trace | prefill | q4 | full) "part_$part" ;;
        *) echo "unknown part $part (tests, q2, prompt, trace, prefill, q4, full)" | tee -a "$SUMMARY" ;;
    esac
done
rm -f /dev/shm/q2.gguf
cat "$SUMMARY"

#!/usr/bin/env bash
# Decode A/B between packs (scripts/gpu/pack.sh) on one GPU machine, in one device call:
#   bash scripts/gpu/ab.sh ROUNDS PACK_A PACK_B [PACK ...]
# Each round runs every pack once, in turn (A B A B ...), on the q2 aliased synthetic model at
# a 2K context, 128 generated tokens: the GPU step from the CUPTI trace (critical_path.py's mean
# over the graph replays) and the bench's decode t/s (measured under the trace). One line per
# run, then the median per pack. Calls of one binary spread by about +-25 us in GPU step and
# +-2 % in t/s (BENCHMARKS.md, session 8): alternate, and compare medians over 3+ rounds.
# Each pack keeps its own kernel cache. Then every pack's logits of 24 tokens fed one at a time
# (the decode path, graph included) are compared byte for byte with the first pack's: a change
# meant to keep the bits must print "same bits". Results go to $OUT (./ab-out when unset); ~40 s
# a run on an H100 after the model is synthesized (~60 s).
set -u
ROUNDS=${1:?usage: ab.sh ROUNDS PACK_A PACK_B [PACK ...]}
shift
[ $# -ge 1 ] || { echo "usage: ab.sh ROUNDS PACK_A PACK_B [PACK ...]" >&2; exit 2; }
PACKS=("$@")
HERE=$(dirname "$0")
OUT=${OUT:-ab-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/extras/CUPTI/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
MODEL=${MODEL:-/dev/shm/q2.gguf}
for p in "${PACKS[@]}"; do
    [ -x "$p/ds4" ] || bash "$p/unpack.sh"
done
[ -f "$MODEL" ] || "${PACKS[0]}/ds4" synth -o "$MODEL" --experts q2 --alias-layers > /dev/null 2>&1
RESULTS=$OUT/ab.txt
echo "round pack gpu_step_us decode_tps" | tee "$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
    for p in "${PACKS[@]}"; do
        name=$(basename "$p")
        rm -f /tmp/ab-trace.csv /tmp/ab-bench.csv
        DS4_KERNEL_CACHE=/tmp/ab-kernels-$name DS4_CUDA_PROFILE=trace DS4_CUDA_TRACE_FILE=/tmp/ab-trace.csv \
            timeout 180 "$p/ds4" bench -m "$MODEL" --backend cuda --ctx-start 2048 --ctx-max 2048 \
            --gen-tokens 128 --csv /tmp/ab-bench.csv > "$OUT/bench_$name.txt" 2>&1
        step=$(python3 "$HERE/critical_path.py" /tmp/ab-trace.csv 2> /dev/null | head -1 | awk '{print $4}')
        tps=$(tail -n 1 /tmp/ab-bench.csv 2> /dev/null | cut -d, -f5)
        echo "$round $name ${step:-failed} ${tps:-failed}" | tee -a "$RESULTS"
    done
done
TOKENS=$(seq -s, 100 100 2400)
first=""
for p in "${PACKS[@]}"; do
    name=$(basename "$p")
    rm -f "/tmp/ab-logits-$name.npy"
    DS4_KERNEL_CACHE=/tmp/ab-kernels-$name timeout 300 "$p/ds4" logits -m "$MODEL" --backend cuda \
        --tokens "$TOKENS" --mode decode -o "/tmp/ab-logits-$name.npy" > /tmp/ab-logits.txt 2>&1
    if [ ! -s "/tmp/ab-logits-$name.npy" ]; then
        echo "$name: logits failed: $(tail -n 1 /tmp/ab-logits.txt)" | tee -a "$RESULTS"
    elif [ -z "$first" ]; then
        first=$name
    elif cmp -s "/tmp/ab-logits-$first.npy" "/tmp/ab-logits-$name.npy"; then
        echo "$name: same bits as $first (24 decode steps' logits)" | tee -a "$RESULTS"
    else
        echo "$name: logits DIFFER from $first" | tee -a "$RESULTS"
    fi
done
python3 - "$RESULTS" <<'PY'
import statistics, sys
from collections import defaultdict
steps, tps = defaultdict(list), defaultdict(list)
order = []
for line in open(sys.argv[1]).read().splitlines()[1:]:
    if ":" in line:
        continue
    _, name, step, t = line.split()
    if name not in order:
        order.append(name)
    if step != "failed":
        steps[name].append(float(step))
    if t != "failed":
        tps[name].append(float(t))
print(f"{'pack':<20} {'runs':>4} {'median GPU step us':>19} {'median decode t/s':>18}")
for name in order:
    s = f"{statistics.median(steps[name]):.1f}" if steps[name] else "-"
    t = f"{statistics.median(tps[name]):.2f}" if tps[name] else "-"
    print(f"{name:<20} {len(steps[name]):>4} {s:>19} {t:>18}")
PY

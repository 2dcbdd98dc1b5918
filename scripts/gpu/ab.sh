#!/usr/bin/env bash
# Decode A/B between packs (scripts/gpu/pack.sh), or one pack under several environment knobs,
# on one GPU machine, in one device call:
#   bash scripts/gpu/ab.sh ROUNDS VARIANT_A VARIANT_B [VARIANT ...]
# A variant is a pack directory, optionally with environment settings for its runs:
# PACK@VAR=VALUE,VAR=VALUE (e.g. .dev/x@DS4_CUDA_GEMV_CAP=4), so that a throwaway knob read by
# one binary compares configurations without a pack each. Each round runs every variant once,
# in turn (A B A B ...), on the q2 aliased synthetic model, 128 generated tokens:
#   AB_MODE=trace (default): at a 2K context, the GPU step from the CUPTI trace
#     (critical_path.py's mean over the graph replays) and the bench's decode t/s (measured
#     under the trace);
#   AB_MODE=sweep: contexts 2K, 4K and 6K without the trace (~7 s a run), the mean decode t/s
#     of the three.
# One line per run, then the median per variant. Calls of one binary spread by about +-25 us
# in GPU step and +-2 % in t/s (docs/speed-log.md, sessions 8 and 15): alternate, and compare
# medians over 3+ rounds. Each pack keeps its own kernel cache. Then every variant's logits
# of 24 tokens fed one at a time (the decode path, graph included) are compared byte for byte
# with the first variant's: a change meant to keep the bits must print "same bits". Results go
# to $OUT (./ab-out when unset): ab.txt (the runs, the logits check) and bench_logs.txt (every
# run's bench output); ~40 s a run in trace mode on an H100 after the model is
# synthesized (~60 s).
set -u
ROUNDS=${1:?usage: ab.sh ROUNDS VARIANT_A VARIANT_B [VARIANT ...]}
shift
[ $# -ge 1 ] || { echo "usage: ab.sh ROUNDS VARIANT_A VARIANT_B [VARIANT ...]" >&2; exit 2; }
VARIANTS=("$@")
MODE=${AB_MODE:-trace}
case $MODE in trace | sweep) ;; *) echo "AB_MODE is trace or sweep, not $MODE" >&2; exit 2 ;; esac
HERE=$(dirname "$0")
OUT=${OUT:-ab-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/extras/CUPTI/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
MODEL=${MODEL:-/dev/shm/q2.gguf}
pack_of() { echo "${1%%@*}"; }
# The variant's settings as separate VAR=VALUE words (none without an @).
settings_of() { [[ $1 == *@* ]] && echo "${1#*@}" | tr ',' ' '; }
# A name for the result lines: the pack's folder name and the settings (no spaces or colons).
name_of() { local b; b=$(basename "$(pack_of "$1")"); [[ $1 == *@* ]] && b="$b@${1#*@}"; echo "$b"; }
for v in "${VARIANTS[@]}"; do
    p=$(pack_of "$v")
    bash "$p/unpack.sh" "/tmp/ab-kernels-$(basename "$p")"
    [[ $(name_of "$v") != *:* ]] || { echo "variant $v: no colons in settings" >&2; exit 2; }
done
[ -f "$MODEL" ] || "$(pack_of "${VARIANTS[0]}")/ds4" synth -o "$MODEL" --experts q2 --alias-layers > /dev/null 2>&1
# CMD: the command that runs ds4 of variant $1 with its settings and its pack's kernel cache.
variant_cmd() {
    local kv
    CMD=(env)
    for kv in $(settings_of "$1"); do CMD+=("$kv"); done
    CMD+=("DS4_KERNEL_CACHE=/tmp/ab-kernels-$(basename "$(pack_of "$1")")" "$(pack_of "$1")/ds4")
}
RESULTS=$OUT/ab.txt
: > "$OUT/bench_logs.txt"
echo "round variant gpu_step_us decode_tps" | tee "$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
    for v in "${VARIANTS[@]}"; do
        name=$(name_of "$v")
        rm -f /tmp/ab-trace.csv /tmp/ab-bench.csv
        variant_cmd "$v"
        if [ "$MODE" = trace ]; then
            DS4_CUDA_PROFILE=trace DS4_CUDA_TRACE_FILE=/tmp/ab-trace.csv timeout 180 "${CMD[@]}" \
                bench -m "$MODEL" --backend cuda --ctx-start 2048 --ctx-max 2048 --gen-tokens 128 \
                --csv /tmp/ab-bench.csv > /tmp/ab-run.txt 2>&1
            step=$(python3 "$HERE/critical_path.py" /tmp/ab-trace.csv 2> /dev/null | head -1 | awk '{print $4}')
            tps=$(tail -n 1 /tmp/ab-bench.csv 2> /dev/null | cut -d, -f5)
        else
            timeout 180 "${CMD[@]}" bench -m "$MODEL" --backend cuda --ctx-start 2048 \
                --ctx-max 6144 --step-incr 2048 --gen-tokens 128 --csv /tmp/ab-bench.csv \
                > /tmp/ab-run.txt 2>&1
            step=-
            tps=$(tail -n +2 /tmp/ab-bench.csv 2> /dev/null | cut -d, -f5 |
                awk '{s += $1; n++} END {if (n) printf "%.2f", s / n}')
        fi
        # Every run's bench output in one file: the device tool brings back at most 8 files.
        { echo "=== round $round $name"; cat /tmp/ab-run.txt; } >> "$OUT/bench_logs.txt"
        echo "$round $name ${step:-failed} ${tps:-failed}" | tee -a "$RESULTS"
    done
done
TOKENS=$(seq -s, 100 100 2400)
first=""
for v in "${VARIANTS[@]}"; do
    name=$(name_of "$v")
    rm -f "/tmp/ab-logits.npy"
    variant_cmd "$v"
    timeout 300 "${CMD[@]}" logits -m "$MODEL" --backend cuda --tokens "$TOKENS" --mode decode \
        -o /tmp/ab-logits.npy > /tmp/ab-logits.txt 2>&1
    if [ ! -s /tmp/ab-logits.npy ]; then
        echo "$name: logits failed: $(tail -n 1 /tmp/ab-logits.txt)" | tee -a "$RESULTS"
    elif [ -z "$first" ]; then
        first=$name
        cp /tmp/ab-logits.npy /tmp/ab-logits-first.npy
    elif cmp -s /tmp/ab-logits-first.npy /tmp/ab-logits.npy; then
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
    if step not in ("failed", "-"):
        steps[name].append(float(step))
    if t != "failed":
        tps[name].append(float(t))
print(f"{'variant':<40} {'runs':>4} {'median GPU step us':>19} {'median decode t/s':>18}")
for name in order:
    s = f"{statistics.median(steps[name]):.1f}" if steps[name] else "-"
    t = f"{statistics.median(tps[name]):.2f}" if tps[name] else "-"
    print(f"{name:<40} {len(tps[name]):>4} {s:>19} {t:>18}")
PY

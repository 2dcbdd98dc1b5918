#!/usr/bin/env python3
"""Per-kernel critical path of the decode steps in a CUPTI trace.

Input: the CSV that `DS4_CUDA_PROFILE=trace DS4_CUDA_TRACE_FILE=F ds4 bench ...` writes
(name,start_ns,end_ns,correlation,in_graph). Every graph launch (one decode step) is a window;
its kernels are taken in the order they end, and each is charged the time by which it moved
the latest end forward (its end minus the latest end before it). With dependent launch a
kernel's CTAs start while its predecessor still runs, so plain durations overlap and double
count; these charges sum to the step's wall time. A gap with no kernel running (from the union
of the kernels' intervals, reported separately) is charged to the kernel that ends next.

Caveat: where a side branch runs beside the main chain, the kernel that happens to end next
takes the charge, so a short side-branch kernel that ends while a long main-chain kernel runs
takes part of that kernel's time (CUPTI's stream ids do not help: a graph runs its nodes on
streams of its own). Read the charges per layer phase, with the busy times beside them.

Usage: critical_path.py TRACE.csv [--top N]
"""
import argparse
import csv
from collections import defaultdict


def summarize(rows):
    """Per-step means over the steady graph steps of `rows` (dicts with the CSV's columns):
    (steps, wall_ns, idle_ns, charge_ns, busy_ns, calls), the last three by kernel name and
    summed over the steps."""
    steps = defaultdict(list)
    for row in rows:
        if str(row["in_graph"]) == "1":
            steps[int(row["correlation"])].append(
                (row["name"], int(row["start_ns"]), int(row["end_ns"])))
    # The first 3 steps and the last one are dropped (first replays, the bench's end).
    windows = sorted(steps.values(), key=lambda ks: min(k[1] for k in ks))[3:-1]
    charge = defaultdict(float)
    busy = defaultdict(float)
    calls = defaultdict(int)
    wall = idle = 0.0
    for ks in windows:
        ks.sort(key=lambda k: k[1])
        covered = ks[0][1]
        for _, start, end in ks:
            idle += max(0, start - covered)
            covered = max(covered, end)
        ks.sort(key=lambda k: k[2])
        t0 = latest = min(k[1] for k in ks)
        for name, start, end in ks:
            charge[name] += max(0, end - latest)
            busy[name] += end - start
            calls[name] += 1
            latest = max(latest, end)
        wall += latest - t0
    return len(windows), wall, idle, charge, busy, calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    with open(args.trace) as f:
        n, wall, idle, charge, busy, calls = summarize(csv.DictReader(f))
    if not n:
        raise SystemExit("no decode graph steps in the trace (graph capture off?)")
    print(f"{n} decode steps, {wall / n / 1e3:.1f} us each on the GPU "
          f"({idle / n / 1e3:.1f} us without a kernel)")
    print(f"{'kernel':<34} {'calls/step':>10} {'us/step':>9} {'us/call':>8} {'share':>6} "
          f"{'busy us/call':>12}")
    rows = sorted(charge.items(), key=lambda kv: -kv[1])
    for name, ns in rows[:args.top]:
        print(f"{name:<34} {calls[name] / n:>10.1f} {ns / n / 1e3:>9.1f} "
              f"{ns / calls[name] / 1e3:>8.2f} {100 * ns / wall:>5.1f}% "
              f"{busy[name] / calls[name] / 1e3:>12.2f}")
    rest = sum(ns for _, ns in rows[args.top:])
    if rest:
        print(f"{'(the others)':<34} {'':>10} {rest / n / 1e3:>9.1f}")


if __name__ == "__main__":
    main()

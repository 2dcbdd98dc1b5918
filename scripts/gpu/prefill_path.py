#!/usr/bin/env python3
"""Where a prefill's GPU time goes, from a CUPTI trace.

Input: the CSV that `DS4_CUDA_PROFILE=trace DS4_CUDA_TRACE_FILE=F ds4 bench ...` writes
(name,start_ns,end_ns,correlation,in_graph; since session 24 also stream,graph_node,grid). The
kernels outside the decode graphs are cut into bursts at gaps of 2 ms or more (the host's work
between 2 048-token spans leaves such gaps), and the longest burst is reported: the prefill of
a one-span bench row, or the longest span (usually the last, deepest in the context) of a
longer prefill. As in critical_path.py, the kernels are taken in the order they end and each is
charged the time by which it moved the latest end forward, so the charges sum to the burst's
wall time and kernels of side streams that overlap the main chain are charged only what they
add; the busy column is the kernels' own durations (which overlap across streams).

With --idle it also lists the burst's idle time (no kernel running on any stream) by the
kernel that ends each gap: what the GPU waited for (launches, host work, a cross-stream join).

Usage: prefill_path.py TRACE.csv [--top N] [--idle]
"""
import argparse
import csv
from collections import defaultdict


def bursts(kernels, gap_ns=2_000_000):
    """(start, end, name) kernels sorted by start, split where nothing runs for gap_ns."""
    out, cur, last_end = [], [], 0
    for k in kernels:
        if cur and k[0] - last_end >= gap_ns:
            out.append(cur)
            cur = []
        last_end = max(last_end, k[1]) if cur else k[1]
        cur.append(k)
    if cur:
        out.append(cur)
    return out


def longest_burst(rows, gap_ns=2_000_000):
    """The longest burst of `rows` (trace dicts) outside the decode graphs, as (start, end,
    name) sorted by start; None when no kernel ran outside a graph."""
    kernels = sorted((int(r["start_ns"]), int(r["end_ns"]), r["name"]) for r in rows
                     if str(r["in_graph"]) != "1")
    if not kernels:
        return None
    return max(bursts(kernels, gap_ns), key=lambda b: max(k[1] for k in b) - b[0][0])


def summarize(rows, gap_ns=2_000_000):
    """The longest burst's kernels, wall ns, and charge / busy ns and calls per kernel name;
    None when no kernel ran outside a graph."""
    burst = longest_burst(rows, gap_ns)
    if burst is None:
        return None
    t0, t1 = burst[0][0], max(k[1] for k in burst)
    charge, busy, calls = defaultdict(int), defaultdict(int), defaultdict(int)
    latest = t0
    for start, end, name in sorted(burst, key=lambda k: k[1]):
        charge[name] += max(0, end - latest)
        latest = max(latest, end)
        busy[name] += end - start
        calls[name] += 1
    return len(burst), t1 - t0, dict(charge), dict(busy), dict(calls)


def idle_gaps(rows, gap_ns=2_000_000):
    """Idle ns inside the longest burst, per kernel name starting right after a gap:
    ({name: idle ns}, {name: gaps}, total idle ns)."""
    burst = longest_burst(rows, gap_ns)
    if burst is None:
        return {}, {}, 0
    idle, gaps, total = defaultdict(int), defaultdict(int), 0
    latest = burst[0][1]
    for start, end, name in burst[1:]:
        if start > latest:
            idle[name] += start - latest
            gaps[name] += 1
            total += start - latest
        latest = max(latest, end)
    return dict(idle), dict(gaps), total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--idle", action="store_true", help="also the idle time by the kernel after it")
    args = ap.parse_args()
    rows = list(csv.DictReader(open(args.trace)))
    summary = summarize(rows)
    if summary is None:
        print("no kernels outside the decode graphs")
        return
    n, wall, charge, busy, calls = summary
    print(f"prefill burst: {n} kernels, {wall / 1e6:.2f} ms")
    print(f"{'kernel':<40} {'calls':>6} {'charge ms':>10} {'share':>6} {'busy ms':>9}")
    for name in sorted(charge, key=charge.get, reverse=True)[: args.top]:
        print(f"{name:<40} {calls[name]:>6} {charge[name] / 1e6:>10.2f} {100 * charge[name] / wall:>5.1f}% "
              f"{busy[name] / 1e6:>9.2f}")
    if args.idle:
        idle, gaps, total = idle_gaps(rows)
        print(f"idle: {total / 1e6:.2f} ms of {wall / 1e6:.2f} ({100 * total / wall:.1f} %), by the kernel after the gap")
        for name in sorted(idle, key=idle.get, reverse=True)[: args.top]:
            print(f"  {name:<38} {gaps[name]:>6} gaps {idle[name] / 1e6:>8.3f} ms")


if __name__ == "__main__":
    main()

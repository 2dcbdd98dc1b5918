#!/usr/bin/env python3
"""Per-kernel critical path of the decode steps in a CUPTI trace.

Input: the CSV that `DS4_CUDA_PROFILE=trace DS4_CUDA_TRACE_FILE=F ds4 bench ...` writes
(name,start_ns,end_ns,correlation,in_graph; since session 24 also stream,graph_node,grid).
Every graph launch (one decode step) is a window; its kernels are taken in the order they end,
and each is charged the time by which it moved the latest end forward (its end minus the latest
end before it). With dependent launch a kernel's CTAs start while its predecessor still runs,
so plain durations overlap and double count; these charges sum to the step's wall time. A gap
with no kernel running (from the union of the kernels' intervals, reported separately) is
charged to the kernel that ends next. The median time between steps (one step's last kernel end
to the next one's first start) is what the host and the graph launch add to every token.

Caveat: where a side branch runs beside the main chain, the kernel that happens to end next
takes the charge, so a short side-branch kernel that ends while a long main-chain kernel runs
takes part of that kernel's time (CUPTI's stream ids do not help: a graph runs its nodes on
streams of its own; each kernel's graph node and grid, in traces since session 24, may tell the
branches apart in --timeline). Read the charges per layer phase, with the busy times beside
them.

Per layer (--layers): each step is cut into layers where a kernel named --layer-start begins
(by default hc_pre_norm_q8_0, the attention input's first kernel of every layer); layers that
run a --marker kernel (by default index_topk: the CSA layers) are reported apart from the
others, with the median layer span and the median wait between the last --wait-from kernel's
end (the query path: head_norm_rope) and the --wait-to kernel's start (attend_split_scores):
how long the attention waited for its side branches. --timeline STEP:LAYER prints one layer's
kernels (start, end, duration in us from the step's first kernel; with each kernel's stream,
graph node and grid where the trace has them).

Per call site (--sites): the step's charges (as above) split by where in its layer a kernel
runs, per layer kind: site "hc_post_mix#2" is the second hc_post_mix of a layer (in start
order), so one kernel name called from two places of a layer (after the attention, after the
FFN) is reported twice. Median charge and median busy time per layer, in the order the sites
end.

With --bytes FILE (a CSV of site,what,mb: the weight megabytes a call site reads, e.g.
decode_sites_q2.csv for the q2 Flash files), --sites also prints each listed site's bytes and
its rate over its median busy time (GB/s), BENCHMARKS.md's per-kernel rates. A kernel that
dependent launch started early is busy while it waits, so its rate understates its streaming.

Usage: critical_path.py TRACE.csv [--top N] [--layers] [--sites [--bytes FILE]]
       [--timeline STEP:LAYER]
"""
import argparse
import csv
import statistics
from collections import defaultdict


def steady_steps(rows):
    """The graph launches (decode steps) of `rows` in time order, each a list of (name,
    start_ns, end_ns); the first 3 (first replays) and the last (the bench's end) dropped."""
    steps = defaultdict(list)
    for row in rows:
        if str(row["in_graph"]) == "1":
            steps[int(row["correlation"])].append(
                (row["name"], int(row["start_ns"]), int(row["end_ns"])))
    return sorted(steps.values(), key=lambda ks: min(k[1] for k in ks))[3:-1]


def step_gap_ns(rows):
    """Median time from one steady decode step's last kernel end to the next step's first
    kernel start: what the host and the graph launch add to every token (the median, so that
    the prefill between the bench's context points does not count)."""
    steps = steady_steps(rows)
    gaps = [min(k[1] for k in b) - max(k[2] for k in a) for a, b in zip(steps, steps[1:])]
    return statistics.median(gaps) if gaps else None


def split_layers(step, layer_start):
    """The kernels of one step in start order, cut before every `layer_start` kernel (what
    comes before the first one is dropped)."""
    ks = sorted(step, key=lambda k: k[1])
    cuts = [i for i, k in enumerate(ks) if k[0] == layer_start]
    return [ks[a:b] for a, b in zip(cuts, cuts[1:] + [len(ks)])]


def layer_stats(rows, layer_start="hc_pre_norm_q8_0", marker="index_topk",
                wait_from="head_norm_rope", wait_to="attend_split_scores"):
    """Per layer kind (True: the layer runs a `marker` kernel): (layers, median span_ns,
    median wait_ns), the wait from the last `wait_from` end before the first `wait_to` start
    to that start (layers without both are left out of the wait)."""
    spans = defaultdict(list)
    waits = defaultdict(list)
    for step in steady_steps(rows):
        for layer in split_layers(step, layer_start):
            kind = any(k[0] == marker for k in layer)
            spans[kind].append(max(k[2] for k in layer) - layer[0][1])
            to = next((k for k in layer if k[0] == wait_to), None)
            ends = [k[2] for k in layer if to and k[0] == wait_from and k[1] < to[1]]
            if ends:
                waits[kind].append(to[1] - max(ends))
    return {kind: (len(spans[kind]), statistics.median(spans[kind]),
                   statistics.median(waits[kind]) if waits[kind] else None)
            for kind in spans}


def site_stats(rows, layer_start="hc_pre_norm_q8_0", marker="index_topk"):
    """Per layer kind (True: runs a `marker` kernel), per call site (name#occurrence in the
    layer's start order): (layers that have it, median charge_ns, median busy_ns, median end_ns
    from the layer's first start), the charge as summarize's (end minus the step's latest end
    before it, so side-branch kernels ending inside a main-chain kernel take part of it)."""
    charges = defaultdict(list)
    busies = defaultdict(list)
    ends = defaultdict(list)
    for step in steady_steps(rows):
        charge = {}
        latest = min(k[1] for k in step)
        for k in sorted(step, key=lambda k: k[2]):
            charge[id(k)] = max(0, k[2] - latest)
            latest = max(latest, k[2])
        for layer in split_layers(step, layer_start):
            kind = any(k[0] == marker for k in layer)
            seen = defaultdict(int)
            for k in layer:
                seen[k[0]] += 1
                site = (kind, f"{k[0]}#{seen[k[0]]}")
                charges[site].append(charge[id(k)])
                busies[site].append(k[2] - k[1])
                ends[site].append(k[2] - layer[0][1])
    out = defaultdict(dict)
    for (kind, site), cs in charges.items():
        out[kind][site] = (len(cs), statistics.median(cs), statistics.median(busies[(kind, site)]),
                           statistics.median(ends[(kind, site)]))
    return out


def read_site_bytes(path):
    """{site: (what, megabytes)} from a CSV with the columns site, what, mb."""
    with open(path) as f:
        return {r["site"]: (r["what"], float(r["mb"])) for r in csv.DictReader(f)}


def site_rate(mb, busy_ns):
    """GB/s of `mb` megabytes (1e6 bytes) moved in `busy_ns`."""
    return mb * 1e6 / busy_ns if busy_ns > 0 else float("inf")


def summarize(rows):
    """Per-step means over the steady graph steps of `rows` (dicts with the CSV's columns):
    (steps, wall_ns, idle_ns, charge_ns, busy_ns, calls), the last three by kernel name and
    summed over the steps."""
    windows = steady_steps(rows)
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
    ap.add_argument("--layers", action="store_true", help="median span and wait per layer kind")
    ap.add_argument("--layer-start", default="hc_pre_norm_q8_0")
    ap.add_argument("--marker", default="index_topk")
    ap.add_argument("--wait-from", default="head_norm_rope")
    ap.add_argument("--wait-to", default="attend_split_scores")
    ap.add_argument("--timeline", metavar="STEP:LAYER", help="one layer's kernels")
    ap.add_argument("--sites", action="store_true", help="median charge per call site and layer kind")
    ap.add_argument("--bytes", metavar="FILE", help="with --sites: weight MB per site (CSV site,what,mb)")
    args = ap.parse_args()
    with open(args.trace) as f:
        rows = list(csv.DictReader(f))
    if args.timeline:
        k, l = (int(v) for v in args.timeline.split(":"))
        step = steady_steps(rows)[k]
        t0 = min(x[1] for x in step)
        # Traces that record them (since session 24) add each kernel's stream, graph node and grid.
        extra = {(r["name"], int(r["start_ns"]), int(r["end_ns"])):
                 f" stream {r['stream']} node {r['graph_node']} grid {r['grid']}"
                 for r in rows if "grid" in r}
        for name, start, end in split_layers(step, args.layer_start)[l]:
            print(f"{(start - t0) / 1e3:9.2f} {(end - t0) / 1e3:9.2f} {(end - start) / 1e3:7.2f} {name}"
                  f"{extra.get((name, start, end), '')}")
        return
    if args.sites:
        site_bytes = read_site_bytes(args.bytes) if args.bytes else {}
        for kind, sites in sorted(site_stats(rows, args.layer_start, args.marker).items(), reverse=True):
            label = f"with {args.marker}" if kind else f"without {args.marker}"
            print(f"layers {label}: median per layer")
            rate_head = f" {'MB':>7} {'GB/s':>6}  what" if site_bytes else ""
            print(f"  {'site':<34} {'layers':>6} {'end us':>7} {'charge us':>9} {'busy us':>8}{rate_head}")
            total = 0.0
            for site, (count, charge, busy, end) in sorted(sites.items(), key=lambda kv: kv[1][3]):
                total += charge
                rate = ""
                if site in site_bytes:
                    what, mb = site_bytes[site]
                    rate = f" {mb:>7.2f} {site_rate(mb, busy):>6.0f}  {what}"
                print(f"  {site:<34} {count:>6} {end / 1e3:>7.2f} {charge / 1e3:>9.2f} {busy / 1e3:>8.2f}{rate}")
            print(f"  {'(sum of the median charges)':<34} {'':>6} {'':>7} {total / 1e3:>9.2f}")
        return
    if args.layers:
        stats = layer_stats(rows, args.layer_start, args.marker, args.wait_from, args.wait_to)
        print(f"{'layers':<24} {'count':>6} {'span us':>8} {'wait us':>8}")
        for kind, (count, span, wait) in sorted(stats.items(), reverse=True):
            label = f"with {args.marker}" if kind else f"without {args.marker}"
            wait_us = "-" if wait is None else f"{wait / 1e3:.2f}"
            print(f"{label:<24} {count:>6} {span / 1e3:>8.2f} {wait_us:>8}")
        return
    n, wall, idle, charge, busy, calls = summarize(rows)
    if not n:
        raise SystemExit("no decode graph steps in the trace (graph capture off?)")
    gap = step_gap_ns(rows)
    between = f"; {gap / 1e3:.1f} us between steps" if gap is not None else ""
    print(f"{n} decode steps, {wall / n / 1e3:.1f} us each on the GPU "
          f"({idle / n / 1e3:.1f} us without a kernel){between}")
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

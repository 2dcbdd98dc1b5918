#!/usr/bin/env python3
"""Plot `ds4 bench` CSVs (prefill and decode tokens/s against context) as one SVG.

Pure Python, no plotting library: the figure is two small line charts side by side. Each
series is a CSV with ds4-bench's columns (ctx_tokens, prefill_tps, gen_tps, ...); ds4's own
H100 figures from the CUDA-speed issue are drawn as the reference series.

    python3 scripts/plot_bench.py -o docs/bench.svg "ds4-rs H100 (baseline)=docs/bench-h100-baseline.csv"
"""

import argparse
import csv
import sys

# ds4 (antirez/ds4, CUDA build for sm_90) on an H100 with the same synthetic q2 model:
# context -> (prefill t/s, decode t/s), as measured in the CUDA-speed issue.
DS4_H100 = {2048: (1356, 33.5), 8192: (1310, 31.9), 16384: (1243, 31.7), 32768: (1136, 28.5), 65536: (937, 26.9)}

COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 420, 300, 60, 15, 35, 45


def read_series(spec):
    label, _, path = spec.partition("=")
    if not path:
        sys.exit(f"series '{spec}' must be LABEL=FILE.csv")
    points = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            points.append((int(row["ctx_tokens"]), float(row["prefill_tps"]), float(row["gen_tps"])))
    if not points:
        sys.exit(f"{path}: no rows")
    return label, sorted(points)


def nice_max(v):
    step = 10 ** (len(str(int(v))) - 1)
    return (int(v / step) + 1) * step


def chart(x0, title, series, pick):
    xs = [p[0] for _, pts in series for p in pts]
    ys = [pick(p) for _, pts in series for p in pts]
    xmax, ymax = max(xs), nice_max(max(ys))
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def px(x):
        return x0 + PAD_L + pw * x / xmax

    def py(y):
        return PAD_T + ph * (1 - y / ymax)

    out = [f'<text x="{x0 + W / 2}" y="20" text-anchor="middle" font-weight="bold">{title}</text>']
    out.append(f'<rect x="{x0 + PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<text x="{x0 + PAD_L - 5}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        out.append(f'<line x1="{x0 + PAD_L}" x2="{x0 + W - PAD_R}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>')
    for i in range(5):
        x = xmax * i / 4
        out.append(f'<text x="{px(x):.1f}" y="{H - PAD_B + 15}" text-anchor="middle">{x / 1024:g}K</text>')
    out.append(f'<text x="{x0 + W / 2}" y="{H - 8}" text-anchor="middle">context (tokens)</text>')
    for i, (label, pts) in enumerate(series):
        c = COLORS[i % len(COLORS)]
        path = " ".join(f"{px(p[0]):.1f},{py(pick(p)):.1f}" for p in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for p in pts:
            out.append(f'<circle cx="{px(p[0]):.1f}" cy="{py(pick(p)):.1f}" r="2.5" fill="{c}"/>')
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", required=True, help="SVG file to write")
    ap.add_argument("series", nargs="+", help="LABEL=FILE.csv (ds4 bench --csv output)")
    args = ap.parse_args()
    series = [("ds4 (C/CUDA) H100", [(c, p, g) for c, (p, g) in sorted(DS4_H100.items())])]
    series += [read_series(s) for s in args.series]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H + 20 * len(series)}" '
             'font-family="sans-serif" font-size="11">', f'<rect width="100%" height="100%" fill="white"/>']
    parts += chart(0, "prefill tokens/s", series, lambda p: p[1])
    parts += chart(W, "decode tokens/s", series, lambda p: p[2])
    for i, (label, _) in enumerate(series):
        y = H + 12 + 20 * i
        parts.append(f'<line x1="{PAD_L}" x2="{PAD_L + 25}" y1="{y}" y2="{y}" stroke="{COLORS[i % len(COLORS)]}" stroke-width="3"/>')
        parts.append(f'<text x="{PAD_L + 32}" y="{y + 4}">{label}</text>')
    parts.append("</svg>")
    with open(args.out, "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()

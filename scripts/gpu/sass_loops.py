#!/usr/bin/env python3
"""Loops in a module's SASS that hold both global stores and global loads.

In such a loop the loads of one iteration come after the stores of the one before, and when the
compiler cannot prove that the buffers differ (plain pointers), each iteration waits a memory
round trip for its loads: what `hc_post_mix` and `compress_span` did before 1457372
(docs/speed-log.md, session 27). A hit is a candidate to read, not a bug: loops over a span's
tokens run once in decode, and some loads must follow the stores. No GPU needed:

  pip download nvidia-cuda-nvdisasm==13.2.86 --no-deps -d /tmp/nvd   # unzip the wheel
  target/release/examples/fill_kernel_cache .dev/kernel-cache --copy-to /tmp/kk
  nvdisasm -c /tmp/kk/fwd_hc-*.cubin > /tmp/fwd_hc.sass   # (nvdisasm from the wheel)
  python3 scripts/gpu/sass_loops.py /tmp/fwd_hc.sass

A loop is a backward branch to a label; it is reported with its instruction, store and load
counts.
"""
import re
import sys


def functions(lines):
    """{kernel name: its SASS lines} from `nvdisasm -c` output."""
    out, name = {}, None
    for line in lines:
        m = re.match(r"^\.text\.(\S+):", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name:
            out[name].append(line)
    return out


def loops(lines):
    """(instructions, stores, loads) of every backward branch's body."""
    labels, ins = {}, []
    for line in lines:
        m = re.match(r"^\.(L_x_\d+):", line.strip())
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1))
    for i, op in enumerate(ins):
        m = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", op)
        if m and labels.get(m.group(1), i + 1) <= i:
            body = ins[labels[m.group(1)]:i + 1]
            yield len(body), sum("STG" in x for x in body), sum("LDG" in x for x in body)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: sass_loops.py MODULE.sass")
    with open(sys.argv[1]) as f:
        funcs = functions(f.read().split("\n"))
    for name, lines in funcs.items():
        for n, st, ld in loops(lines):
            if st and ld:
                print(f"{name}: loop of {n} instructions, {st} STG, {ld} LDG")


if __name__ == "__main__":
    main()

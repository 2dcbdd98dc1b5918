"""Load figure for BENCHMARKS.md: N concurrent streaming chat clients against `ds4 serve`.

Starts the server binary (DS4_BIN, default target/debug/ds4; use a release build for figures)
on the tiny real-vocabulary fixture model, runs ROUNDS rounds of CLIENTS concurrent streaming
requests, checks every stream (complete, one id, identical text at temperature 0), and prints
requests/s, tokens/s and latency percentiles.

    python3 tests/server/load_bench.py [--clients 32] [--rounds 4] [--max-tokens 32]
"""

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import subprocess

import openai

from conftest import DS4_BIN, ROOT, start_server


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = tmp / "vocab_real.gguf"
    subprocess.run([DS4_BIN, "convert", str(ROOT / "tests/fixtures/models/vocab_real"), "-o", str(model),
                    "--tokenizer", str(ROOT / "tests/fixtures/tokenizer/tokenizer.json")],
                   check=True, stdout=subprocess.DEVNULL)
    srv_dir = tmp / "srv"
    srv_dir.mkdir()
    server = start_server(model, srv_dir)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    req = dict(model="deepseek-v4-flash", messages=[{"role": "user", "content": "Benchmark the server."}],
               max_tokens=args.max_tokens, temperature=0, extra_body={"think": False})
    want = client.chat.completions.create(**req).choices[0].message.content

    def one(_):
        t0 = time.perf_counter()
        first = None
        chunks = []
        for c in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **req):
            if first is None and c.choices and c.choices[0].delta.content:
                first = time.perf_counter() - t0
            chunks.append(c)
        total = time.perf_counter() - t0
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want, "corrupted stream"
        assert len({c.id for c in chunks}) == 1
        return total, first or total, chunks[-1].usage.completion_tokens

    results = []
    t_start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        for _ in range(args.rounds):
            results += list(pool.map(one, range(args.clients)))
    wall = time.perf_counter() - t_start
    server.proc.terminate()
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    toks = sum(r[2] for r in results)

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    print(f"binary {DS4_BIN}")
    print(f"{len(results)} streaming requests ({args.clients} concurrent x {args.rounds} rounds), "
          f"{args.max_tokens} max tokens each, all streams complete and identical")
    print(f"wall {wall:.2f} s  requests/s {len(results) / wall:.1f}  generated tokens/s {toks / wall:.0f}")
    print(f"latency ms: p50 {pct(lat, 50) * 1e3:.0f}  p90 {pct(lat, 90) * 1e3:.0f}  p99 {pct(lat, 99) * 1e3:.0f}  "
          f"max {lat[-1] * 1e3:.0f}  mean {statistics.mean(lat) * 1e3:.0f}")
    print(f"time to first token ms: p50 {pct(ttft, 50) * 1e3:.0f}  p99 {pct(ttft, 99) * 1e3:.0f}")


if __name__ == "__main__":
    main()

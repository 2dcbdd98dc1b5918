"""The decode rate of `ds4 serve` as a streaming client sees it (docs/speed-log.md, session 16).

    ds4 serve -m MODEL --backend cuda --port 8111 --ctx 8192 &
    python3 scripts/gpu/serve_rate.py 8111 512 default   # ds4's default sampling
    python3 scripts/gpu/serve_rate.py 8111 512 0         # temperature 0

One chat completion of MAX_TOKENS tokens after a ~200-token prompt, streamed; prints the
completion tokens, the time to the first content chunk, and (tokens - 1) / (last content chunk -
first content chunk). Standard library only.
"""

import json
import sys
import time
import urllib.request


def main() -> None:
    port, max_tokens, temp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    body = {
        "model": "ds4",
        "stream": True,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "user", "content": "Write a long story about a lighthouse keeper. " * 20}
        ],
    }
    if temp != "default":
        body["temperature"] = float(temp)
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.time()
    times, usage = [], None
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                d = ch.get("delta", {})
                if d.get("content") or d.get("reasoning_content"):
                    times.append(time.time())
    if not times:
        sys.exit("no content streamed")
    n = usage["completion_tokens"] if usage else len(times)
    rate = (n - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    print(f"tokens {n} chunks {len(times)} ttft {times[0] - t0:.3f}s decode {rate:.2f} t/s")


if __name__ == "__main__":
    main()

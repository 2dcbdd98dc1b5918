"""Starts the real `ds4 serve` binary on the tiny real-vocabulary fixture model.

DS4_BIN: the binary (default target/debug/ds4). The GGUF is converted from
tests/fixtures/models/vocab_real with `ds4 convert` into a temporary directory.
"""

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DS4_BIN = os.environ.get("DS4_BIN", str(ROOT / "target" / "debug" / "ds4"))


class Server:
    def __init__(self, proc, url, trace):
        self.proc = proc
        self.url = url
        self.trace = trace
        self.log = []

    def trace_text(self):
        return Path(self.trace).read_text(encoding="utf-8") if self.trace else ""


def start_server(model, tmp, *extra):
    trace = str(tmp / f"trace-{len(list(tmp.iterdir()))}.txt")
    cmd = [DS4_BIN, "serve", "-m", str(model), "--port", "0", "--ctx", "4096", "--trace", trace, *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    url = None
    log = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        raise RuntimeError("server did not start: " + "".join(log))
    server = Server(proc, url, trace)
    server.log = log

    def drain():
        for line in proc.stderr:
            server.log.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return server


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "vocab_real.gguf"
    subprocess.run(
        [DS4_BIN, "convert", str(ROOT / "tests/fixtures/models/vocab_real"), "-o", str(out),
         "--tokenizer", str(ROOT / "tests/fixtures/tokenizer/tokenizer.json")],
        check=True, stdout=subprocess.DEVNULL,
    )
    return out


@pytest.fixture(scope="session")
def server(model, tmp_path_factory):
    s = start_server(model, tmp_path_factory.mktemp("srv"))
    yield s
    s.proc.terminate()
    s.proc.wait(timeout=10)
    assert s.proc.returncode is not None


@pytest.fixture(scope="session")
def keyed_server(model, tmp_path_factory):
    s = start_server(model, tmp_path_factory.mktemp("keyed"), "--api-key", "sekret-key")
    yield s
    s.proc.terminate()
    s.proc.wait(timeout=10)

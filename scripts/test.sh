#!/usr/bin/env bash
# The project's test command (README): every Rust test, then the checks that need Python
# packages (the gguf reader's view of our writer, the official OpenAI/Anthropic SDKs against
# `ds4 serve`). Python packages come from PyPI; nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q --disable-pip-version-check -r scripts/requirements-test.txt

cargo build --workspace
cargo test --workspace

# gguf-py must accept what our writer writes (files produced by the writer round-trip test).
export DS4_GGUF_PYCHECK_DIR="$PWD/target/gguf-pycheck"
rm -rf "$DS4_GGUF_PYCHECK_DIR"
cargo test -q -p ds4-gguf --test writer_roundtrip export_for_python_check
python3 scripts/gguf/check_with_gguf_py.py "$DS4_GGUF_PYCHECK_DIR/sample.gguf"

# The real `ds4 serve` driven by the official openai and anthropic SDKs (plus a scripted model
# for tool calls, which random weights never produce).
cargo build -p ds4-server --example scripted_serve
DS4_BIN="$PWD/target/debug/ds4" python3 -m pytest -q tests/server

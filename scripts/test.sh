#!/usr/bin/env bash
# The project's test command (README): every Rust test, then the checks that need Python
# packages (the gguf reader's view of our writer, the official OpenAI/Anthropic SDKs against
# `ds4 serve`). Python packages come from PyPI; nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q --disable-pip-version-check -r scripts/requirements-test.txt

# NVRTC (the nvidia-cuda-nvrtc wheel, pinned to CUDA 13.0 like the GPU machines' toolkit:
# later NVRTCs accept constructs 13.0 rejects, e.g. generic lambdas): with it every CUDA kernel
# module is compiled for sm_90a here too, so a kernel that does not compile fails CI without a
# GPU (the compile tests skip when the library is missing; GPU tests skip without a driver).
NVRTC_LIB=$(python3 -c "
import importlib.util, os
spec = importlib.util.find_spec('nvidia')
dirs = [os.path.join(p, 'cu13', 'lib') for p in (spec.submodule_search_locations if spec else [])]
print(next((d for d in dirs if os.path.isdir(d)), ''))")
if [ -n "$NVRTC_LIB" ]; then
    export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# (cargo test builds every binary and example too, with the test profile, into target/debug:
# the Python checks below run those; a separate `cargo build` compiled the workspace again at
# the dev profile's opt-level, ~4 of CI's 19 minutes.)
cargo test --workspace

# gguf-py must accept what our writer writes (files produced by the writer round-trip test).
export DS4_GGUF_PYCHECK_DIR="$PWD/target/gguf-pycheck"
rm -rf "$DS4_GGUF_PYCHECK_DIR"
cargo test -q -p ds4-gguf --test writer_roundtrip export_for_python_check
python3 scripts/gguf/check_with_gguf_py.py "$DS4_GGUF_PYCHECK_DIR/sample.gguf"

# The real `ds4 serve` driven by the official openai and anthropic SDKs (plus a scripted model
# for tool calls, which random weights never produce: the scripted_serve example, which cargo
# test built).
DS4_BIN="$PWD/target/debug/ds4" python3 -m pytest -q tests/server

# The GPU tools' own logic (scripts/gpu/critical_path.py and prefill_path.py, whose tables
# BENCHMARKS.md quotes).
python3 -m pytest -q tests/tools

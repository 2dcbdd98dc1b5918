#!/usr/bin/env bash
# Regenerates the tiny test model bundled into the `ds4` binary (crates/ds4-cli/assets/).
# It is the vocab_real fixture (random weights, 2 layers, hidden 8) with DeepSeek V4's real
# 129280-token vocabulary and tokenizer, converted to f16. Its output is meaningless; it lets
# `ds4` run end to end (chat, serve, tests) without the 81 GiB model.
# Usage: bash scripts/make_bundled_model.sh   (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
out=crates/ds4-cli/assets/tiny-test-model.gguf
mkdir -p "$(dirname "$out")"
# The ds4 binary embeds this file (include_bytes!), so it must exist for the converter to
# build; an empty placeholder is enough, the conversion replaces it.
[ -f "$out" ] || : > "$out"
cargo run -q -p ds4-cli -- convert tests/fixtures/models/vocab_real -o "$out" \
    --weights f16 --tokenizer tests/fixtures/tokenizer/tokenizer.json
size=$(stat -c %s "$out")
if [ "$size" -gt 12582912 ]; then
    echo "error: $out is $size bytes; the bundled model must stay under 12 MiB" >&2
    exit 1
fi
echo "$out: $size bytes, sha1 $(sha1sum "$out" | cut -d' ' -f1)"

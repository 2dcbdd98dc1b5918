#!/usr/bin/env bash
# Packs what a GPU run needs into DIR (default .dev/run, git-ignored) for the device tool's
# `carry` (64 MiB in all, with the tracked tree): the release `ds4`, the ds4-cuda GPU test
# binaries and gemv_bench, stripped and xz-compressed, plus unpack.sh. On the GPU machine (no
# Rust there):
#   bash DIR/unpack.sh && DIR/forward_fixtures --nocapture && DIR/ds4 bench ... --backend cuda
# or the whole acceptance run: bash scripts/gpu/sweep.sh DIR [PART...], or a decode A/B of
# two packs: bash scripts/gpu/ab.sh 3 DIR_A DIR_B.
# Binaries run from the repository root (the fixture tests find tests/fixtures there).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-.dev/run}
cargo build --release -p ds4-cli
TESTS=$(cargo test --release -p ds4-cuda --no-run 2>&1 |
    grep -oE 'target/release/deps/(ds4_cuda|forward_fixtures|decode_graph|kv_roundtrip|gpu_kernels|vector_ops_gpu|gemm_gpu|gemm_f16_gpu|gemm_experts_gpu|hc_gpu|index_select_gpu|index_scores_gpu)-[0-9a-f]+' || true)
rm -rf "$DIR" && mkdir -p "$DIR"
cp target/release/ds4 "$DIR/"
for t in $TESTS; do
    b=$(basename "$t")
    cp "$t" "$DIR/${b%-*}"
done
# gemv_bench from the same build (cargo test --no-run builds the examples from the tree of the
# moment: a copy taken later may be another tree's).
cp target/release/examples/gemv_bench "$DIR/"
strip "$DIR"/*
xz -T0 -6 "$DIR"/*
cat > "$DIR/unpack.sh" <<'UNPACK'
#!/usr/bin/env bash
# Decompresses the binaries next to this script (python's lzma: no xz needed there).
cd "$(dirname "$0")"
python3 -c "
import glob, lzma, os
for f in glob.glob('*.xz'):
    out = f[:-3]
    with lzma.open(f) as src, open(out, 'wb') as dst:
        dst.write(src.read())
    os.chmod(out, 0o755)"
UNPACK
chmod +x "$DIR/unpack.sh"
du -sh "$DIR"

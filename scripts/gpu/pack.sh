#!/usr/bin/env bash
# Packs what a GPU run needs into DIR (default .dev/run, git-ignored) for the device tool's
# `carry` (64 MiB in all, with the tracked tree): the release `ds4`, the ds4-cuda GPU test
# binaries and gemv_bench, stripped and xz-compressed, the kernels compiled (kernels.tar.xz,
# ~4 MB), plus unpack.sh. On the GPU machine (no Rust there):
#   bash DIR/unpack.sh $DS4_KERNEL_CACHE && DIR/forward_fixtures --nocapture && DIR/ds4 bench ...
# or the whole acceptance run: bash scripts/gpu/sweep.sh DIR [PART...], or a decode A/B of
# two packs: bash scripts/gpu/ab.sh 3 DIR_A DIR_B, or a prefill one: bash
# scripts/gpu/prefill_ab.sh DIR_A DIR_B.
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
# The tree's kernels compiled here (NVRTC only, no GPU) into .dev/kernel-cache, which keeps
# every version so that only changed modules compile again, and this tree's copied into the
# pack: a GPU machine whose NVRTC has the same major.minor (13.0 here and there) loads them
# instead of compiling for ~75 s. Skipped where no NVRTC is found (NVRTC_LIB: its folder).
NVRTC_LIB=${NVRTC_LIB:-$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2> /dev/null || true)}
cargo build --release -p ds4-cuda --example fill_kernel_cache
if LD_LIBRARY_PATH=$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} target/release/examples/fill_kernel_cache \
    .dev/kernel-cache --copy-to "$DIR/kernels" > /dev/null; then
    tar -C "$DIR" -cJf "$DIR/kernels.tar.xz" kernels && rm -rf "$DIR/kernels"
else
    rm -rf "$DIR/kernels"
    echo "pack.sh: no NVRTC here, so the pack carries no compiled kernels (NVRTC_LIB=its folder)"
fi
cat > "$DIR/unpack.sh" <<'UNPACK'
#!/usr/bin/env bash
# Decompresses the binaries next to this script (python's lzma: no xz needed there), and with
# a folder argument puts the pack's compiled kernels there (a DS4_KERNEL_CACHE folder).
cd "$(dirname "$0")"
python3 -c "
import glob, lzma, os, sys, tarfile
for f in glob.glob('*.xz'):
    if f.endswith('.tar.xz'):
        continue
    out = f[:-3]
    with lzma.open(f) as src, open(out, 'wb') as dst:
        dst.write(src.read())
    os.chmod(out, 0o755)
if len(sys.argv) > 1 and os.path.exists('kernels.tar.xz'):
    os.makedirs(sys.argv[1], exist_ok=True)
    with tarfile.open('kernels.tar.xz') as t:
        for m in t.getmembers():
            if m.isfile():
                with t.extractfile(m) as src, open(os.path.join(sys.argv[1], os.path.basename(m.name)), 'wb') as dst:
                    dst.write(src.read())" "$@"
UNPACK
chmod +x "$DIR/unpack.sh"
du -sh "$DIR"

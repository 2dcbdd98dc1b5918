//! The F16 × f32 GEMM of spans ([`Gpu::gemm_f16`]: the tensor-core kernels for columns that
//! are a multiple of 64, the CUDA-core kernel otherwise) against an f64 reference, on the
//! model's F16 shapes and ragged ones (rows and vectors off the tiles, k = 32, K chunks of
//! unequal length), and with activations far outside the f16 range; a vector's result has
//! the same bits whatever its batch, its place in the batch and the tile shape. Without CUDA
//! each test prints "skipped: no CUDA".
//! Throughput: `cargo test -p ds4-cuda --release --test gemm_f16_gpu -- --ignored --nocapture`.

mod common;

use common::{gpu, random_rows, Rng};
use ds4_cuda::gemm_f16::{gemm_f16_split, gemm_f16_tc_split, F16Kernel, F16TcTile, F16Tile};
use ds4_cuda::{DeviceBuffer, DeviceWeights, Gpu, WeightFormat};

/// Every output is within this fraction of Σ|w·x| (its terms' magnitudes) of the exact f64
/// sum. CUDA cores: an f32 chain of at most 512 fused multiply-adds per chunk plus at most 7
/// chunk additions stays near 1e-6 for random data (worst case ~3e-5 only with adversarial
/// signs). Tensor cores: 2^-22 relative per activation (hi + lo), the MMA's accumulation over
/// 64 columns, then one f32 add per 64 columns.
const REL_BOUND: f64 = 1e-5;

/// One problem: random F16 weights (and their f32 values), random activations.
struct Problem {
    rows: usize,
    cols: usize,
    n: usize,
    w: Vec<u8>,
    w32: Vec<f32>,
    x: Vec<f32>,
}

impl Problem {
    fn new(rng: &mut Rng, rows: usize, cols: usize, n: usize) -> Problem {
        let w = random_rows(rng, WeightFormat::F16, cols, rows);
        let w32 = w
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let x = rng.f32s(cols * n);
        Problem {
            rows,
            cols,
            n,
            w,
            w32,
            x,
        }
    }
}

/// The problem's weights on the GPU.
fn upload(g: &Gpu, p: &Problem) -> DeviceWeights {
    DeviceWeights::upload(&g.device, &p.w, 0, &mut |_, _| {}).unwrap()
}

/// y for vectors [v0, v0 + n) of `p`, with `kernel` (None: the automatic choice), from a
/// buffer pre-filled with NaNs so an unwritten output cannot pass.
fn run(
    g: &Gpu,
    dw: &DeviceWeights,
    p: &Problem,
    v0: usize,
    n: usize,
    kernel: Option<F16Kernel>,
) -> Vec<f32> {
    let m = dw.matrix(0, WeightFormat::F16, p.cols, p.rows, 1).unwrap();
    assert!(Gpu::gemm_f16_fits(&m));
    let x: DeviceBuffer<f32> = g
        .device
        .upload(&p.x[v0 * p.cols..(v0 + n) * p.cols])
        .unwrap();
    let mut y = g.device.alloc_filled::<f32>(n * p.rows, 0xFF).unwrap();
    match kernel {
        None => g.gemm_f16(&m, &x, n, &mut y).unwrap(),
        Some(F16Kernel::CudaCores(t)) => g.gemm_f16_with_tile(&m, &x, n, &mut y, t).unwrap(),
        Some(F16Kernel::TensorCores(t)) => g.gemm_f16_tc_with_tile(&m, &x, n, &mut y, t).unwrap(),
    }
    g.device.download(&y).unwrap()
}

/// Rows to check against f64: all of them for small products, otherwise every 7th row (7 is
/// prime to the 64- and 128-row tiles, so every position inside a tile is covered) and the
/// last 130 rows.
fn rows_to_check(rows: usize, cols: usize, n: usize) -> Vec<usize> {
    if rows * cols * n <= 1 << 26 {
        return (0..rows).collect();
    }
    (0..rows)
        .filter(|&r| r % 7 == 3 || r + 130 >= rows)
        .collect()
}

/// Checks the outputs against exact f64 sums; panics at the first one out of bounds. Returns
/// the worst |gpu − exact| / Σ|w·x|.
fn check_against_f64(y: &[f32], p: &Problem, what: &str) -> f64 {
    let mut worst = 0f64;
    let rows = rows_to_check(p.rows, p.cols, p.n);
    for v in 0..p.n {
        let xv = &p.x[v * p.cols..(v + 1) * p.cols];
        for &r in &rows {
            let wr = &p.w32[r * p.cols..(r + 1) * p.cols];
            let (mut exact, mut mag) = (0f64, 0f64);
            for (a, b) in wr.iter().zip(xv) {
                let t = *a as f64 * *b as f64;
                exact += t;
                mag += t.abs();
            }
            let got = y[v * p.rows + r] as f64;
            let err = (got - exact).abs() / mag.max(f64::MIN_POSITIVE);
            assert!(
                err <= REL_BOUND,
                "{what}: first bad output: row {r}, vector {v}: expected {exact:.9e}, got {got:.9e} (|err| / sum|w*x| = {err:.3e} > {REL_BOUND:e})"
            );
            worst = worst.max(err);
        }
    }
    worst
}

/// Panics at the first output whose bits differ: `got` holds vectors [v0, ..) of `want`'s
/// batch (which starts at vector 0).
fn assert_same_bits(got: &[f32], want: &[f32], rows: usize, v0: usize, what: &str) {
    let want = &want[v0 * rows..v0 * rows + got.len()];
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: row {}, vector {}: expected {:e} ({:#010x}), got {:e} ({:#010x})",
            i % rows,
            v0 + i / rows,
            want[i],
            want[i].to_bits(),
            got[i],
            got[i].to_bits()
        );
    }
}

/// Checks `p` with the automatic kernel against f64, every other tile of the same family for
/// the same bits, and slices of the batch (at an offset off the vector tiles, the last vector
/// alone) for the bits of the whole batch. Returns the automatic kernel.
fn check_problem(g: &Gpu, p: &Problem) -> F16Kernel {
    let dw = upload(g, p);
    let m = dw.matrix(0, WeightFormat::F16, p.cols, p.rows, 1).unwrap();
    let (rows, cols, n) = (p.rows, p.cols, p.n);
    let kernel = g.gemm_f16_kernel(&m, n);
    let split = match kernel {
        F16Kernel::CudaCores(_) => gemm_f16_split(cols),
        F16Kernel::TensorCores(_) => gemm_f16_tc_split(rows, cols),
    };
    let what = format!("{rows}x{cols} x{n} ({kernel:?}, split {split})");
    let y = run(g, &dw, p, 0, n, None);
    let worst = check_against_f64(&y, p, &what);
    println!("gemm_f16 {what}: worst |gpu - f64| / sum|w*x| = {worst:.3e}");
    // The other tile shapes of the family give the same bits (the order is the K split's).
    let others = match kernel {
        F16Kernel::CudaCores(_) => [
            F16Kernel::CudaCores(F16Tile::Wide),
            F16Kernel::CudaCores(F16Tile::Narrow),
        ],
        F16Kernel::TensorCores(_) => [
            F16Kernel::TensorCores(F16TcTile::Wide),
            F16Kernel::TensorCores(F16TcTile::Narrow),
        ],
    };
    for k in others {
        let yt = run(g, &dw, p, 0, n, Some(k));
        assert_same_bits(&yt, &y, rows, 0, &format!("{what} with {k:?}"));
    }
    let (v0, len) = (n / 3, (n - n / 3).min(17));
    let part = run(g, &dw, p, v0, len, None);
    assert_same_bits(
        &part,
        &y,
        rows,
        v0,
        &format!("{what}: vectors {v0}.. as a batch of {len}"),
    );
    let one = run(g, &dw, p, n - 1, 1, None);
    assert_same_bits(
        &one,
        &y,
        rows,
        n - 1,
        &format!("{what}: the last vector alone"),
    );
    kernel
}

#[test]
fn gemm_f16_matches_f64_and_does_not_depend_on_batch_or_tile() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(31);
    // (rows, cols, vectors): the model's shapes (router 256 x 4096, compressors 1024 and 512
    // x 4096, indexer 8192 x 1024 and 64 x 4096) at batches that pick wide and narrow tiles,
    // then ragged ones: rows and vectors off every tile, one 64-column block, 576 and 4160
    // columns (chunks of unequal length), a single row, 2048 columns.
    let tensor = [
        (256usize, 4096usize, 300usize),
        (1024, 4096, 200),
        (512, 4096, 48),
        (8192, 1024, 160),
        (64, 4096, 1024),
        (8192, 1024, 5),
        (77, 64, 65),
        (200, 576, 19),
        (130, 4160, 40),
        (1, 1024, 16),
        (129, 2048, 100),
        (1000, 1024, 130),
    ];
    // Columns that are not a multiple of 64 go to the CUDA-core kernel: 96, 32 (one K tile),
    // 544 and 4128 (chunks of 8 and 9, 16 and 17 K tiles), 1056.
    let cuda_cores = [
        (77usize, 96usize, 65usize),
        (33, 32, 17),
        (200, 544, 19),
        (130, 4128, 40),
        (1, 1056, 16),
    ];
    for &(rows, cols, n) in &tensor {
        let p = Problem::new(&mut rng, rows, cols, n);
        let k = check_problem(g, &p);
        assert!(
            matches!(k, F16Kernel::TensorCores(_)),
            "{rows}x{cols}: {k:?}"
        );
    }
    for &(rows, cols, n) in &cuda_cores {
        let p = Problem::new(&mut rng, rows, cols, n);
        let k = check_problem(g, &p);
        assert!(matches!(k, F16Kernel::CudaCores(_)), "{rows}x{cols}: {k:?}");
    }
}

/// The CUDA-core kernel, which the tensor-core shapes no longer use, still meets the bound on
/// them (it stays the fallback for other column counts).
#[test]
fn gemm_f16_cuda_cores_match_f64_on_the_model_shapes() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(32);
    for &(rows, cols, n) in &[
        (256usize, 4096usize, 40usize),
        (8192, 1024, 20),
        (129, 2048, 33),
    ] {
        let p = Problem::new(&mut rng, rows, cols, n);
        let dw = upload(g, &p);
        let tile = g.gemm_f16_tile(rows, cols, n);
        let y = run(g, &dw, &p, 0, n, Some(F16Kernel::CudaCores(tile)));
        let what = format!("{rows}x{cols} x{n} (CUDA cores, {tile:?})");
        let worst = check_against_f64(&y, &p, &what);
        println!("gemm_f16 {what}: worst |gpu - f64| / sum|w*x| = {worst:.3e}");
    }
}

/// Activations far outside the f16 range (and far below its normal range) keep the tensor
/// cores' accuracy: each 64-column block is scaled by its own power of two. Vectors scaled by
/// 1e-30 .. 1e30, zero vectors, and spikes 1e4 above the rest of their block.
#[test]
fn gemm_f16_tensor_cores_take_any_activation_range() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(33);
    let (rows, cols, n) = (130usize, 1024usize, 24usize);
    let mut p = Problem::new(&mut rng, rows, cols, n);
    let scales = [1e-30f32, 1e-6, 1.0, 1e4, 1e6, 1e30, 0.0, 1.0];
    for v in 0..n {
        let xv = &mut p.x[v * cols..(v + 1) * cols];
        let s = scales[v % scales.len()];
        for (i, x) in xv.iter_mut().enumerate() {
            *x *= s;
            // Every 8th vector: a spike every 100 columns.
            if v % 8 == 7 && i % 100 == 3 {
                *x = 1e4;
            }
        }
    }
    let dw = upload(g, &p);
    let m = dw.matrix(0, WeightFormat::F16, cols, rows, 1).unwrap();
    assert!(matches!(
        g.gemm_f16_kernel(&m, n),
        F16Kernel::TensorCores(_)
    ));
    let y = run(g, &dw, &p, 0, n, None);
    let worst = check_against_f64(&y, &p, "scaled activations");
    println!("gemm_f16 scaled activations: worst |gpu - f64| / sum|w*x| = {worst:.3e}");
    for v in (6..n).step_by(8) {
        assert!(
            y[v * rows..(v + 1) * rows].iter().all(|&o| o == 0.0),
            "a zero vector gives zeros"
        );
    }
}

#[test]
fn gemm_f16_rejects_what_it_cannot_take() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(5);
    let w = random_rows(&mut rng, WeightFormat::F16, 48, 8);
    let dw = DeviceWeights::upload(&g.device, &w, 0, &mut |_, _| {}).unwrap();
    let m = dw.matrix(0, WeightFormat::F16, 48, 8, 1).unwrap();
    assert!(!Gpu::gemm_f16_fits(&m), "48 columns are not whole K tiles");
    let x = g.device.upload(&rng.f32s(48 * 2)).unwrap();
    let mut y = g.device.alloc::<f32>(16).unwrap();
    let e = g.gemm_f16(&m, &x, 2, &mut y).unwrap_err();
    assert!(e.to_string().contains("multiple of 32"), "{e}");
    let w = random_rows(&mut rng, WeightFormat::F16, 64, 8);
    let dw = DeviceWeights::upload(&g.device, &w, 0, &mut |_, _| {}).unwrap();
    let m = dw.matrix(0, WeightFormat::F16, 64, 8, 1).unwrap();
    let short = g.device.upload(&rng.f32s(64)).unwrap();
    let e = g.gemm_f16(&m, &short, 2, &mut y).unwrap_err();
    assert!(e.to_string().contains("2 vectors"), "{e}");
}

/// Microseconds per call of the prefill shapes at 1 024, 256 and 64 vectors: the CUDA-core
/// kernel (its automatic tile) against the tensor-core kernels (automatic choice, then at
/// 1 024 vectors every tile and split, for tuning gemm_f16_tc_split; other splits give other
/// bits) (`--ignored --nocapture`; run with --release).
#[test]
#[ignore]
fn gemm_f16_throughput() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(77);
    let iters = 30;
    for n in [1024usize, 256, 64] {
        for (rows, cols) in [
            (256usize, 4096usize),
            (1024, 4096),
            (512, 4096),
            (8192, 1024),
            (64, 4096),
        ] {
            let p = Problem::new(&mut rng, rows, cols, n);
            let dw = upload(g, &p);
            let m = dw.matrix(0, WeightFormat::F16, cols, rows, 1).unwrap();
            let x = g.device.upload(&p.x).unwrap();
            let mut y = g.device.alloc::<f32>(rows * n).unwrap();
            // None: the CUDA-core kernel; Some((tile, split)): the tensor cores.
            let mut time = |k: Option<(F16TcTile, usize)>| -> f64 {
                let go = |y: &mut _| match k {
                    None => {
                        let t = g.gemm_f16_tile(rows, cols, n);
                        g.gemm_f16_with_tile(&m, &x, n, y, t).unwrap()
                    }
                    Some((t, s)) => g.gemm_f16_tc_with_split(&m, &x, n, y, t, s).unwrap(),
                };
                go(&mut y); // warm-up and lookup
                let start = g.device.record_event().unwrap();
                for _ in 0..iters {
                    go(&mut y);
                }
                let end = g.device.record_event().unwrap();
                g.device.elapsed_ms(&start, &end).unwrap() as f64 / iters as f64 * 1e3
            };
            let cuda = time(None);
            let (tile, split) = (
                g.gemm_f16_tc_tile(rows, cols, n),
                gemm_f16_tc_split(rows, cols),
            );
            let tc = time(Some((tile, split)));
            let tflops = |us: f64| 2.0 * (rows * cols * n) as f64 / us * 1e-6;
            let mut line = format!(
                "gemm_f16 {rows}x{cols} x{n}: CUDA cores {cuda:.1} us ({:.1} TFLOPS), tensor cores {tc:.1} us ({tile:?}, split {split}, {:.1} TFLOPS)",
                tflops(cuda),
                tflops(tc)
            );
            if n == 1024 {
                for t in [F16TcTile::Wide, F16TcTile::Narrow] {
                    line += &format!(";  {t:?}:");
                    for s in [1usize, 2, 4, 8] {
                        line += &format!(" s{s} {:.1}", time(Some((t, s))));
                    }
                }
            }
            eprintln!("{line}");
        }
    }
}

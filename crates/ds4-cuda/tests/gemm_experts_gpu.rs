//! The tensor-core grouped expert GEMM ([`Gpu::expert_gemm_grouped`] and its pair form) against
//! ds4-gguf's scalar `vec_dot_{iq2_xxs,q2_k,q4_k}`, bit for bit, on random weights and Q8_K
//! activations. On a machine without CUDA each GPU test prints "skipped: no CUDA" and passes.
//!
//! Timing (on the GPU machine): `cargo test -p ds4-cuda --release --test gemm_experts_gpu --
//! --ignored --nocapture expert_gemm_throughput`.

mod common;

use common::{gpu, random_rows, Rng};
use ds4_cuda::{ActQuant, Activations, DeviceMatrix, DeviceWeights, Gpu, QuantizedActivations};
use ds4_cuda::{DeviceBuffer, WeightFormat};
use ds4_gguf::quant::{self, BlockQ8K};

/// The scalar reference dot product of one weight row of `format`.
fn scalar_dot(format: WeightFormat, row: &[u8], act: &[BlockQ8K]) -> f32 {
    match format {
        WeightFormat::IQ2XXS => quant::scalar::vec_dot_iq2_xxs(row, act),
        WeightFormat::Q2K => quant::scalar::vec_dot_q2_k(row, act),
        WeightFormat::Q4K => quant::scalar::vec_dot_q4_k(row, act),
        f => panic!("no expert GEMM for {f:?}"),
    }
}

/// Σ|w·x| of one row (dequantized weights times dequantized activations, f64): the scale of
/// a mismatch, to tell a rounding-order slip (~1e-7 of it) from a layout bug (~1).
fn abs_dot(format: WeightFormat, row: &[u8], act: &[BlockQ8K]) -> f64 {
    let cols = act.len() * 256;
    let mut w = vec![0f32; cols];
    quant::dequantize(format.ggml(), row, &mut w).unwrap();
    let mut s = 0f64;
    for (b, a) in act.iter().enumerate() {
        for (i, &q) in a.qs.iter().enumerate() {
            s += (w[256 * b + i] as f64 * q as f64 * a.d as f64).abs();
        }
    }
    s
}

/// Q8_K activations of `n` random vectors of `cols` values (CPU quantizer).
fn cpu_activations(rng: &mut Rng, cols: usize, n: usize) -> Vec<Vec<BlockQ8K>> {
    (0..n)
        .map(|_| quant::quantize_q8_k_activation(&rng.f32s(cols)))
        .collect()
}

/// The CPU activations in the device layout: all int8 values, then one scale per block.
fn upload_activations(g: &Gpu, acts: &[Vec<BlockQ8K>], cols: usize) -> QuantizedActivations {
    let q: Vec<i8> = acts.iter().flatten().flat_map(|b| b.qs).collect();
    let d: Vec<f32> = acts.iter().flatten().map(|b| b.d).collect();
    QuantizedActivations {
        kind: ActQuant::Q8K,
        len: cols,
        n_vecs: acts.len(),
        q: g.device.upload(&q).unwrap(),
        d: g.device.upload(&d).unwrap(),
    }
}

/// Expert of each vector for `group_start` (-1: in no group).
fn experts_of_vectors(group_start: &[i32], n_vecs: usize) -> Vec<i32> {
    let mut ids = vec![-1i32; n_vecs];
    for (e, w) in group_start.windows(2).enumerate() {
        for id in &mut ids[w[0] as usize..w[1] as usize] {
            *id = e as i32;
        }
    }
    ids
}

/// Group offsets: `head` ungrouped vectors, then the groups of `sizes` in expert order.
fn offsets(head: usize, sizes: &[usize]) -> Vec<i32> {
    let mut g = vec![head as i32];
    for &s in sizes {
        g.push(g.last().unwrap() + s as i32);
    }
    g
}

/// One stack of experts: host bytes, and the device copy placed `offset` bytes into its buffer.
struct Stack {
    bytes: Vec<u8>,
    dev: DeviceWeights,
    offset: usize,
}

impl Stack {
    fn new(
        g: &Gpu,
        rng: &mut Rng,
        format: WeightFormat,
        cols: usize,
        rows: usize,
        experts: usize,
        offset: usize,
    ) -> Stack {
        let bytes = random_rows(rng, format, cols, rows * experts);
        let mut region = vec![0u8; offset];
        region.extend_from_slice(&bytes);
        let dev = DeviceWeights::upload(&g.device, &region, 0, &mut |_, _| {}).unwrap();
        Stack { bytes, dev, offset }
    }

    fn matrix(
        &self,
        format: WeightFormat,
        cols: usize,
        rows: usize,
        experts: usize,
    ) -> DeviceMatrix<'_> {
        self.dev
            .matrix(self.offset, format, cols, rows, experts)
            .unwrap()
    }
}

/// A mismatch found by [`check_outputs`].
struct Bad {
    vector: usize,
    expert: i32,
    row: usize,
    got: f32,
    want: f32,
}

/// Checks y (vector-major, `rows` per vector) against the scalar dot products: vectors of
/// expert e against stack rows of e, bit for bit; vectors in no group must be NaN in every row.
/// `check(v, r)` picks the outputs to compare (the NaN rows are always checked). Panics with a
/// summary of the first mismatches (position inside the 64-row / 32-vector tiles, error
/// relative to Σ|w·x|) so that one GPU run tells a numerics slip from a layout bug.
#[allow(clippy::too_many_arguments)]
fn check_outputs(
    what: &str,
    format: WeightFormat,
    y: &[f32],
    stack: &[u8],
    rows: usize,
    acts: &[Vec<BlockQ8K>],
    group_start: &[i32],
    check: &(dyn Fn(usize, usize) -> bool + Sync),
) {
    let n_vecs = acts.len();
    let ids = experts_of_vectors(group_start, n_vecs);
    let experts = group_start.len() - 1;
    let expert_bytes = stack.len() / experts;
    let row_bytes = expert_bytes / rows;
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let per = n_vecs.div_ceil(threads);
    let bad: Vec<Bad> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let ids = &ids;
                s.spawn(move || {
                    let mut bad = Vec::new();
                    for v in (t * per)..((t + 1) * per).min(n_vecs) {
                        let e = ids[v];
                        for r in 0..rows {
                            let got = y[v * rows + r];
                            if e < 0 {
                                if !got.is_nan() {
                                    bad.push(Bad {
                                        vector: v,
                                        expert: e,
                                        row: r,
                                        got,
                                        want: f32::NAN,
                                    });
                                }
                                continue;
                            }
                            if !check(v, r) {
                                continue;
                            }
                            let at = e as usize * expert_bytes + r * row_bytes;
                            let want = scalar_dot(format, &stack[at..at + row_bytes], &acts[v]);
                            if got.to_bits() != want.to_bits() {
                                bad.push(Bad {
                                    vector: v,
                                    expert: e,
                                    row: r,
                                    got,
                                    want,
                                });
                            }
                        }
                    }
                    bad
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    if bad.is_empty() {
        return;
    }
    let mut msg = format!(
        "{what}: {} outputs differ from the scalar vec_dot; first ones:\n",
        bad.len()
    );
    for b in bad.iter().take(12) {
        let first = if b.expert >= 0 {
            group_start[b.expert as usize] as usize
        } else {
            0
        };
        let scale = if b.expert >= 0 {
            let at = b.expert as usize * expert_bytes + b.row * row_bytes;
            abs_dot(format, &stack[at..at + row_bytes], &acts[b.vector])
        } else {
            f64::NAN
        };
        msg += &format!(
            "  vector {} (expert {}, #{} of its group: pass {} slot {}) row {} (tile row {}, warp {} lane row {}): gpu {:e} ({:#010x}) vs cpu {:e} ({:#010x}), |diff| / Σ|wx| = {:.2e}\n",
            b.vector,
            b.expert,
            b.vector.wrapping_sub(first),
            b.vector.wrapping_sub(first) / 32,
            b.vector.wrapping_sub(first) % 32,
            b.row,
            b.row % 64,
            (b.row % 64) / 16,
            b.row % 16,
            b.got,
            b.got.to_bits(),
            b.want,
            b.want.to_bits(),
            (b.got as f64 - b.want as f64).abs() / scale
        );
    }
    let rows_hit: std::collections::BTreeSet<usize> = bad.iter().map(|b| b.row % 64).collect();
    let slots_hit: std::collections::BTreeSet<usize> = bad
        .iter()
        .filter(|b| b.expert >= 0)
        .map(|b| (b.vector - group_start[b.expert as usize] as usize) % 32)
        .collect();
    msg += &format!("  tile rows hit: {rows_hit:?}\n  pass slots hit: {slots_hit:?}");
    panic!("{msg}");
}

/// Group sizes for `experts` experts: empty first and last experts, one of 37 (two narrow
/// passes of a CTA), 1, 32, 33, 65 (two wide passes) and 130 (three wide passes, five narrow)
/// vectors where there is room, the rest 1..=17.
fn ragged_sizes(experts: usize, salt: usize) -> Vec<usize> {
    (0..experts)
        .map(|e| match e {
            0 => 0,
            _ if e == experts - 1 => 0,
            1 => 37,
            2 => 1,
            3 => 32,
            4 => 33,
            5 => 65,
            6 => 130,
            _ => 1 + (7 * e + 3 * salt) % 17,
        })
        .collect()
}

/// Every format and pass width on ragged shapes: partial row tiles, block counts with a partial
/// last K tile, rows that are not 16-byte aligned (2-byte copies), groups of 0, 1, 32, 33, 37,
/// 65 and 130 vectors, vectors before the first and after the last group (NaN rows). Every
/// output is compared with the scalar CPU dot product, and the pair launch with two single
/// launches.
#[test]
fn expert_gemm_matches_scalar_vec_dot_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(81);
    // (format, cols, rows, experts, byte offset of the stack in its buffer, vectors before the
    // first group)
    let cases: &[(WeightFormat, usize, usize, usize, usize, usize)] = &[
        (WeightFormat::IQ2XXS, 4096, 100, 8, 0, 2),
        (WeightFormat::IQ2XXS, 2048, 64, 6, 2, 0), // unaligned stack
        (WeightFormat::IQ2XXS, 1280, 70, 3, 0, 1), // 330-byte rows, 5 blocks
        (WeightFormat::Q2K, 2048, 130, 8, 0, 0),
        (WeightFormat::Q2K, 1280, 64, 3, 0, 2), // 420-byte rows, 5 blocks
        (WeightFormat::Q4K, 2048, 100, 8, 0, 1),
        (WeightFormat::Q4K, 1280, 64, 3, 16, 0), // aligned, partial last K tile
        (WeightFormat::Q4K, 2048, 64, 6, 2, 0),  // unaligned stack
    ];
    for (ci, &(format, cols, rows, experts, offset, head)) in cases.iter().enumerate() {
        let sizes = ragged_sizes(experts, ci);
        let group_start = offsets(head, &sizes);
        let n_vecs = *group_start.last().unwrap() as usize + 3; // 3 vectors after the last group
        let stacks = [
            Stack::new(g, &mut rng, format, cols, rows, experts, offset),
            Stack::new(g, &mut rng, format, cols, rows, experts, offset),
        ];
        let mats = [
            stacks[0].matrix(format, cols, rows, experts),
            stacks[1].matrix(format, cols, rows, experts),
        ];
        let acts = cpu_activations(&mut rng, cols, n_vecs);
        let qa = upload_activations(g, &acts, cols);
        let x = Activations::Quantized(&qa);
        let dgroups = g.device.upload(&group_start).unwrap();
        for pass in Gpu::EXPERT_GEMM_PASSES {
            let what = format!(
            "{format:?} {cols}x{rows}x{experts} offset {offset} groups {group_start:?}, passes of {pass}"
        );

            // Zero-filled: an unwritten output fails the comparison (and a NaN row must be written).
            let mut singles = Vec::new();
            for (s, m) in stacks.iter().zip(&mats) {
                let mut dy = g.device.alloc_filled::<f32>(n_vecs * rows, 0).unwrap();
                g.expert_gemm_grouped_pass(pass, m, &dgroups, x, n_vecs, &mut dy)
                    .unwrap();
                let y = g.device.download(&dy).unwrap();
                check_outputs(
                    &what,
                    format,
                    &y,
                    &s.bytes,
                    rows,
                    &acts,
                    &group_start,
                    &|_, _| true,
                );
                singles.push(y);
            }
            let mut p0 = g.device.alloc_filled::<f32>(n_vecs * rows, 0).unwrap();
            let mut p1 = g.device.alloc_filled::<f32>(n_vecs * rows, 0).unwrap();
            g.expert_gemm_grouped_pair_pass(
                pass,
                [&mats[0], &mats[1]],
                &dgroups,
                x,
                n_vecs,
                [&mut p0, &mut p1],
            )
            .unwrap();
            for (single, pair, which) in [(&singles[0], &p0, "first"), (&singles[1], &p1, "second")]
            {
                let pair = g.device.download(pair).unwrap();
                for (i, (a, b)) in single.iter().zip(&pair).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{what}: {which} stack, vector {} row {}: single {a} vs pair {b}",
                        i / rows,
                        i % rows
                    );
                }
            }
            eprintln!("{what}: {n_vecs} vectors bit-equal to the scalar vec_dot; pair = singles");
        }
    }
}

/// Routing like the model's: `tokens` tokens each pick `k` distinct experts (skewed toward low
/// ids, so some groups are large and some empty). Returns the group sizes.
fn routed_sizes(rng: &mut Rng, experts: usize, tokens: usize, k: usize) -> Vec<usize> {
    routed_sizes_with(rng, experts, tokens, k, true)
}

/// [`routed_sizes`], or with `skew` false every expert equally likely.
fn routed_sizes_with(
    rng: &mut Rng,
    experts: usize,
    tokens: usize,
    k: usize,
    skew: bool,
) -> Vec<usize> {
    let mut sizes = vec![0usize; experts];
    for _ in 0..tokens {
        let mut picked: Vec<usize> = Vec::new();
        while picked.len() < k {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let e = ((if skew { u * u } else { u } * experts as f64) as usize).min(experts - 1);
            if !picked.contains(&e) {
                picked.push(e);
            }
        }
        for e in picked {
            sizes[e] += 1;
        }
    }
    sizes
}

/// The model's expert shapes: gate/up (2048 rows × 4096 columns, as a pair) and down (4096 ×
/// 2048), 256 experts, 256 tokens × 6 slots = 1536 vectors (skewed routing: the largest groups
/// hold over 64 vectors), for the q2 (IQ2_XXS gate/up, Q2_K down) and q4 (Q4_K) models. With
/// narrow passes a third of the outputs (every row and every vector) are compared with the
/// scalar CPU dot product; the wide passes' outputs must equal the narrow ones bit for bit.
#[test]
fn expert_gemm_model_shapes_match_scalar_vec_dot() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(82);
    let (experts, tokens, k) = (256usize, 256usize, 6usize);
    let sizes = routed_sizes(&mut rng, experts, tokens, k);
    let group_start = offsets(0, &sizes);
    let n_vecs = tokens * k;
    let largest = *sizes.iter().max().unwrap();
    let empty = sizes.iter().filter(|&&s| s == 0).count();
    eprintln!("routing: largest group {largest}, {empty} empty experts");
    assert!(largest > 64, "some group takes more than one wide pass");
    let dgroups = g.device.upload(&group_start).unwrap();
    let sample = |v: usize, r: usize| (v + r).is_multiple_of(3);
    // (format, cols, rows, pair)
    for &(format, cols, rows, pair) in &[
        (WeightFormat::IQ2XXS, 4096usize, 2048usize, true),
        (WeightFormat::Q2K, 2048, 4096, false),
        (WeightFormat::Q4K, 4096, 2048, true),
        (WeightFormat::Q4K, 2048, 4096, false),
    ] {
        let acts = cpu_activations(&mut rng, cols, n_vecs);
        let qa = upload_activations(g, &acts, cols);
        let x = Activations::Quantized(&qa);
        let what = format!("{format:?} {cols}x{rows}x{experts}, {n_vecs} vectors");
        let n_stacks = if pair { 2 } else { 1 };
        let stacks: Vec<Stack> = (0..n_stacks)
            .map(|_| Stack::new(g, &mut rng, format, cols, rows, experts, 0))
            .collect();
        let mats: Vec<DeviceMatrix> = stacks
            .iter()
            .map(|s| s.matrix(format, cols, rows, experts))
            .collect();
        let run = |pass: usize| -> Vec<Vec<f32>> {
            let mut ys: Vec<DeviceBuffer<f32>> = (0..n_stacks)
                .map(|_| g.device.alloc_filled::<f32>(n_vecs * rows, 0).unwrap())
                .collect();
            if pair {
                let (a, b) = ys.split_at_mut(1);
                g.expert_gemm_grouped_pair_pass(
                    pass,
                    [&mats[0], &mats[1]],
                    &dgroups,
                    x,
                    n_vecs,
                    [&mut a[0], &mut b[0]],
                )
                .unwrap();
            } else {
                g.expert_gemm_grouped_pass(pass, &mats[0], &dgroups, x, n_vecs, &mut ys[0])
                    .unwrap();
            }
            ys.iter().map(|dy| g.device.download(dy).unwrap()).collect()
        };
        let [narrow, wide] = Gpu::EXPERT_GEMM_PASSES;
        let ys = run(narrow);
        for (i, (s, y)) in stacks.iter().zip(&ys).enumerate() {
            check_outputs(
                &format!("{what} stack {i}"),
                format,
                y,
                &s.bytes,
                rows,
                &acts,
                &group_start,
                &sample,
            );
        }
        for (i, (yn, yw)) in ys.iter().zip(&run(wide)).enumerate() {
            for (j, (a, b)) in yn.iter().zip(yw).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{what} stack {i}, vector {} row {}: passes of {narrow} give {a}, of {wide} {b}",
                    j / rows,
                    j % rows
                );
            }
        }
        eprintln!(
            "{what}{}: sampled outputs bit-equal to the scalar vec_dot; passes of {wide} = of {narrow}",
            if pair { " (pair)" } else { "" }
        );
    }
}

/// Argument errors name the problem; offsets on the device that are out of range or
/// decreasing are clamped (never an access outside x or y).
#[test]
fn expert_gemm_checks_arguments_and_clamps_offsets() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(83);
    let (format, cols, rows, experts, n_vecs) =
        (WeightFormat::Q2K, 1024usize, 80usize, 3usize, 6usize);
    let stack = Stack::new(g, &mut rng, format, cols, rows, experts, 0);
    let m = stack.matrix(format, cols, rows, experts);
    let acts = cpu_activations(&mut rng, cols, n_vecs);
    let qa = upload_activations(g, &acts, cols);
    let x = Activations::Quantized(&qa);
    let xf = rng.f32s(cols * n_vecs);
    let dx = g.device.upload(&xf).unwrap();
    let mut q80 = g.alloc_quantized(ActQuant::Q8_0, cols, n_vecs).unwrap();
    g.quantize_activations(&dx, &mut q80).unwrap();
    let groups = g.device.upload(&[0i32, 2, 4, 6]).unwrap();
    let mut y = g.device.alloc_filled::<f32>(n_vecs * rows, 0).unwrap();
    let err = |r: ds4_cuda::error::Result<()>| r.unwrap_err().to_string();

    let short = g.device.upload(&[0i32, 2, 4]).unwrap();
    let e = err(g.expert_gemm_grouped(&m, &short, x, n_vecs, &mut y));
    assert!(
        e.contains("group offset buffer") && e.contains("needs 4"),
        "{e}"
    );
    let e = err(g.expert_gemm_grouped(&m, &groups, Activations::F32(&dx), n_vecs, &mut y));
    assert!(e.contains("quantized activations"), "{e}");
    let e = err(g.expert_gemm_grouped(&m, &groups, Activations::Quantized(&q80), n_vecs, &mut y));
    assert!(e.contains("Q8K activations"), "{e}");
    let e = err(g.expert_gemm_grouped(&m, &groups, x, n_vecs + 1, &mut y));
    assert!(e.contains("7 vectors"), "{e}");
    let mut small = g.device.alloc_filled::<f32>(n_vecs * rows - 1, 0).unwrap();
    let e = err(g.expert_gemm_grouped(&m, &groups, x, n_vecs, &mut small));
    assert!(e.contains("output"), "{e}");
    let q8 = Stack::new(g, &mut rng, WeightFormat::Q8_0, cols, rows, experts, 0);
    let m8 = q8.matrix(WeightFormat::Q8_0, cols, rows, experts);
    let e = err(g.expert_gemm_grouped(&m8, &groups, Activations::Quantized(&q80), n_vecs, &mut y));
    assert!(e.contains("only IQ2_XXS, Q2_K and Q4_K"), "{e}");
    let m_half = stack.matrix(format, cols, rows / 2, experts);
    let mut y2 = g.device.alloc_filled::<f32>(n_vecs * rows, 0).unwrap();
    let e = err(g.expert_gemm_grouped_pair([&m, &m_half], &groups, x, n_vecs, [&mut y, &mut y2]));
    assert!(e.contains("different shapes"), "{e}");
    let e = err(g.expert_gemm_grouped_pass(48, &m, &groups, x, n_vecs, &mut y));
    assert!(e.contains("passes of 48 vectors"), "{e}");
    // Zero vectors: nothing to do, no launch.
    g.expert_gemm_grouped(&m, &groups, x, 0, &mut y).unwrap();

    // Clamped to [0, 3, 1, 6]: expert 0 takes vectors 0..3, expert 1 none (its end is below
    // its start), expert 2 vectors 1..6, so vectors 1 and 2 are written by two experts (either
    // expert's row may land; both are candidates).
    let bad = g.device.upload(&[-5i32, 3, 1, 99]).unwrap();
    let mut yb = g.device.alloc_filled::<f32>(n_vecs * rows, 0).unwrap();
    g.expert_gemm_grouped(&m, &bad, x, n_vecs, &mut yb).unwrap();
    let yb = g.device.download(&yb).unwrap();
    let expert_bytes = stack.bytes.len() / experts;
    let row_bytes = expert_bytes / rows;
    for (i, b) in yb.iter().enumerate() {
        let (v, r) = (i / rows, i % rows);
        let candidates: &[usize] = match v {
            0 => &[0],
            1 | 2 => &[0, 2],
            _ => &[2],
        };
        let ok = candidates.iter().any(|&e| {
            let at = e * expert_bytes + r * row_bytes;
            scalar_dot(format, &stack.bytes[at..at + row_bytes], &acts[v]).to_bits() == b.to_bits()
        });
        assert!(
            ok,
            "vector {v} row {r}: {b} is no candidate expert's row ({candidates:?})"
        );
    }
}

/// Prefill MoE timing at the model's shapes (256 tokens × 6 slots, and the token counts in
/// `DS4_GE_TOKENS`, comma-separated), for both pass widths; at 256 tokens also against the dp4a
/// grouped GEMV. Prints ms, the weight bandwidth (every expert's rows once) and TOPS.
#[test]
#[ignore]
fn expert_gemm_throughput() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(84);
    let (experts, k) = (256usize, 6usize);
    let token_counts: Vec<usize> = std::env::var("DS4_GE_TOKENS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![256]);
    let iters = 10;
    for &(format, cols, rows) in &[
        (WeightFormat::IQ2XXS, 4096usize, 2048usize),
        (WeightFormat::Q2K, 2048, 4096),
        (WeightFormat::Q4K, 4096, 2048),
        (WeightFormat::Q4K, 2048, 4096),
    ] {
        let stacks = [
            Stack::new(g, &mut rng, format, cols, rows, experts, 0),
            Stack::new(g, &mut rng, format, cols, rows, experts, 0),
        ];
        let mats = [
            stacks[0].matrix(format, cols, rows, experts),
            stacks[1].matrix(format, cols, rows, experts),
        ];
        for (tokens, skew) in token_counts.iter().flat_map(|&t| [(t, true), (t, false)]) {
            let sizes = routed_sizes_with(&mut rng, experts, tokens, k, skew);
            eprintln!(
                "{tokens} tokens, {} routing: largest group {}",
                if skew { "skewed" } else { "uniform" },
                sizes.iter().max().unwrap()
            );
            let group_start = offsets(0, &sizes);
            let n_vecs = tokens * k;
            let dgroups = g.device.upload(&group_start).unwrap();
            let acts = cpu_activations(&mut rng, cols, n_vecs);
            let qa = upload_activations(g, &acts, cols);
            let x = Activations::Quantized(&qa);
            let mut y0 = g.device.alloc::<f32>(n_vecs * rows).unwrap();
            let mut y1 = g.device.alloc::<f32>(n_vecs * rows).unwrap();
            let mut time =
                |f: &mut dyn FnMut(&mut DeviceBuffer<f32>, &mut DeviceBuffer<f32>)| -> f64 {
                    f(&mut y0, &mut y1); // warm-up (and the kernel lookup)
                    let start = g.device.record_event().unwrap();
                    for _ in 0..iters {
                        f(&mut y0, &mut y1);
                    }
                    let end = g.device.record_event().unwrap();
                    g.device.elapsed_ms(&start, &end).unwrap() as f64 / iters as f64
                };
            let wbytes = stacks[0].bytes.len() as f64;
            let ops = 2.0 * (rows * cols * n_vecs) as f64;
            for pass in Gpu::EXPERT_GEMM_PASSES {
                let gemm = time(&mut |y, _| {
                    g.expert_gemm_grouped_pass(pass, &mats[0], &dgroups, x, n_vecs, y)
                        .unwrap()
                });
                let pair = time(&mut |a, b| {
                    g.expert_gemm_grouped_pair_pass(
                        pass,
                        [&mats[0], &mats[1]],
                        &dgroups,
                        x,
                        n_vecs,
                        [a, b],
                    )
                    .unwrap()
                });
                eprintln!(
                    "{format:?} {rows}x{cols} x{experts} experts, {n_vecs} vectors, passes of {pass}: gemm {gemm:.3} ms ({:.2} TB/s weights, {:.1} TOPS); pair {pair:.3} ms",
                    wbytes / gemm * 1e-9,
                    ops / gemm * 1e-9,
                );
            }
            if tokens == 256 && skew {
                let gemv = time(&mut |y, _| {
                    g.expert_gemv_grouped(&mats[0], &dgroups, x, n_vecs, y)
                        .unwrap()
                });
                let gemv_pair = time(&mut |a, b| {
                    g.expert_gemv_grouped_pair([&mats[0], &mats[1]], &dgroups, x, n_vecs, [a, b])
                        .unwrap()
                });
                eprintln!("  dp4a grouped GEMV: {gemv:.3} ms, pair {gemv_pair:.3} ms");
            }
        }
    }
}

//! Shared by the GPU tests and the benchmark example: a seeded RNG, random ggml weight rows
//! with sane scales, and the shared GPU handle.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaModule, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use ds4_cuda::compile::{compile_cubin, COMMON_CUH};
use ds4_cuda::{cuda_available, Gpu, WeightFormat};

/// xorshift64*: deterministic, dependency-free test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill_bytes(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.next_u64() as u8;
        }
    }
    pub fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn put_f16(blk: &mut [u8], at: usize, v: f32) {
    blk[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// `rows` random rows of `cols` elements in `format`: random quant bits, scales chosen so
/// dequantized values stay O(0.01–1) (every bit pattern of the other fields is valid).
pub fn random_rows(rng: &mut Rng, format: WeightFormat, cols: usize, rows: usize) -> Vec<u8> {
    let ty = format.ggml();
    let row_bytes = ty.row_bytes(cols as u64).expect("whole blocks") as usize;
    let mut out = vec![0u8; row_bytes * rows];
    match format {
        WeightFormat::F32 => {
            for c in out.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.f32().to_le_bytes());
            }
        }
        WeightFormat::F16 => {
            for c in out.chunks_exact_mut(2) {
                put_f16(c, 0, rng.f32());
            }
        }
        _ => {
            rng.fill_bytes(&mut out);
            let bb = ty.block_bytes();
            for blk in out.chunks_exact_mut(bb) {
                let d = 0.002 + 0.02 * rng.f32().abs();
                let dmin = 0.002 + 0.02 * rng.f32().abs();
                match format {
                    WeightFormat::Q8_0 | WeightFormat::IQ2XXS => put_f16(blk, 0, d),
                    WeightFormat::Q2K => {
                        put_f16(blk, 80, d);
                        put_f16(blk, 82, dmin);
                    }
                    WeightFormat::Q4K => {
                        put_f16(blk, 0, d);
                        put_f16(blk, 2, dmin);
                    }
                    _ => unreachable!(),
                }
            }
        }
    }
    out
}

/// The process-wide GPU, or None (after printing "skipped: no CUDA") on machines without one.
pub fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    let g = GPU.get_or_init(|| {
        if !cuda_available() {
            return None;
        }
        Some(Gpu::open(0).unwrap_or_else(|e| panic!("a GPU is present but cannot be opened: {e}")))
    });
    if g.is_none() {
        eprintln!("skipped: no CUDA");
    }
    g.as_ref()
}

/// Compiles a kernel module from `sources` (after common.cuh, as the engine does) for the test
/// GPU and loads it.
pub fn load_module(g: &Gpu, name: &str, sources: &[&str]) -> Arc<CudaModule> {
    let src = std::iter::once(COMMON_CUH)
        .chain(sources.iter().copied())
        .collect::<Vec<_>>()
        .join("\n");
    let cubin = compile_cubin(name, &src, &g.device.nvrtc_arch()).unwrap();
    g.device
        .context()
        .load_module(Ptx::from_binary(cubin))
        .unwrap()
}

/// Launches kernel `name` of `module` with 8-byte arguments (addresses, counts, doubles as bit
/// patterns: every parameter of the forward modules is 8 bytes) and waits for it.
///
/// # Safety
/// `args` must be the kernel's parameter list, with buffers sized for the accesses its grid
/// makes.
pub unsafe fn launch_u64(
    g: &Gpu,
    module: &Arc<CudaModule>,
    name: &str,
    cfg: LaunchConfig,
    args: &[u64],
) {
    let f = module.load_function(name).unwrap();
    let stream = g.device.stream();
    let mut b = stream.launch_builder(&f);
    for a in args {
        b.arg(a);
    }
    // SAFETY: forwarded to the caller.
    unsafe { b.launch(cfg) }.unwrap();
    g.device.synchronize().unwrap();
}

/// Index of the largest logit (the first on ties), as greedy decoding picks it.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

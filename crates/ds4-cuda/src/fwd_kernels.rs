//! The forward pass's own kernel modules (hc.cu, attention.cu, compressor.cu, moe.cu,
//! tokens.cu), compiled with NVRTC through the same disk cache as the foundation's modules, and
//! a launcher.
//!
//! Every kernel of these modules takes only 8-byte parameters (u64 device addresses, i64
//! counts, double scalars), so a launch is a list of u64 bit patterns ([`KArg`]).

use cudarc::driver::{CudaFunction, LaunchConfig};

use crate::compile::{KernelCache, COMMON_CUH};
use crate::device::CudaDevice;
use crate::error::{DriverContext, Result};
use crate::kernels::ModuleSet;

const FWD_COMMON: &str = include_str!("fwd_common.cuh");

/// The forward pass's modules: name and source.
pub(crate) const FORWARD_MODULES: &[(&str, &str)] = &[
    // hc_pre_norm ends with vector_ops.cu's RMS norm (row_norm.cuh, shared with it).
    (
        "fwd_hc",
        concat!(include_str!("row_norm.cuh"), "\n", include_str!("hc.cu")),
    ),
    ("fwd_attention", include_str!("attention.cu")),
    ("fwd_compressor", include_str!("compressor.cu")),
    ("fwd_moe", include_str!("moe.cu")),
    ("fwd_tokens", include_str!("tokens.cu")),
];

/// A kernel argument: every parameter of these modules is 8 bytes wide.
#[derive(Clone, Copy)]
pub struct KArg(u64);

/// Conversions into kernel arguments (device addresses, counts, scalars).
pub trait IntoArg {
    fn arg(self) -> KArg;
}
impl IntoArg for u64 {
    fn arg(self) -> KArg {
        KArg(self)
    }
}
impl IntoArg for usize {
    fn arg(self) -> KArg {
        KArg(self as u64)
    }
}
impl IntoArg for i64 {
    fn arg(self) -> KArg {
        KArg(self as u64)
    }
}
impl IntoArg for bool {
    fn arg(self) -> KArg {
        KArg(self as u64)
    }
}
impl IntoArg for f64 {
    fn arg(self) -> KArg {
        KArg(self.to_bits())
    }
}
impl IntoArg for f32 {
    fn arg(self) -> KArg {
        KArg((self as f64).to_bits())
    }
}

/// Builds a `[KArg]` from values of mixed types.
macro_rules! kargs {
    ($($v:expr),* $(,)?) => { [$($crate::fwd_kernels::IntoArg::arg($v)),*] };
}
pub(crate) use kargs;

/// The compiled forward modules of one device.
pub struct ForwardKernels {
    modules: ModuleSet,
}

impl ForwardKernels {
    pub fn load(device: &CudaDevice, cache: &KernelCache) -> Result<ForwardKernels> {
        let (modules, _stats) = ModuleSet::load(device, cache, forward_sources())?;
        Ok(ForwardKernels { modules })
    }

    /// A kernel of these modules, e.g. to set a launch attribute (more than 48 KiB of dynamic
    /// shared memory) before [`ForwardKernels::launch`].
    pub(crate) fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        self.modules.function(module, name)
    }

    /// Launches `module::name` on the device's stream.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list (count and meaning), and every device
    /// address in it must be valid for the accesses the kernel makes with `cfg`.
    pub(crate) unsafe fn launch(
        &self,
        device: &CudaDevice,
        module: &'static str,
        name: &str,
        cfg: LaunchConfig,
        args: &[KArg],
    ) -> Result<()> {
        let f = self.modules.function(module, name)?;
        let mut b = device.launch_args(&f);
        for a in args {
            b.arg(&a.0);
        }
        // SAFETY: forwarded to the caller; every parameter is 8 bytes, as each KArg.
        device
            .launch_timed(name, 0, || unsafe { b.launch(cfg) })
            .ctx(name)?;
        Ok(())
    }
}

/// Each forward module's name and the full source NVRTC compiles for it.
fn forward_sources() -> impl Iterator<Item = (&'static str, String)> {
    FORWARD_MODULES
        .iter()
        .map(|(name, src)| (*name, format!("{COMMON_CUH}\n{FWD_COMMON}\n{src}")))
}

/// Every kernel module of the crate (the matrix modules, then the forward pass's): its name
/// and the full source NVRTC compiles, e.g. to read the machine code without a GPU
/// (examples/dump_cubins.rs).
pub fn all_module_sources() -> Vec<(&'static str, String)> {
    crate::kernels::MODULES
        .iter()
        .map(|m| (m.name, m.full_source()))
        .chain(forward_sources())
        .collect()
}

/// Compiles every forward module for `arch` without a GPU (NVRTC only), e.g. to check the
/// sources on a build machine.
pub fn compile_forward_modules(arch: &str) -> Result<()> {
    for (name, source) in forward_sources() {
        crate::compile::compile_cubin(name, &source, arch)?;
    }
    Ok(())
}

/// A 1-D launch of `threads` threads in blocks of 256 (grid capped; kernels grid-stride).
pub(crate) fn grid_1d(threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (threads.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One CTA of `threads` per item, with `shared` bytes of dynamic shared memory.
pub(crate) fn per_item(items: usize, threads: u32, shared: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

/// What the forward kernels' GPU unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use super::ForwardKernels;
    use crate::compile::KernelCache;
    use crate::device::CudaDevice;

    /// The GPU and the forward modules, or None (after saying "skipped: no CUDA") without one.
    pub(crate) fn gpu() -> Option<(CudaDevice, ForwardKernels)> {
        if !crate::device::cuda_available() {
            eprintln!("skipped: no CUDA");
            return None;
        }
        let dev = CudaDevice::open(0).expect("a GPU is present but cannot be opened");
        let fk = ForwardKernels::load(&dev, &KernelCache::from_env()).unwrap();
        Some((dev, fk))
    }

    /// A xorshift64 stream from `seed` (nonzero): reproducible test inputs.
    pub(crate) fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FORWARD_MODULES;
    use crate::kernels::MODULES;

    /// The bodies of the `__global__` functions of `src` that do not begin with PDL_ENTRY() or
    /// PDL_ENTRY_AFTER(prologue) (common.cuh: a prologue that touches nothing a previous kernel
    /// writes, then PDL_ENTRY()).
    fn kernels_without_pdl_entry(src: &str) -> Vec<String> {
        let mut missing = Vec::new();
        let mut at = 0;
        while let Some(i) = src[at..].find("__global__").map(|i| at + i) {
            let open = src[i..].find('{').map(|j| i + j);
            at = i + "__global__".len();
            let Some(open) = open else { break };
            let head = &src[i..open];
            if head.contains(';') {
                continue; // a declaration, not a definition
            }
            // (Kernels defined by a macro continue their lines with backslashes.)
            let body = src[open + 1..].trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            if !body.starts_with("PDL_ENTRY();") && !body.starts_with("PDL_ENTRY_AFTER(") {
                missing.push(head.split_whitespace().collect::<Vec<_>>().join(" "));
            }
        }
        missing
    }

    /// route's picks and weights against a host selection over the scores it left in place:
    /// top-k by (score + bias, NaN lowest) descending, lowest index on ties, for expert counts
    /// inside and beyond the experts it keeps in registers (1 024).
    #[test]
    fn route_picks_the_top_k_with_ties_by_lowest_index() {
        use super::per_item;
        use super::test_support::{gpu, xorshift};
        let Some((dev, fk)) = gpu() else { return };
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for (e_count, k, with_bias) in [
            (7usize, 6usize, false),
            (256, 6, true),
            (256, 8, false),
            (1300, 6, true),
        ] {
            let n_tok = 5;
            // Few distinct logits, so that many experts tie; one NaN per token.
            let logits: Vec<f32> = (0..n_tok * e_count)
                .map(|i| {
                    if i % e_count == 3 {
                        f32::NAN
                    } else {
                        (next() % 9) as f32 * 0.75 - 3.0
                    }
                })
                .collect();
            let bias: Vec<f32> = (0..e_count)
                .map(|_| {
                    if with_bias {
                        (next() % 4) as f32 * 0.25
                    } else {
                        0.0
                    }
                })
                .collect();
            let dl = dev.upload(&logits).unwrap();
            let db = dev.upload(&bias).unwrap();
            let ids = dev.alloc_filled::<i32>(n_tok * k, 0xFF).unwrap();
            let wts = dev.alloc_filled::<f32>(n_tok * k, 0xFF).unwrap();
            let routed_scale = 1.5f64;
            let a = kargs![
                dl.ptr(),
                if with_bias { db.ptr() } else { 0 },
                0u64,
                0u64,
                ids.ptr(),
                wts.ptr(),
                n_tok,
                e_count,
                k,
                routed_scale,
                true
            ];
            // SAFETY: route reads n_tok × E logits (rewritten as scores) and E biases, writes
            // n_tok × k ids and weights: the buffers above; no tid2eid table.
            unsafe {
                fk.launch(&dev, "fwd_moe", "route", per_item(n_tok, 256, 0), &a)
                    .unwrap()
            };
            let scores = dev.download(&dl).unwrap();
            let got_ids = dev.download(&ids).unwrap();
            let got_wts = dev.download(&wts).unwrap();
            for t in 0..n_tok {
                let s = &scores[t * e_count..(t + 1) * e_count];
                let key = |e: usize| {
                    let v = if with_bias { s[e] + bias[e] } else { s[e] };
                    if v.is_nan() {
                        f32::NEG_INFINITY
                    } else {
                        v
                    }
                };
                let mut order: Vec<usize> = (0..e_count).collect();
                order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
                let want: Vec<i32> = order[..k].iter().map(|&e| e as i32).collect();
                assert_eq!(
                    &got_ids[t * k..(t + 1) * k],
                    &want[..],
                    "E {e_count} k {k} token {t}"
                );
                let mut sum = 0f32;
                for &e in &want {
                    sum += s[e as usize];
                }
                let denom = sum.max(6.1035e-5);
                for (j, &e) in want.iter().enumerate() {
                    let w = s[e as usize] / denom * routed_scale as f32;
                    assert_eq!(got_wts[t * k + j].to_bits(), w.to_bits(), "weight {j}");
                }
            }
        }
    }

    /// Every kernel is launched with programmatic dependent launch (device.rs), which is only
    /// correct when it waits for its predecessor before touching memory: PDL_ENTRY() first.
    #[test]
    fn every_kernel_begins_with_pdl_entry() {
        let sources = MODULES
            .iter()
            .map(|m| (m.name, m.source))
            .chain(FORWARD_MODULES.iter().copied());
        let mut checked = 0;
        for (name, src) in sources {
            checked += src.matches("__global__").count();
            let missing = kernels_without_pdl_entry(src);
            assert!(
                missing.is_empty(),
                "{name}: kernels without PDL_ENTRY(): {missing:?}"
            );
        }
        assert!(checked > 40, "only {checked} kernels found");
        assert_eq!(
            kernels_without_pdl_entry("__global__ void k(int* p) { p[0] = 1; }").len(),
            1
        );
        assert!(kernels_without_pdl_entry(
            "__global__ void k(int* p) { PDL_ENTRY_AFTER(pre(p)); p[0] = 1; }"
        )
        .is_empty());
        // A kernel of a macro, its body's first line continued.
        assert!(kernels_without_pdl_entry(
            "__global__ void k(int* p) {  \\\n    PDL_ENTRY(); p[0] = 1; }"
        )
        .is_empty());
    }
}

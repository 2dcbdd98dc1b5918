//! The kernel modules, compiled once per process and device, and the [`Gpu`] handle that
//! every operation hangs off.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig};
use cudarc::nvrtc::Ptx;
use ds4_gguf::quant::dequantize;
use ds4_gguf::GgmlType;

use crate::compile::{CompileStats, KernelCache, COMMON_CUH};
use crate::device::{CudaDevice, DeviceBuffer};
use crate::error::{CudaError, DriverContext, Result};

/// Warps per CTA of the GEMV kernels unless changed with [`Gpu::set_gemv_warps`].
pub const DEFAULT_GEMV_WARPS: usize = 4;

/// One `.cu` file: its name (also the cache file prefix) and source.
pub struct ModuleSource {
    pub name: &'static str,
    pub source: &'static str,
}

impl ModuleSource {
    /// The text NVRTC compiles: the common header, then the module.
    pub fn full_source(&self) -> String {
        format!("{COMMON_CUH}\n{}", self.source)
    }
}

/// Every kernel module of the crate.
pub const MODULES: &[ModuleSource] = &[
    ModuleSource {
        name: "gemv",
        source: include_str!("gemv.cu"),
    },
    ModuleSource {
        name: "vector_ops",
        // row_norm.cuh: the segment helpers and row RMS norm it shares with hc.cu.
        source: concat!(
            include_str!("row_norm.cuh"),
            "\n",
            include_str!("vector_ops.cu")
        ),
    },
    ModuleSource {
        name: "gemm_f16",
        source: include_str!("gemm_f16.cu"),
    },
    ModuleSource {
        name: "dequant",
        source: include_str!("dequant.cu"),
    },
    ModuleSource {
        name: "gemm_q8",
        source: include_str!("gemm_q8.cu"),
    },
    ModuleSource {
        name: "gemm_experts",
        source: include_str!("gemm_experts.cu"),
    },
];

/// The most dynamic shared memory any kernel's block opts into: the prefill GEMMs' tiles (the
/// attention kernels size theirs to what the GPU offers).
pub(crate) fn largest_shared_need() -> usize {
    [
        crate::gemm::largest_shared_bytes(),
        crate::gemm_experts::largest_shared_bytes(),
        crate::gemm_f16::F16TcTile::Wide.shared_bytes(),
        crate::gemm_f16::F16TcTile::Narrow.shared_bytes(),
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
}

/// Compiled modules of one device, each loaded from the disk cache (or compiled) once, and the
/// kernels looked up in them, remembered by (module, name).
pub(crate) struct ModuleSet {
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<(&'static str, String), CudaFunction>>,
}

impl ModuleSet {
    /// Compiles (or reads from `cache`) each `(name, full source)` for `device` and loads it.
    pub(crate) fn load(
        device: &CudaDevice,
        cache: &KernelCache,
        sources: impl IntoIterator<Item = (&'static str, String)>,
    ) -> Result<(ModuleSet, Vec<CompileStats>)> {
        let info = device.info();
        crate::compile::require_supported(
            &info.name,
            info.compute_capability,
            info.max_shared_per_block_optin,
            largest_shared_need(),
        )?;
        let arch = device.nvrtc_arch();
        let mut modules = HashMap::new();
        let mut stats = Vec::new();
        for (name, source) in sources {
            let (cubin, st) = cache.get_or_compile(name, &source, &arch)?;
            let module = device
                .context()
                .load_module(Ptx::from_binary(cubin))
                .ctx(&format!("loading kernel module {name}"))?;
            modules.insert(name, module);
            stats.push(st);
        }
        let set = ModuleSet {
            modules,
            functions: Mutex::default(),
        };
        Ok((set, stats))
    }

    /// A kernel by module and name (looked up once, then remembered).
    pub(crate) fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        let key = (module, name.to_string());
        if let Some(f) = cache.get(&key) {
            return Ok(f.clone());
        }
        let m = self
            .modules
            .get(module)
            .ok_or_else(|| CudaError::InvalidArgument(format!("no kernel module {module}")))?;
        let f = m
            .load_function(name)
            .ctx(&format!("looking up kernel {name}"))?;
        cache.insert(key, f.clone());
        Ok(f)
    }
}

/// The compiled modules of one device and the tables the kernels read.
pub struct Kernels {
    modules: ModuleSet,
    /// How each module was obtained (compiled or cached, and how long it took).
    pub stats: Vec<CompileStats>,
    /// The IQ2_XXS codebook, 256 × u64 (byte j = coordinate j).
    pub(crate) iq2xxs_grid: DeviceBuffer<u64>,
}

/// A device with its kernels loaded: the entry point of the backend.
pub struct Gpu {
    pub device: CudaDevice,
    pub kernels: Kernels,
    /// Warps per CTA of the GEMV kernels (a tuning knob; see [`Gpu::set_gemv_warps`]).
    gemv_warps: AtomicUsize,
    /// Most GEMV CTAs per multiprocessor, 0 = one CTA per row group (see
    /// [`Gpu::set_gemv_grid_cap`]).
    gemv_ctas_per_sm: AtomicUsize,
    /// cuBLAS and the f16 scratch of [`Gpu::gemm_q8_0_f16`], made on first use.
    pub(crate) f16_gemm: crate::gemm_cublas::F16GemmState,
}

impl Gpu {
    /// Opens GPU `ordinal` and loads (compiling or from the disk cache) every kernel module.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        Gpu::open_with_cache(ordinal, &KernelCache::from_env())
    }

    pub fn open_with_cache(ordinal: usize, cache: &KernelCache) -> Result<Gpu> {
        let device = CudaDevice::open(ordinal)?;
        let kernels = Kernels::load(&device, cache)?;
        // Tuning knobs for measurements (every value gives the same results):
        // DS4_CUDA_GEMV_WARPS (1..=8) and DS4_CUDA_GEMV_CAP (CTAs per SM, 0 = no cap).
        let knob = |name: &str, ok: std::ops::RangeInclusive<usize>| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|v| ok.contains(v))
        };
        Ok(Gpu {
            device,
            kernels,
            gemv_warps: AtomicUsize::new(
                knob("DS4_CUDA_GEMV_WARPS", 1..=crate::gemv::GEMV_MAX_WARPS)
                    .unwrap_or(DEFAULT_GEMV_WARPS),
            ),
            gemv_ctas_per_sm: AtomicUsize::new(knob("DS4_CUDA_GEMV_CAP", 0..=64).unwrap_or(0)),
            f16_gemm: Default::default(),
        })
    }

    /// Sets the warps per CTA of the GEMV kernels (1..=8). Every value gives the same results;
    /// it trades CTA count against per-CTA overhead (BENCHMARKS.md has the sweep).
    pub fn set_gemv_warps(&self, warps: usize) -> Result<()> {
        if !(1..=crate::gemv::GEMV_MAX_WARPS).contains(&warps) {
            return Err(CudaError::InvalidArgument(format!(
                "GEMV warps per block {warps} not in 1..=8"
            )));
        }
        self.gemv_warps.store(warps, Ordering::Relaxed);
        Ok(())
    }

    pub fn gemv_warps(&self) -> usize {
        self.gemv_warps.load(Ordering::Relaxed)
    }

    /// Caps the GEMV grid at `ctas_per_sm` CTAs per multiprocessor (None: one CTA per row
    /// group, the default). With a cap each warp walks several row groups, prefetching the
    /// next group while it computes the current one. Results do not depend on it.
    pub fn set_gemv_grid_cap(&self, ctas_per_sm: Option<usize>) {
        self.gemv_ctas_per_sm
            .store(ctas_per_sm.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn gemv_grid_cap(&self) -> Option<usize> {
        Some(self.gemv_ctas_per_sm.load(Ordering::Relaxed)).filter(|&c| c > 0)
    }

    /// Launches kernel `name` of `module` with one argument pack.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, order and type, and every
    /// pointer in them must be valid for the accesses the kernel makes with this config.
    pub(crate) unsafe fn launch<A: cudarc::driver::DeviceRepr>(
        &self,
        module: &'static str,
        name: &str,
        (label, bytes): (&str, usize),
        cfg: LaunchConfig,
        args: &[&A],
    ) -> Result<()> {
        let f = self.kernels.function(module, name)?;
        let mut b = self.device.launch_args(&f);
        for a in args {
            b.arg(*a);
        }
        // SAFETY: forwarded to the caller (see above).
        self.device
            .launch_timed(label, bytes, || unsafe { b.launch(cfg) })
            .ctx(name)?;
        Ok(())
    }
}

impl Kernels {
    /// Compiles (or reads from `cache`) and loads every module for `device`.
    pub fn load(device: &CudaDevice, cache: &KernelCache) -> Result<Kernels> {
        let (modules, stats) = ModuleSet::load(
            device,
            cache,
            MODULES.iter().map(|m| (m.name, m.full_source())),
        )?;
        let iq2xxs_grid = device.upload(&iq2xxs_grid()?)?;
        Ok(Kernels {
            modules,
            stats,
            iq2xxs_grid,
        })
    }

    /// A kernel by module and name (looked up once, then remembered).
    pub fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        self.modules.function(module, name)
    }
}

/// The IQ2_XXS codebook, read back through ds4-gguf's public dequantizer (one source of truth
/// for the table): a block with d = 1, scale nibble 0 and no signs decodes group entry k to
/// `0.125 · grid[k]`, which is exact in f32.
pub fn iq2xxs_grid() -> Result<Vec<u64>> {
    let mut grid = vec![0u64; 256];
    let one_f16 = half::f16::from_f32(1.0).to_bits().to_le_bytes();
    for b in 0..8 {
        let mut blk = [0u8; 66];
        blk[..2].copy_from_slice(&one_f16);
        for g in 0..8 {
            let first = (32 * b + 4 * g) as u32;
            let a0 = first | (first + 1) << 8 | (first + 2) << 16 | (first + 3) << 24;
            blk[2 + 8 * g..6 + 8 * g].copy_from_slice(&a0.to_le_bytes());
        }
        let mut vals = [0f32; 256];
        dequantize(GgmlType::IQ2XXS, &blk, &mut vals)
            .map_err(|e| CudaError::InvalidArgument(format!("IQ2_XXS grid: {e}")))?;
        for (j, chunk) in vals.chunks_exact(8).enumerate() {
            let mut entry = 0u64;
            for (m, &v) in chunk.iter().enumerate() {
                let byte = (v * 8.0).round();
                if ![8.0, 25.0, 43.0].contains(&byte) {
                    return Err(CudaError::InvalidArgument(format!(
                        "IQ2_XXS grid value {v} unexpected"
                    )));
                }
                entry |= (byte as u64) << (8 * m);
            }
            grid[32 * b + j] = entry;
        }
    }
    Ok(grid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iq2xxs_grid_is_a_permutation_free_codebook() {
        let g = iq2xxs_grid().unwrap();
        // The first entry of ggml's table is all 8s; entries are distinct.
        assert_eq!(g[0], 0x0808080808080808);
        let mut s = g.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 256);
    }
}

//! Run-time kernel compilation with NVRTC, cached on disk.
//!
//! Each kernel module is a `.cu` file beside the Rust that launches it, embedded with
//! `include_str!` and prefixed with `common.cuh`. It is compiled to a CUBIN for the exact GPU
//! (`sm_90a` on Hopper). The CUBIN is cached under `$DS4_KERNEL_CACHE`, else
//! `$XDG_CACHE_HOME/ds4/kernels`, else `~/.cache/ds4/kernels`; the file name holds the SHA-1 of
//! everything that affects the code (source, options, arch, NVRTC version), and files are
//! written to a temporary name and renamed, so concurrent processes never read half a file.
//! Compiling needs libnvrtc but no GPU.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use sha1::{Digest, Sha1};

use crate::error::{CudaError, Result};

/// Device helpers prepended to every module.
pub const COMMON_CUH: &str = include_str!("common.cuh");

/// NVRTC options used for every module (part of the cache key). `--device-as-default-execution-space`:
/// every function here is device code, and NVRTC 13.0 otherwise treats an unannotated
/// function (the call operator of a generic lambda) as host code and rejects it.
pub const NVRTC_OPTIONS: &[&str] = &[
    "--std=c++17",
    "-lineinfo",
    "--device-as-default-execution-space",
];

/// The kernels need compute capability 9.0 or later (Hopper, Blackwell): the prefill GEMMs copy
/// their tiles with the TMA engine and cluster launches, and decode chains its kernels by
/// programmatic dependent launch. Their tiles also need `need` bytes of shared memory per
/// block, which data-center parts offer (227 KiB) and some others do not (~99 KiB on compute
/// capability 12.x). A GPU short of either gets an error naming it, before any compile.
pub fn require_supported(
    name: &str,
    (major, minor): (i32, i32),
    shared_optin: usize,
    need: usize,
) -> Result<()> {
    if major < 9 {
        return Err(CudaError::Unsupported(format!(
            "the CUDA backend needs a GPU of compute capability 9.0 or later (Hopper, Blackwell); \
             {name} is {major}.{minor}"
        )));
    }
    if shared_optin < need {
        return Err(CudaError::Unsupported(format!(
            "the CUDA backend's prefill kernels need {} KiB of shared memory per block; {name} \
             offers {} KiB",
            need.div_ceil(1024),
            shared_optin / 1024
        )));
    }
    Ok(())
}

/// The NVRTC target for a compute capability: Hopper gets the arch-specific `sm_90a`.
pub fn arch_for((major, minor): (i32, i32)) -> String {
    if major == 9 && minor == 0 {
        "sm_90a".into()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// The loaded NVRTC library's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !crate::device::nvrtc_present() {
        return Err(CudaError::LibraryMissing("libnvrtc.so not found".into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC writes two ints through valid pointers.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Compile {
            module: "-".into(),
            arch: "-".into(),
            log: format!("nvrtcVersion: {e:?}"),
        })?;
    Ok((major, minor))
}

/// How a module was obtained, for logs and benchmarks.
#[derive(Clone, Debug)]
pub struct CompileStats {
    pub module: String,
    pub cache_hit: bool,
    /// Wall time of the compile, or of reading the cached file.
    pub millis: f64,
    pub cubin_bytes: usize,
}

/// Compiles `source` (already including the common header) to a CUBIN for `arch`.
/// On failure the error carries NVRTC's log.
pub fn compile_cubin(module: &str, source: &str, arch: &str) -> Result<Vec<u8>> {
    let err = |log: String| CudaError::Compile {
        module: module.into(),
        arch: arch.into(),
        log,
    };
    if !crate::device::nvrtc_present() {
        return Err(err("libnvrtc.so not found".into()));
    }
    let src = CString::new(source).map_err(|_| err("source contains a NUL byte".into()))?;
    let name = CString::new(format!("{module}.cu")).map_err(|_| err("bad module name".into()))?;
    let prog = nvrtc::create_program(&src, Some(&name))
        .map_err(|e| err(format!("nvrtcCreateProgram: {e:?}")))?;
    let mut options: Vec<String> = vec![format!("--gpu-architecture={arch}")];
    options.extend(NVRTC_OPTIONS.iter().map(|s| s.to_string()));
    // SAFETY: `prog` is a live program created above; it is destroyed exactly once below, after
    // the last call that uses it. `src` and `name` outlive it.
    let outcome = unsafe {
        let compiled = nvrtc::compile_program(prog, &options);
        let log = nvrtc::get_program_log(prog)
            .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
            .unwrap_or_default();
        let cubin = match compiled {
            Err(e) => Err(err(format!("{e:?}\n{log}"))),
            Ok(()) => get_cubin(prog).map_err(|e| err(format!("nvrtcGetCUBIN: {e:?}\n{log}"))),
        };
        let _ = nvrtc::destroy_program(prog);
        cubin
    };
    outcome
}

/// # Safety
/// `prog` must be a live, successfully compiled program.
unsafe fn get_cubin(
    prog: nvrtc_sys::nvrtcProgram,
) -> std::result::Result<Vec<u8>, nvrtc_sys::nvrtcResult> {
    let mut size = 0usize;
    nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
        .result()
        .map_err(|e| e.0)?;
    let mut out = vec![0u8; size];
    nvrtc_sys::nvrtcGetCUBIN(prog, out.as_mut_ptr().cast())
        .result()
        .map_err(|e| e.0)?;
    Ok(out)
}

/// The on-disk CUBIN cache.
#[derive(Clone, Debug)]
pub struct KernelCache {
    dir: Option<PathBuf>,
}

impl KernelCache {
    /// The default location (see the module docs); caching is off when no home is known.
    pub fn from_env() -> KernelCache {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let dir = env("DS4_KERNEL_CACHE")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("ds4/kernels")))
            .or_else(|| env("HOME").map(|d| d.join(".cache/ds4/kernels")));
        KernelCache { dir }
    }

    pub fn at(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache {
            dir: Some(dir.into()),
        }
    }

    /// No disk cache: every load compiles.
    pub fn disabled() -> KernelCache {
        KernelCache { dir: None }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The cache key: SHA-1 over module name, source, options, arch and NVRTC version.
    pub fn key(module: &str, source: &str, arch: &str, nvrtc: (i32, i32)) -> String {
        let mut h = Sha1::new();
        for part in [
            module,
            source,
            &NVRTC_OPTIONS.join(" "),
            arch,
            &format!("nvrtc {}.{}", nvrtc.0, nvrtc.1),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Where the CUBIN of `module` for `arch` is cached (None: caching is off), under the
    /// installed NVRTC's version.
    pub fn path(&self, module: &str, source: &str, arch: &str) -> Result<Option<PathBuf>> {
        let nvrtc = nvrtc_version()?;
        Ok(self.dir.as_ref().map(|d| {
            d.join(format!(
                "{module}-{arch}-{}.cubin",
                Self::key(module, source, arch, nvrtc)
            ))
        }))
    }

    /// The CUBIN of `module` for `arch`, from the cache or freshly compiled (then stored).
    /// A cache that cannot be written only costs the next run a compile; it is not an error.
    pub fn get_or_compile(
        &self,
        module: &str,
        source: &str,
        arch: &str,
    ) -> Result<(Vec<u8>, CompileStats)> {
        let start = Instant::now();
        let path = self.path(module, source, arch)?;
        if let Some(path) = &path {
            if let Ok(bytes) = std::fs::read(path) {
                if looks_like_cubin(&bytes) {
                    let stats = CompileStats {
                        module: module.into(),
                        cache_hit: true,
                        millis: start.elapsed().as_secs_f64() * 1e3,
                        cubin_bytes: bytes.len(),
                    };
                    return Ok((bytes, stats));
                }
            }
        }
        let cubin = compile_cubin(module, source, arch)?;
        let stats = CompileStats {
            module: module.into(),
            cache_hit: false,
            millis: start.elapsed().as_secs_f64() * 1e3,
            cubin_bytes: cubin.len(),
        };
        if let Some(path) = &path {
            if let Err(e) = store_atomically(path, &cubin) {
                eprintln!("ds4-cuda: not caching kernels ({e})");
            }
        }
        Ok((cubin, stats))
    }
}

/// A CUBIN is an ELF file; anything else in the cache (truncated, foreign) is recompiled.
fn looks_like_cubin(bytes: &[u8]) -> bool {
    bytes.len() > 64 && bytes.starts_with(b"\x7fELF")
}

fn store_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| CudaError::Cache {
        path: path.display().to_string(),
        source: e,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // A name of this call's own: threads of one process that store the same module at once
    // (parallel tests on a cold cache) would otherwise write one temporary file together and
    // rename it while another still writes it.
    static STORES: AtomicU64 = AtomicU64::new(0);
    let call = STORES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{call}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// The integer value of `#define NAME value` in a kernel source (tests check that the Rust
/// launch constants are the kernel's).
#[cfg(test)]
pub(crate) fn source_define(src: &str, name: &str) -> usize {
    let line = src
        .lines()
        .find(|l| l.starts_with(&format!("#define {name} ")))
        .unwrap_or_else(|| panic!("no #define {name} in the kernel source"));
    line.split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("#define {name} is not an integer: {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of one process that compile the same module at once (parallel tests on a cold
    /// cache) each store it: a reader must only ever see one whole cubin, never a file another
    /// thread is still writing.
    #[test]
    fn concurrent_stores_of_one_module_never_expose_a_partial_file() {
        let dir = std::env::temp_dir().join(format!("ds4-cache-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("m-sm_90a-key.cubin");
        let len = 1 << 20;
        std::thread::scope(|scope| {
            for t in 0..4u8 {
                let path = &path;
                scope.spawn(move || {
                    for _ in 0..40 {
                        store_atomically(path, &vec![t + 1; len]).unwrap();
                    }
                });
            }
            let path = &path;
            scope.spawn(move || {
                for _ in 0..400 {
                    if let Ok(bytes) = std::fs::read(path) {
                        assert_eq!(bytes.len(), len, "a partial file was visible");
                        assert!(
                            bytes.iter().all(|&b| b == bytes[0]),
                            "two writers' bytes mixed"
                        );
                    }
                }
            });
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gpus_before_hopper_or_short_of_shared_memory_are_refused_by_name() {
        // Hopper and B200 offer 227 KiB per block.
        let need = crate::kernels::largest_shared_need();
        assert!(require_supported("NVIDIA H100 80GB HBM3", (9, 0), 232_448, need).is_ok());
        assert!(require_supported("NVIDIA B200", (10, 0), 232_448, need).is_ok());
        let err = require_supported("NVIDIA A100-SXM4-80GB", (8, 0), 166_912, need)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NVIDIA A100-SXM4-80GB is 8.0"), "{err}");
        assert!(err.contains("9.0 or later"), "{err}");
        let err = require_supported("NVIDIA RTX PRO 6000 Blackwell", (12, 0), 101_376, need)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("NVIDIA RTX PRO 6000 Blackwell offers 99 KiB"),
            "{err}"
        );
    }

    #[test]
    fn hopper_gets_the_arch_specific_target() {
        assert_eq!(arch_for((9, 0)), "sm_90a");
        assert_eq!(arch_for((8, 9)), "sm_89");
        assert_eq!(arch_for((10, 0)), "sm_100");
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let base = KernelCache::key("m", "src", "sm_90a", (13, 0));
        assert_eq!(base.len(), 40);
        assert_eq!(base, KernelCache::key("m", "src", "sm_90a", (13, 0)));
        assert_ne!(base, KernelCache::key("n", "src", "sm_90a", (13, 0)));
        assert_ne!(base, KernelCache::key("m", "src ", "sm_90a", (13, 0)));
        assert_ne!(base, KernelCache::key("m", "src", "sm_80", (13, 0)));
        assert_ne!(base, KernelCache::key("m", "src", "sm_90a", (13, 1)));
    }

    #[test]
    fn cache_rejects_files_that_are_not_elf() {
        assert!(!looks_like_cubin(b"garbage"));
        let mut elf = b"\x7fELF".to_vec();
        elf.resize(100, 0);
        assert!(looks_like_cubin(&elf));
    }

    /// Compiles every module when libnvrtc is loadable (no GPU needed), and checks that a
    /// broken source yields NVRTC's log. Skips with a message otherwise.
    #[test]
    fn every_module_compiles_and_errors_carry_the_log() {
        if !crate::device::nvrtc_present() {
            eprintln!("skipped: no CUDA (libnvrtc.so not found)");
            return;
        }
        for m in crate::kernels::MODULES {
            let src = m.full_source();
            compile_cubin(m.name, &src, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
        }
        let bad =
            format!("{COMMON_CUH}\nextern \"C\" __global__ void k() {{ undefined_thing(); }}");
        let e = compile_cubin("bad", &bad, "sm_90a")
            .unwrap_err()
            .to_string();
        assert!(e.contains("undefined_thing"), "{e}");
    }

    #[test]
    fn cache_stores_and_reuses_cubins() {
        if !crate::device::nvrtc_present() {
            eprintln!("skipped: no CUDA (libnvrtc.so not found)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("ds4-kcache-test-{}", std::process::id()));
        let cache = KernelCache::at(&dir);
        let src =
            format!("{COMMON_CUH}\nextern \"C\" __global__ void k(float* p) {{ p[0] = 1.f; }}");
        let (a, s1) = cache.get_or_compile("tiny", &src, "sm_90a").unwrap();
        let (b, s2) = cache.get_or_compile("tiny", &src, "sm_90a").unwrap();
        assert!(!s1.cache_hit && s2.cache_hit);
        assert_eq!(a, b);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

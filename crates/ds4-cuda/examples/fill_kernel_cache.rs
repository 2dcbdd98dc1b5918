//! Compiles every kernel module into a ds4 kernel cache folder, as the engine does on its first
//! start on a GPU (`DS4_KERNEL_CACHE`, compile.rs), but without a GPU: only libnvrtc is needed.
//! The cache key holds NVRTC's major.minor version, so a cache filled here with NVRTC 13.0 is
//! read on a GPU machine whose NVRTC is 13.0 too, which then loads the modules instead of
//! compiling them (~75 s on an H100 host's 16 cores). scripts/gpu/pack.sh puts one in its packs.
//!
//! `cargo run --release -p ds4-cuda --example fill_kernel_cache -- DIR [ARCH] [--copy-to OUT]`
//! (ARCH: sm_90a unless given; NVRTC from PyPI's nvidia-cuda-nvrtc:
//! LD_LIBRARY_PATH=site-packages/nvidia/cu13/lib). With `--copy-to`, the current modules'
//! files are also copied into OUT (a cache of exactly this tree's kernels: DIR keeps every
//! version it has compiled, so that a later run compiles only the modules that changed).

use std::process::ExitCode;

use ds4_cuda::compile::{nvrtc_version, KernelCache};
use ds4_cuda::fwd_kernels::all_module_sources;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let copy_to = match args.iter().position(|a| a == "--copy-to") {
        Some(i) if i + 1 < args.len() => {
            let out = args.remove(i + 1);
            args.remove(i);
            Some(std::path::PathBuf::from(out))
        }
        Some(_) => {
            eprintln!("fill_kernel_cache: --copy-to needs a folder");
            return ExitCode::from(2);
        }
        None => None,
    };
    let mut args = args.into_iter();
    let Some(dir) = args.next() else {
        eprintln!("usage: fill_kernel_cache DIR [ARCH] [--copy-to OUT]");
        return ExitCode::from(2);
    };
    let arch = args.next().unwrap_or_else(|| "sm_90a".to_string());
    let version = match nvrtc_version() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("fill_kernel_cache: NVRTC is not available: {e}");
            return ExitCode::FAILURE;
        }
    };
    for d in std::iter::once(std::path::Path::new(&dir)).chain(copy_to.as_deref()) {
        if let Err(e) = std::fs::create_dir_all(d) {
            eprintln!("fill_kernel_cache: cannot create {}: {e}", d.display());
            return ExitCode::FAILURE;
        }
    }
    let cache = KernelCache::at(&dir);
    for (name, source) in all_module_sources() {
        let copied = |cubin: &[u8]| -> Result<(), String> {
            let (Some(out), Ok(Some(path))) = (&copy_to, cache.path(name, &source, &arch)) else {
                return Ok(());
            };
            let file = path.file_name().ok_or("a cache path without a file name")?;
            std::fs::write(out.join(file), cubin).map_err(|e| e.to_string())
        };
        match cache.get_or_compile(name, &source, &arch) {
            Ok((cubin, stats)) => {
                if let Err(e) = copied(&cubin) {
                    eprintln!("fill_kernel_cache: copying {name}: {e}");
                    return ExitCode::FAILURE;
                }
                println!(
                    "{name}: {} ({:.1} s)",
                    if stats.cache_hit {
                        "cached"
                    } else {
                        "compiled"
                    },
                    stats.millis / 1e3
                )
            }
            Err(e) => {
                eprintln!("fill_kernel_cache: {name} for {arch}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "{dir}: every module for {arch}, NVRTC {}.{}",
        version.0, version.1
    );
    ExitCode::SUCCESS
}

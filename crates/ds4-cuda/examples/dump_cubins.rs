//! Writes the machine code of every kernel module, compiled by NVRTC as the engine compiles it,
//! into a folder: `DIR/<module>.cubin`. No GPU is needed, only libnvrtc.
//!
//! `cargo run --release -p ds4-cuda --example dump_cubins -- DIR [ARCH [MODULE]]` (ARCH: sm_90a
//! unless given; MODULE: only the modules whose name contains it).
//!
//! Reading them (CUDA's `cuobjdump` and `nvdisasm`; without a toolkit, PyPI has them:
//! `pip install nvidia-cuda-nvrtc nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`, then the
//! binaries and libnvrtc are under site-packages/nvidia/cu13/):
//! - registers, spills (`STACK`) and shared memory per kernel:
//!   `cuobjdump -res-usage DIR/gemm_q8.cubin`
//! - one kernel's SASS: `cuobjdump -sass -fun gemm_q8_0_q8x_m128 DIR/gemm_q8.cubin`; counting
//!   the instructions between a loop's copies (`LDGSTS`) and its MMAs (`IMMA`, `HMMA`) is how
//!   the GEMMs' copy loops were found to cost ~30 instructions per 16-byte copy
//!   (docs/speed-log.md, session 12).

use std::path::PathBuf;
use std::process::ExitCode;

use ds4_cuda::compile::compile_cubin;
use ds4_cuda::fwd_kernels::all_module_sources;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: dump_cubins DIR [ARCH]");
        return ExitCode::from(2);
    };
    let arch = args.next().unwrap_or_else(|| "sm_90a".to_string());
    // Optional: only the modules whose name contains this text (a full run compiles for minutes).
    let only = args.next();
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("dump_cubins: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (name, source) in all_module_sources() {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let path = dir.join(format!("{name}.cubin"));
        let written = compile_cubin(name, &source, &arch)
            .map_err(|e| e.to_string())
            .and_then(|cubin| std::fs::write(&path, cubin).map_err(|e| e.to_string()));
        match written {
            Ok(()) => println!("{}", path.display()),
            Err(e) => {
                eprintln!("dump_cubins: {name} for {arch}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

//! `--backend auto|cpu|cuda`: which backend runs the model. Auto takes the GPU when the CUDA
//! libraries load and a device opens, and the CPU otherwise; an explicit `cuda` without CUDA is
//! an error that names the missing library.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use ds4_gguf::reader::GgufFile;
use ds4_model::backend::Backend;
use ds4_model::cpu::CpuBackend;
use ds4_model::numerics::Numerics;

/// The `--backend` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for BackendChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "cpu" => Ok(BackendChoice::Cpu),
            "cuda" => Ok(BackendChoice::Cuda),
            other => bail!("unknown backend `{other}` (expected auto, cpu or cuda)"),
        }
    }
}

/// Loads the model file on the chosen backend. `path` is only used in messages; `ctx` is the
/// length of the sessions the caller will open (on a GPU, memory for one is kept beside the
/// weights).
pub fn load_backend(
    file: Arc<GgufFile>,
    path: &Path,
    choice: BackendChoice,
    numerics: Numerics,
    ctx: usize,
) -> anyhow::Result<Box<dyn Backend>> {
    let cpu = |file| -> anyhow::Result<Box<dyn Backend>> {
        Ok(Box::new(
            CpuBackend::from_file(file, numerics)
                .with_context(|| format!("loading {}", path.display()))?,
        ))
    };
    match choice {
        BackendChoice::Cpu => cpu(file),
        BackendChoice::Cuda => load_cuda(file, path, numerics, ctx),
        BackendChoice::Auto if ds4_cuda::cuda_available() => {
            match load_cuda(file.clone(), path, numerics, ctx) {
                Ok(b) => Ok(b),
                Err(e) => {
                    eprintln!("ds4: notice: CUDA is present but unusable ({e:#}); using the CPU");
                    cpu(file)
                }
            }
        }
        BackendChoice::Auto => cpu(file),
    }
}

fn load_cuda(
    file: Arc<GgufFile>,
    path: &Path,
    numerics: Numerics,
    ctx: usize,
) -> anyhow::Result<Box<dyn Backend>> {
    // Opening the device reports which library is missing (driver or NVRTC).
    let mut progress = upload_progress();
    let backend = ds4_cuda::CudaBackend::from_file(file, numerics, 0, ctx, &mut progress)
        .with_context(|| format!("loading {} on the GPU (--backend cuda)", path.display()))?;
    Ok(Box::new(backend))
}

/// Reports the weight upload on stderr: a live line on a terminal, 25% steps otherwise.
fn upload_progress() -> impl FnMut(usize, usize) {
    let live = std::io::stderr().is_terminal();
    let mut last_step = usize::MAX;
    move |done, total| {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if live {
            eprint!(
                "\rds4: uploading weights to the GPU: {:.2} / {:.2} GiB ({pct}%)",
                gib(done),
                gib(total)
            );
            if done == total {
                eprintln!();
            }
        } else if pct / 25 != last_step {
            last_step = pct / 25;
            eprintln!(
                "ds4: uploading weights to the GPU: {:.2} / {:.2} GiB ({pct}%)",
                gib(done),
                gib(total)
            );
        }
    }
}

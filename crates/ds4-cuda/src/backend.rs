//! The CUDA backend behind ds4-model's [`Backend`] trait: a model resident on one GPU, whose
//! sessions keep their state on the device.

use std::path::Path;
use std::sync::Arc;

use ds4_gguf::reader::GgufFile;
use ds4_model::backend::{Backend, ModelError, Session};
use ds4_model::config::ModelConfig;
use ds4_model::numerics::Numerics;

use crate::model::CudaModel;
use crate::session::CudaSession;
use crate::weights::HostWeights;

/// The session length [`CudaBackend::load`] keeps GPU memory for.
const SMALL_SESSION: usize = 4096;

/// A model loaded on a GPU.
#[derive(Clone)]
pub struct CudaBackend {
    model: Arc<CudaModel>,
}

impl CudaBackend {
    /// Opens (memory-maps) a GGUF file and uploads it to GPU `ordinal`.
    pub fn load(
        path: impl AsRef<Path>,
        numerics: Numerics,
        ordinal: usize,
    ) -> Result<CudaBackend, ModelError> {
        let file = GgufFile::open(path)?;
        CudaBackend::from_file(
            Arc::new(file),
            numerics,
            ordinal,
            SMALL_SESSION,
            &mut |_, _| {},
        )
    }

    /// Uploads an already parsed file, reporting progress as (bytes done, bytes total),
    /// keeping GPU memory for one session of `session_ctx` tokens beside the weights (where
    /// the weights do not all fit, more of them go to host memory instead).
    pub fn from_file(
        file: Arc<GgufFile>,
        numerics: Numerics,
        ordinal: usize,
        session_ctx: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<CudaBackend, ModelError> {
        let cfg = ModelConfig::from_gguf(&file)?;
        let model = CudaModel::load(file, cfg, numerics, ordinal, session_ctx, progress)?;
        Ok(CudaBackend {
            model: Arc::new(model),
        })
    }

    /// As [`CudaBackend::load`] with the weights' host-memory placement given by the caller
    /// instead of `DS4_CUDA_HOST_WEIGHTS`.
    pub fn load_placed(
        path: impl AsRef<Path>,
        numerics: Numerics,
        ordinal: usize,
        policy: HostWeights,
    ) -> Result<CudaBackend, ModelError> {
        let file = Arc::new(GgufFile::open(path)?);
        let cfg = ModelConfig::from_gguf(&file)?;
        let model = CudaModel::load_placed(
            file,
            cfg,
            numerics,
            ordinal,
            policy,
            SMALL_SESSION,
            &mut |_, _| {},
        )?;
        Ok(CudaBackend {
            model: Arc::new(model),
        })
    }

    pub fn model(&self) -> &Arc<CudaModel> {
        &self.model
    }

    /// A concrete session (the trait object form is [`Backend::new_session`]).
    pub fn session(&self, ctx: usize) -> Result<CudaSession, ModelError> {
        CudaSession::new(self.model.clone(), ctx)
    }
}

impl Backend for CudaBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    fn numerics(&self) -> Numerics {
        self.model.numerics
    }

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn new_session(&self, ctx: usize) -> Result<Box<dyn Session>, ModelError> {
        Ok(Box::new(self.session(ctx)?))
    }

    /// As the driver reports it: every process's allocations on the GPU.
    fn device_memory(&self) -> Option<(usize, usize)> {
        let (free, total) = self.model.gpu().device.memory_info().ok()?;
        Some((total.saturating_sub(free), total))
    }

    fn session_memory(&self, ctx: usize) -> Option<(usize, usize)> {
        self.model.session_memory(ctx)
    }
}

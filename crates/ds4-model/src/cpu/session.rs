//! The CPU backend's [`Backend`] and [`Session`] implementations.

use std::path::Path;
use std::sync::Arc;

use ds4_gguf::reader::GgufFile;

use super::forward::CpuModel;
use crate::backend::{Backend, Logits, ModelError, Session};
use crate::config::ModelConfig;
use crate::numerics::Numerics;
use crate::session::SessionState;
use crate::weights::ModelWeights;

/// A model loaded for the CPU.
#[derive(Clone)]
pub struct CpuBackend {
    model: Arc<CpuModel>,
}

impl CpuBackend {
    /// Opens (memory-maps) a GGUF file and binds its weights.
    pub fn load(path: impl AsRef<Path>, numerics: Numerics) -> Result<CpuBackend, ModelError> {
        let file = GgufFile::open(path)?;
        CpuBackend::from_file(Arc::new(file), numerics)
    }

    /// Binds the weights of an already parsed file.
    pub fn from_file(file: Arc<GgufFile>, numerics: Numerics) -> Result<CpuBackend, ModelError> {
        let cfg = ModelConfig::from_gguf(&file)?;
        CpuBackend::with_config(file, cfg, numerics)
    }

    /// Binds the weights of a file for a description given by the caller (synthetic models
    /// and tests; a model file's own description comes from [`CpuBackend::from_file`]).
    pub fn with_config(
        file: Arc<GgufFile>,
        cfg: ModelConfig,
        numerics: Numerics,
    ) -> Result<CpuBackend, ModelError> {
        cfg.validate()?;
        let weights = ModelWeights::bind(file, &cfg)?;
        let model = CpuModel::new(cfg, weights, numerics)?;
        Ok(CpuBackend {
            model: Arc::new(model),
        })
    }

    pub fn model(&self) -> &Arc<CpuModel> {
        &self.model
    }

    /// A concrete session (the trait object form is [`Backend::new_session`]).
    pub fn session(&self, ctx: usize) -> Result<CpuSession, ModelError> {
        if ctx == 0 {
            return Err(ModelError::ContextOverflow { ctx, needed: 1 });
        }
        Ok(CpuSession {
            model: self.model.clone(),
            state: SessionState::allocate(&self.model.cfg, ctx)?,
        })
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    fn numerics(&self) -> Numerics {
        self.model.numerics
    }

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn new_session(&self, ctx: usize) -> Result<Box<dyn Session>, ModelError> {
        Ok(Box::new(self.session(ctx)?))
    }
}

/// One token stream's state on the CPU.
pub struct CpuSession {
    model: Arc<CpuModel>,
    state: SessionState,
}

impl CpuSession {
    pub fn state(&self) -> &SessionState {
        &self.state
    }
}

impl Session for CpuSession {
    fn ctx(&self) -> usize {
        self.state.ctx
    }

    fn tokens(&self) -> &[u32] {
        &self.state.tokens
    }

    fn eval(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>, ModelError> {
        let rows: Vec<usize> = match want {
            Logits::All => (0..tokens.len()).collect(),
            Logits::Last => tokens.len().checked_sub(1).into_iter().collect(),
        };
        self.model.forward(&mut self.state, tokens, &rows)
    }

    fn last_logits(&self) -> &[f32] {
        &self.state.last_logits
    }

    fn snapshot(&self) -> Vec<u8> {
        self.state.to_payload(&self.model.cfg)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), ModelError> {
        self.state.restore_payload(&self.model.cfg, bytes)
    }

    fn reset(&mut self) {
        self.state.reset();
    }
}

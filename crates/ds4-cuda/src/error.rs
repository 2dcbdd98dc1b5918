//! The one error type of the CUDA backend.

use cudarc::driver::DriverError;

/// Everything that can go wrong between opening a GPU and reading a kernel's result back.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library (driver, NVRTC) cannot be loaded: no GPU stack on this machine.
    #[error("{0}")]
    LibraryMissing(String),
    /// A driver call failed; `what` says which operation.
    #[error("CUDA driver error in {what}: {code}")]
    Driver { what: String, code: String },
    /// NVRTC rejected a kernel source; `log` is the compiler's own log.
    #[error("NVRTC failed to compile {module} for {arch}: {log}")]
    Compile {
        module: String,
        arch: String,
        log: String,
    },
    /// The GPU lacks what the kernels need (compute capability).
    #[error("{0}")]
    Unsupported(String),
    /// Not enough free device memory for a requested allocation.
    #[error("{0}")]
    OutOfMemory(String),
    /// A caller passed shapes, sizes or offsets that do not fit together.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Reading or writing the on-disk kernel cache failed.
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: String,
        source: std::io::Error,
    },
}

impl CudaError {
    /// Wraps a driver error with the name of the operation that produced it.
    pub fn driver(what: impl Into<String>, err: DriverError) -> CudaError {
        let code = match err.error_string() {
            Ok(s) => format!("{} ({:?})", s.to_string_lossy(), err.0),
            Err(_) => format!("{:?}", err.0),
        };
        CudaError::Driver {
            what: what.into(),
            code,
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, CudaError>;

/// Adds the name of the failing operation to a driver result.
pub(crate) trait DriverContext<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, DriverError> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| CudaError::driver(what, e))
    }
}

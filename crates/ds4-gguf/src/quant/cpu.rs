//! Which SIMD kernels this CPU can run, detected once.

use std::sync::OnceLock;

/// The kernel family the dispatching dot products use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    /// Portable scalar code (the reference).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
}

/// The best kernel family this CPU supports. Detected on the first call and cached; set the
/// environment variable `DS4_QUANT_SCALAR=1` before that call to force the scalar kernels.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

fn detect() -> SimdLevel {
    if std::env::var_os("DS4_QUANT_SCALAR").is_some_and(|v| v == "1") {
        return SimdLevel::Scalar;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Scalar
}

//! Per-kernel GPU time, on when the environment sets `DS4_CUDA_PROFILE=kernels`: every launch
//! is bracketed by two events on the stream (no synchronize, so the launch pattern is the real
//! one), and the table printed when the device closes gives each kernel's GPU time, share,
//! calls, and achieved bandwidth where the launcher states the bytes it reads. The time between
//! kernels (launch gaps) is reported too: it is what CUDA graphs or fusion would remove.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::{sys, CudaEvent, CudaStream};

/// What `DS4_CUDA_PROFILE` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProfileMode {
    /// Unset: no profiling.
    Off,
    /// `kernels`: an event pair around every launch (graphs off; see [`KernelProfile`]).
    Kernels,
    /// `trace`: CUPTI kernel records with graphs and branches on (trace.rs).
    Trace,
    /// `host`: the host's wall time per phase of each graph-replayed decode step, graphs on
    /// and no added synchronization (forward/mod.rs HostTimes).
    Host,
    /// Any other value: per-stage wall times, synchronized per stage (forward/mod.rs StageTimes).
    Stages,
}

pub(crate) fn mode() -> ProfileMode {
    match std::env::var("DS4_CUDA_PROFILE").ok().as_deref() {
        None => ProfileMode::Off,
        Some("kernels") => ProfileMode::Kernels,
        Some("trace") => ProfileMode::Trace,
        Some("host") => ProfileMode::Host,
        Some(_) => ProfileMode::Stages,
    }
}

/// Events kept before they are folded into the totals (bounds the live event count).
const FOLD_EVERY: usize = 8192;

#[derive(Default)]
struct Totals {
    ms: f64,
    calls: u64,
    bytes: f64,
}

#[derive(Default)]
struct Inner {
    pending: Vec<(String, f64, CudaEvent, CudaEvent)>,
    totals: HashMap<String, Totals>,
    /// GPU time from the first event to the last of each folded batch (busy + gaps).
    span_ms: f64,
}

pub(crate) struct KernelProfile {
    inner: Mutex<Inner>,
}

impl KernelProfile {
    /// The profiler when `DS4_CUDA_PROFILE=kernels`, else None.
    pub(crate) fn from_env() -> Option<KernelProfile> {
        (mode() == ProfileMode::Kernels).then(|| KernelProfile {
            inner: Mutex::new(Inner::default()),
        })
    }

    fn event(stream: &CudaStream) -> Option<CudaEvent> {
        stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ok()
    }

    /// Runs `launch` between two events and charges the GPU time to `name`; `bytes` is what
    /// the kernel reads from device memory (0: unknown).
    pub(crate) fn time<R>(
        &self,
        stream: &CudaStream,
        name: &str,
        bytes: f64,
        launch: impl FnOnce() -> R,
    ) -> R {
        let start = Self::event(stream);
        let out = launch();
        let end = Self::event(stream);
        if let (Some(s), Some(e)) = (start, end) {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner.pending.push((name.to_string(), bytes, s, e));
            if inner.pending.len() >= FOLD_EVERY {
                fold(&mut inner);
            }
        }
        out
    }
}

/// Waits for the pending events and adds their times to the totals.
fn fold(inner: &mut Inner) {
    let pending = std::mem::take(&mut inner.pending);
    if let (Some(first), Some(last)) = (pending.first(), pending.last()) {
        if last.3.synchronize().is_ok() {
            inner.span_ms += first.2.elapsed_ms(&last.3).unwrap_or(0.0) as f64;
        }
    }
    for (name, bytes, s, e) in pending {
        if let Ok(ms) = s.elapsed_ms(&e) {
            let t = inner.totals.entry(name).or_default();
            t.ms += ms as f64;
            t.calls += 1;
            t.bytes += bytes;
        }
    }
}

impl Drop for KernelProfile {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        fold(inner);
        let busy: f64 = inner.totals.values().map(|t| t.ms).sum();
        if busy == 0.0 {
            return;
        }
        let mut rows: Vec<_> = inner.totals.iter().collect();
        rows.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
        eprintln!("ds4 CUDA kernel times (DS4_CUDA_PROFILE=kernels, GPU events per launch):");
        eprintln!(
            "  {:<40} {:>10} {:>6} {:>9} {:>9} {:>8}",
            "kernel", "ms", "%", "calls", "us/call", "GB/s"
        );
        for (name, t) in rows {
            let gbs = if t.bytes > 0.0 && t.ms > 0.0 {
                format!("{:.0}", t.bytes / (t.ms * 1e-3) / 1e9)
            } else {
                "-".into()
            };
            eprintln!(
                "  {name:<40} {:>10.3} {:>6.1} {:>9} {:>9.2} {:>8}",
                t.ms,
                t.ms / busy * 100.0,
                t.calls,
                t.ms * 1e3 / t.calls as f64,
                gbs
            );
        }
        eprintln!(
            "  kernels busy {busy:.3} ms of {:.3} ms on the stream ({:.1}% in gaps between launches)",
            inner.span_ms.max(busy),
            (1.0 - busy / inner.span_ms.max(busy)) * 100.0
        );
    }
}

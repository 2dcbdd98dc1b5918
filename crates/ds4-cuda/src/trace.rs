//! Kernel trace with everything on (`DS4_CUDA_PROFILE=trace`): CUPTI's activity records give
//! each kernel's start and end on the GPU, also for the kernels a decode graph replays, with
//! the graph, programmatic dependent launch and the side branches as in a normal run. (The
//! event profile, `DS4_CUDA_PROFILE=kernels`, needs all three off and adds an event pair to
//! every launch.) When the device closes, the time of each decode step (one graph launch) is
//! split into the time each kernel ran alone on the GPU, the time kernels overlapped (side
//! branches, dependent launches), and the time no kernel ran; kernels outside graphs (prefill,
//! the first decode step) get the same table over their whole span.
//!
//! Time alone on the GPU is the part of a kernel that surely lies on the critical path: it is
//! what shortening that kernel can save. `DS4_CUDA_TRACE_FILE=F` also writes every record to
//! F as CSV. Needs libcupti (CUDA's `extras/CUPTI/lib64`) on the library path.

use std::alloc::{alloc, dealloc, Layout};
use std::collections::HashMap;
use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::addr_of;
use std::sync::Mutex;

use cudarc::cupti::result::activity;
use cudarc::cupti::sys;
use cudarc::driver::sys::CUcontext;

use crate::error::{CudaError, Result};

/// One kernel execution as CUPTI reports it (GPU timestamps in ns).
#[derive(Clone, Debug, PartialEq)]
pub struct KernelRecord {
    pub name: String,
    pub start: u64,
    pub end: u64,
    /// The API call that launched it: every kernel of one graph launch shares it.
    pub correlation: u32,
    /// Launched as a node of a graph.
    pub in_graph: bool,
    /// The stream it ran on (inside a graph, one of the graph's own streams) and, for a
    /// graph's kernel, its node: what tells the branches' kernels apart in a timeline.
    pub stream: u32,
    pub graph_node: u64,
    /// Its grid (CTAs in x, y, z): what tells launches of one kernel on different matrices apart.
    pub grid: [i32; 3],
}

/// Per-kernel share of a set of windows (decode steps, or the span outside graphs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelShare {
    pub calls: usize,
    /// Sum of the kernel's durations (ns).
    pub busy_ns: u64,
    /// Time it was the only kernel running (ns).
    pub alone_ns: u64,
}

/// The split of windows of GPU time: wall = Σ alone + overlap + idle.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceSummary {
    pub windows: usize,
    pub wall_ns: u64,
    pub overlap_ns: u64,
    pub idle_ns: u64,
    pub kernels: HashMap<String, KernelShare>,
}

/// Adds one window of kernels (a decode step, or every kernel outside graphs) to `sum`: a sweep
/// over the kernels' starts and ends from the first start to the last end.
fn add_window(sum: &mut TraceSummary, records: &[&KernelRecord]) {
    let (Some(t0), Some(t1)) = (
        records.iter().map(|r| r.start).min(),
        records.iter().map(|r| r.end.max(r.start)).max(),
    ) else {
        return;
    };
    sum.windows += 1;
    sum.wall_ns += t1 - t0;
    // (time, is_start, record): ends sort before starts at the same time, so back-to-back
    // kernels do not count as overlapping.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * records.len());
    for (i, r) in records.iter().enumerate() {
        events.push((r.start, true, i));
        events.push((r.end.max(r.start), false, i));
        let share = sum.kernels.entry(r.name.clone()).or_default();
        share.calls += 1;
        share.busy_ns += r.end.saturating_sub(r.start);
    }
    events.sort_unstable();
    let mut active: Vec<usize> = Vec::new();
    let mut last = t0;
    for (t, is_start, i) in events {
        let dt = t - last;
        match active.as_slice() {
            [] => sum.idle_ns += dt,
            [only] => {
                let name = &records[*only].name;
                if let Some(share) = sum.kernels.get_mut(name) {
                    share.alone_ns += dt;
                }
            }
            _ => sum.overlap_ns += dt,
        }
        last = t;
        if is_start {
            active.push(i);
        } else if let Some(p) = active.iter().position(|&a| a == i) {
            active.swap_remove(p);
        }
    }
}

/// Decode steps (the kernels of one graph launch each) and the kernels outside graphs.
pub fn summarize(records: &[KernelRecord]) -> (TraceSummary, TraceSummary) {
    let mut steps: HashMap<u32, Vec<&KernelRecord>> = HashMap::new();
    let mut outside = Vec::new();
    for r in records {
        if r.in_graph {
            steps.entry(r.correlation).or_default().push(r);
        } else {
            outside.push(r);
        }
    }
    let mut graph = TraceSummary::default();
    for step in steps.values() {
        add_window(&mut graph, step);
    }
    let mut rest = TraceSummary::default();
    add_window(&mut rest, &outside);
    (graph, rest)
}

/// The table of one summary, kernels by time alone on the GPU (per window).
pub fn render(title: &str, s: &TraceSummary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if s.windows == 0 {
        return out;
    }
    let w = s.windows as f64;
    let us = |ns: u64| ns as f64 / 1e3 / w;
    let alone: u64 = s.kernels.values().map(|k| k.alone_ns).sum();
    let _ = writeln!(
        out,
        "  {title}: {} window(s), {:.1} us each: kernels alone {:.1} us, overlapping {:.1} us, no kernel {:.1} us",
        s.windows,
        us(s.wall_ns),
        us(alone),
        us(s.overlap_ns),
        us(s.idle_ns)
    );
    let _ = writeln!(
        out,
        "    {:<44} {:>9} {:>9} {:>11} {:>12} {:>7}",
        "kernel", "calls/win", "us/call", "busy us/win", "alone us/win", "alone%"
    );
    let mut rows: Vec<_> = s.kernels.iter().collect();
    rows.sort_by(|a, b| b.1.alone_ns.cmp(&a.1.alone_ns).then(a.0.cmp(b.0)));
    for (name, k) in rows {
        let _ = writeln!(
            out,
            "    {name:<44} {:>9.1} {:>9.2} {:>11.1} {:>12.1} {:>6.1}%",
            k.calls as f64 / w,
            k.busy_ns as f64 / 1e3 / k.calls.max(1) as f64,
            us(k.busy_ns),
            us(k.alone_ns),
            k.alone_ns as f64 / s.wall_ns.max(1) as f64 * 100.0
        );
    }
    out
}

/// The records as CSV (`name,start_ns,end_ns,correlation,in_graph,stream,graph_node,grid`,
/// kernel names quoted, the grid as `XxYxZ`), for timelines drawn elsewhere.
pub fn to_csv(records: &[KernelRecord]) -> String {
    use std::fmt::Write;
    let mut out =
        String::from("name,start_ns,end_ns,correlation,in_graph,stream,graph_node,grid\n");
    for r in records {
        let _ = writeln!(
            out,
            "\"{}\",{},{},{},{},{},{},{}x{}x{}",
            r.name.replace('"', "\"\""),
            r.start,
            r.end,
            r.correlation,
            r.in_graph as u8,
            r.stream,
            r.graph_node,
            r.grid[0],
            r.grid[1],
            r.grid[2]
        );
    }
    out
}

/// Records the completion callback has parsed (CUPTI's callbacks carry no user pointer).
static RECORDS: Mutex<Vec<KernelRecord>> = Mutex::new(Vec::new());

/// Size and alignment of the activity buffers handed to CUPTI.
const BUFFER_BYTES: usize = 8 << 20;
const BUFFER_ALIGN: usize = 8;

fn buffer_layout() -> Layout {
    // BUFFER_BYTES is a nonzero multiple of BUFFER_ALIGN, a power of two: always valid.
    Layout::from_size_align(BUFFER_BYTES, BUFFER_ALIGN).expect("constant layout")
}

extern "C" fn buffer_requested(buffer: *mut *mut u8, size: *mut usize, max_records: *mut usize) {
    // SAFETY: CUPTI passes valid out-pointers. The buffer has buffer_layout() and is freed in
    // buffer_completed, which CUPTI calls for every buffer it was given; a failed allocation
    // hands back null and size 0, which CUPTI treats as no buffer (records are dropped).
    unsafe {
        let p = alloc(buffer_layout());
        *buffer = p;
        *size = if p.is_null() { 0 } else { BUFFER_BYTES };
        *max_records = 0;
    }
}

extern "C" fn buffer_completed(
    _ctx: CUcontext,
    _stream: u32,
    buffer: *mut u8,
    _size: usize,
    valid: usize,
) {
    if buffer.is_null() {
        return;
    }
    let mut parsed = Vec::new();
    let mut record: *mut sys::CUpti_Activity = std::ptr::null_mut();
    // SAFETY: `buffer` is one of ours (buffer_requested) holding `valid` bytes of records;
    // get_next_record walks them and leaves `record` pointing at a record inside the buffer,
    // which starts with its kind (a C enum, read as the u32 it is: no Rust enum is formed from
    // a value a newer CUPTI may add). A CONCURRENT_KERNEL record is a CUpti_ActivityKernel of
    // the library's version; every version since CUDA 12 has the integer and pointer fields
    // read here at the offsets of CUpti_ActivityKernel10 (later versions append fields). They
    // are read through raw field addresses (no reference to the struct, whose enum fields are
    // not checked), unaligned-safe. `name` is a NUL-terminated string CUPTI keeps alive.
    unsafe {
        while activity::get_next_record(buffer, valid, &mut record).is_ok() {
            let kind = (record as *const u32).read_unaligned();
            if kind != sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL as u32 {
                continue;
            }
            let k = record as *const sys::CUpti_ActivityKernel10;
            let name_ptr = addr_of!((*k).name).read_unaligned();
            let name = if name_ptr.is_null() {
                "?".to_string()
            } else {
                CStr::from_ptr(name_ptr).to_string_lossy().into_owned()
            };
            parsed.push(KernelRecord {
                name,
                start: addr_of!((*k).start).read_unaligned(),
                end: addr_of!((*k).end).read_unaligned(),
                correlation: addr_of!((*k).correlationId).read_unaligned(),
                in_graph: addr_of!((*k).graphId).read_unaligned() != 0,
                stream: addr_of!((*k).streamId).read_unaligned(),
                graph_node: addr_of!((*k).graphNodeId).read_unaligned(),
                grid: [
                    addr_of!((*k).gridX).read_unaligned(),
                    addr_of!((*k).gridY).read_unaligned(),
                    addr_of!((*k).gridZ).read_unaligned(),
                ],
            });
        }
        dealloc(buffer, buffer_layout());
    }
    if let Ok(mut all) = RECORDS.lock() {
        all.extend(parsed);
    }
}

/// The trace while it is on; its drop flushes CUPTI and prints the tables.
pub(crate) struct KernelTrace {
    _private: (),
}

impl KernelTrace {
    /// The trace when `DS4_CUDA_PROFILE=trace`, else None; an error when libcupti cannot be
    /// loaded or refuses.
    pub(crate) fn from_env() -> Option<Result<KernelTrace>> {
        (crate::profile::mode() == crate::profile::ProfileMode::Trace).then(KernelTrace::start)
    }

    fn start() -> Result<KernelTrace> {
        let fail = |what: &str| CudaError::LibraryMissing(format!("CUPTI kernel trace: {what}"));
        // cudarc panics when the library or a symbol is missing: an error here instead.
        catch_unwind(AssertUnwindSafe(|| {
            activity::register_callbacks(Some(buffer_requested), Some(buffer_completed))?;
            activity::enable(sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL)
        }))
        .map_err(|_| fail("libcupti not found (add CUDA's extras/CUPTI/lib64 to LD_LIBRARY_PATH)"))?
        .map_err(|e| fail(&format!("{e:?}")))?;
        Ok(KernelTrace { _private: () })
    }
}

impl Drop for KernelTrace {
    fn drop(&mut self) {
        // FORCED: every buffer, full or not, goes to buffer_completed before flush_all returns.
        let flushed = catch_unwind(|| {
            activity::flush_all(sys::CUpti_ActivityFlag::CUPTI_ACTIVITY_FLAG_FLUSH_FORCED as u32)
        });
        let _ = catch_unwind(|| {
            activity::disable(sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL)
        });
        if !matches!(flushed, Ok(Ok(()))) {
            eprintln!("ds4 CUDA kernel trace: flushing CUPTI's records failed");
        }
        let records = RECORDS
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        if records.is_empty() {
            return;
        }
        if let Some(path) = std::env::var_os("DS4_CUDA_TRACE_FILE") {
            if let Err(e) = std::fs::write(&path, to_csv(&records)) {
                eprintln!(
                    "ds4 CUDA kernel trace: writing {}: {e}",
                    std::path::Path::new(&path).display()
                );
            }
        }
        let (graph, rest) = summarize(&records);
        eprintln!(
            "ds4 CUDA kernel trace (DS4_CUDA_PROFILE=trace, CUPTI; graph, dependent launch and branches on):"
        );
        eprint!("{}", render("decode steps (one graph launch each)", &graph));
        eprint!("{}", render("kernels outside graphs (one window)", &rest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, start: u64, end: u64, corr: u32, in_graph: bool) -> KernelRecord {
        KernelRecord {
            name: name.into(),
            start,
            end,
            correlation: corr,
            in_graph,
            stream: 7,
            graph_node: if in_graph { 42 } else { 0 },
            grid: [132, 2, 1],
        }
    }

    #[test]
    fn records_go_out_as_csv_with_quoted_names() {
        let csv = to_csv(&[
            rec("gemv_q8_0_q8x_nb1", 5, 9, 3, true),
            rec("odd\"name", 1, 2, 4, false),
        ]);
        assert_eq!(
            csv,
            "name,start_ns,end_ns,correlation,in_graph,stream,graph_node,grid\n\
             \"gemv_q8_0_q8x_nb1\",5,9,3,1,7,42,132x2x1\n\"odd\"\"name\",1,2,4,0,7,0,132x2x1\n"
        );
    }

    #[test]
    fn a_step_splits_into_alone_overlap_and_idle() {
        // One graph launch: a [0,10), b [8,20) beside it, gap [20,25), c [25,30).
        let r = vec![
            rec("a", 0, 10, 7, true),
            rec("b", 8, 20, 7, true),
            rec("c", 25, 30, 7, true),
        ];
        let (g, rest) = summarize(&r);
        assert_eq!(rest.windows, 0);
        assert_eq!(
            (g.windows, g.wall_ns, g.overlap_ns, g.idle_ns),
            (1, 30, 2, 5)
        );
        assert_eq!(g.kernels["a"].alone_ns, 8);
        assert_eq!(g.kernels["b"].alone_ns, 10);
        assert_eq!(g.kernels["c"].alone_ns, 5);
        assert_eq!(g.kernels["b"].busy_ns, 12);
        let alone: u64 = g.kernels.values().map(|k| k.alone_ns).sum();
        assert_eq!(alone + g.overlap_ns + g.idle_ns, g.wall_ns);
    }

    #[test]
    fn graph_launches_are_separate_windows_and_back_to_back_kernels_do_not_overlap() {
        // Two decode steps far apart (the host gap between them is no step's idle time), and
        // prefill kernels outside graphs; x ends exactly where y starts. Times in ns.
        let r = vec![
            rec("x", 100_000, 110_000, 1, true),
            rec("y", 110_000, 130_000, 1, true),
            rec("x", 1_000_000, 1_010_000, 2, true),
            rec("y", 1_010_000, 1_030_000, 2, true),
            rec("gemm", 0, 50_000, 9, false),
            rec("norm", 60_000, 70_000, 10, false),
        ];
        let (g, rest) = summarize(&r);
        assert_eq!(
            (g.windows, g.wall_ns, g.overlap_ns, g.idle_ns),
            (2, 60_000, 0, 0)
        );
        assert_eq!(g.kernels["x"].calls, 2);
        assert_eq!(g.kernels["y"].alone_ns, 40_000);
        assert_eq!(
            (rest.windows, rest.wall_ns, rest.idle_ns),
            (1, 70_000, 10_000)
        );
        let table = render("decode", &g);
        let mut lines = table.lines();
        assert_eq!(
            lines.next(),
            Some("  decode: 2 window(s), 30.0 us each: kernels alone 30.0 us, overlapping 0.0 us, no kernel 0.0 us")
        );
        // The kernel with the most time alone first: y, 20 us per step.
        let first = lines.nth(1).expect("a kernel row");
        assert!(first.trim_start().starts_with("y "), "{first}");
        assert!(first.contains("20.0"), "{first}");
    }
}

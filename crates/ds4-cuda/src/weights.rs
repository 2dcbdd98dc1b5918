//! Model weights on the GPU: the GGUF tensor-data region uploaded once, at one device address.
//!
//! Tensors are byte offsets into it, exactly as in the file, so tensors that alias the same
//! bytes (the `--alias-layers` synthetic model) cost their size once.
//!
//! When the region does not fit in GPU memory beside the working memory (ds4's q2 file, 80.76
//! GiB, on an 80 GB H100), some tensors are placed in page-locked host memory mapped into the
//! same address range ([`CudaDevice::alloc_placed`]): the kernels read them over PCIe through
//! the same pointers, so nothing else changes. The loader offers the tensors whose bytes a
//! token reads least first (the token embedding: one row per token; then whole routed-expert
//! stacks, of which a token reads 6 of 256 experts), see [`plan_placement`].

use std::ops::Range;

use crate::device::{gib, CudaDevice, DeviceBuffer};
use crate::error::{CudaError, Result};
use crate::gemv::{DeviceMatrix, WeightFormat};

/// Bytes copied per host→device transfer (progress granularity).
const UPLOAD_CHUNK: usize = 256 << 20;

/// GPU memory that automatic placement leaves free beyond the planned session (the caller's
/// context: its KV cache, scratch, quant slots and fixed part, which the plan counts within
/// 66-184 MiB of what an H100 measured, docs/speed-log.md session 21), for what neither counts.
pub const AUTO_HEADROOM: usize = 256 << 20;

/// Which weights may live in host memory (`DS4_CUDA_HOST_WEIGHTS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostWeights {
    /// Only when the weights do not fit in GPU memory: as few as make them fit (the default).
    Auto,
    /// Never: a model that does not fit is refused.
    Off,
    /// At least this many bytes (more where Auto needs more), e.g. to leave room for long
    /// sessions' KV caches.
    AtLeast(usize),
    /// The whole region (for tests: every kernel then reads its weights over PCIe).
    All,
}

impl HostWeights {
    /// `DS4_CUDA_HOST_WEIGHTS`: `auto` (or unset), `off`, `all`, or a size in GiB.
    pub fn from_env() -> Result<HostWeights> {
        match std::env::var("DS4_CUDA_HOST_WEIGHTS") {
            Err(_) => Ok(HostWeights::Auto),
            Ok(v) => HostWeights::parse(&v),
        }
    }

    pub fn parse(v: &str) -> Result<HostWeights> {
        match v.trim() {
            "" | "auto" => Ok(HostWeights::Auto),
            "off" => Ok(HostWeights::Off),
            "all" => Ok(HostWeights::All),
            n => match n.parse::<f64>() {
                Ok(0.0) => Ok(HostWeights::Off),
                Ok(g) if g.is_finite() && g > 0.0 && g < 1e6 => {
                    Ok(HostWeights::AtLeast((g * (1u64 << 30) as f64) as usize))
                }
                _ => Err(CudaError::InvalidArgument(format!(
                    "DS4_CUDA_HOST_WEIGHTS={v}: expected auto, off, all or a size in GiB (e.g. 4.5)"
                ))),
            },
        }
    }
}

/// A tensor the loader may place in host memory: its byte range in the region and its name.
#[derive(Clone, Debug)]
pub struct HostCandidate {
    pub name: String,
    pub range: Range<usize>,
    /// Long spans copy it back into a GPU buffer of its size (the routed experts' down
    /// stacks, model.rs ExpertStaging): placing it takes that much working memory.
    pub staged: bool,
}

/// Which parts of the region live in host memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    /// Sorted, disjoint, granularity-aligned byte ranges of the region.
    pub host: Vec<Range<usize>>,
    /// Their total size.
    pub host_bytes: usize,
    /// The tensors they hold (in the order they were chosen).
    pub tensors: Vec<String>,
    /// GPU memory the chosen tensors' staging copy takes (the largest staged one).
    pub staging_bytes: usize,
}

/// Chooses host ranges for at least `want` bytes: candidates in the given order (the
/// cheapest to read from host memory first), each shrunk to the granules entirely inside
/// it (no other tensor's bytes move), ranges already taken counted once. Stops as soon as
/// `want` is reached; may fall short when the candidates run out.
pub fn plan_placement(candidates: &[HostCandidate], granularity: usize, want: usize) -> Placement {
    let g = granularity.max(1);
    let mut plan = Placement::default();
    for c in candidates {
        if plan.host_bytes >= want {
            break;
        }
        let start = c.range.start.div_ceil(g) * g;
        let end = c.range.end / g * g;
        if end <= start {
            continue;
        }
        let before = plan.host_bytes;
        plan.host.push(start..end);
        plan.host = merge_ranges(std::mem::take(&mut plan.host));
        plan.host_bytes = plan.host.iter().map(|r| r.end - r.start).sum();
        if plan.host_bytes > before {
            plan.tensors.push(c.name.clone());
            if c.staged {
                plan.staging_bytes = plan.staging_bytes.max(c.range.len());
            }
        }
    }
    plan
}

/// Sorts ranges and merges the ones that overlap or touch.
fn merge_ranges(mut ranges: Vec<Range<usize>>) -> Vec<Range<usize>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// What `policy` places in host memory for a region of `region_len` bytes that needs
/// `reserve` bytes of working memory beside it on a GPU with `free` bytes free
/// (`granularity` is asked only when something is placed).
pub fn plan_for(
    policy: HostWeights,
    region_len: usize,
    reserve: usize,
    free: usize,
    candidates: &[HostCandidate],
    granularity: impl FnOnce() -> Result<usize>,
) -> Result<Placement> {
    let short = region_len.saturating_add(reserve).saturating_sub(free);
    let auto = if short > 0 { short + AUTO_HEADROOM } else { 0 };
    Ok(match policy {
        HostWeights::Off => Placement::default(),
        HostWeights::Auto if auto == 0 => Placement::default(),
        HostWeights::All => {
            let g = granularity()?.max(1);
            let end = region_len.max(1).div_ceil(g) * g;
            let staged = candidates.iter().filter(|c| c.staged);
            Placement {
                host: std::iter::once(0..end).collect(),
                host_bytes: end,
                tensors: vec!["all weights".into()],
                staging_bytes: staged.map(|c| c.range.len()).max().unwrap_or(0),
            }
        }
        HostWeights::Auto | HostWeights::AtLeast(_) => {
            let g = granularity()?;
            let want = |extra: usize| match policy {
                HostWeights::AtLeast(b) if auto == 0 => b,
                HostWeights::AtLeast(b) => b.max(auto + extra),
                _ => auto + extra,
            };
            let plan = plan_placement(candidates, g, want(0));
            // A staged tensor's GPU copy takes GPU memory too: make room for it as well.
            if plan.staging_bytes > 0 {
                plan_placement(candidates, g, want(plan.staging_bytes))
            } else {
                plan
            }
        }
    })
}

/// The tensor-data region of a model at one device address (see the module comment).
pub struct DeviceWeights {
    buf: DeviceBuffer<u8>,
    placement: Placement,
}

impl DeviceWeights {
    /// Uploads `region` (normally the mmapped GGUF data section) into GPU memory. Checks free
    /// device memory first, leaving `reserve` bytes for activations, KV cache and scratch;
    /// reports progress as (bytes done, bytes total) after each chunk.
    pub fn upload(
        device: &CudaDevice,
        region: &[u8],
        reserve: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<DeviceWeights> {
        DeviceWeights::upload_placed(device, region, reserve, HostWeights::Off, &[], progress)
    }

    /// As [`DeviceWeights::upload`], placing `candidates` in host memory as `policy` says.
    pub fn upload_placed(
        device: &CudaDevice,
        region: &[u8],
        reserve: usize,
        policy: HostWeights,
        candidates: &[HostCandidate],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<DeviceWeights> {
        let (free, _total) = device.memory_info()?;
        let placement = plan_for(policy, region.len(), reserve, free, candidates, || {
            device.placement_granularity()
        })?;
        let on_gpu = region.len().saturating_sub(placement.host_bytes);
        let gpu_need = on_gpu
            .saturating_add(reserve)
            .saturating_add(placement.staging_bytes);
        if gpu_need > free {
            let host_note = if placement.host_bytes > 0 {
                format!(
                    "; {:.2} GiB of the weights would be in host memory ({} tensors); DS4_CUDA_HOST_WEIGHTS=<GiB> can put more there",
                    gib(placement.host_bytes),
                    placement.tensors.len()
                )
            } else if policy == HostWeights::Off {
                " (DS4_CUDA_HOST_WEIGHTS=off: no weights in host memory)".into()
            } else {
                String::new()
            };
            return Err(CudaError::OutOfMemory(format!(
                "model needs {:.2} GiB ({:.2} GiB weights + {:.2} GiB working memory), GPU has {:.2} GiB free ({:.2} GiB missing){host_note}",
                gib(gpu_need),
                gib(on_gpu),
                gib(reserve + placement.staging_bytes),
                gib(free),
                gib(gpu_need - free)
            )));
        }
        let mut buf = if placement.host.is_empty() {
            device.alloc::<u8>(region.len())?
        } else {
            device.alloc_placed(region.len(), &placement.host)?
        };
        let mut done = 0;
        progress(0, region.len());
        for chunk in region.chunks(UPLOAD_CHUNK) {
            device.copy_to(chunk, &mut buf, done)?;
            done += chunk.len();
            progress(done, region.len());
        }
        Ok(DeviceWeights { buf, placement })
    }

    /// Which parts of the region live in host memory (none when everything fits).
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// A weight matrix (or expert stack) at `offset` bytes into the region.
    pub fn matrix(
        &self,
        offset: usize,
        format: WeightFormat,
        cols: usize,
        rows: usize,
        experts: usize,
    ) -> Result<DeviceMatrix<'_>> {
        DeviceMatrix::in_buffer(&self.buf, offset, format, cols, rows, experts)
    }

    /// The raw region, e.g. for f32 norm weights (see [`DeviceWeights::f32_ptr`]).
    pub fn buffer(&self) -> &DeviceBuffer<u8> {
        &self.buf
    }

    /// Device address of `count` f32 values at `offset`, range- and alignment-checked.
    pub fn f32_ptr(&self, offset: usize, count: usize) -> Result<u64> {
        let end = count.checked_mul(4).and_then(|b| b.checked_add(offset));
        if !offset.is_multiple_of(4) || end.is_none_or(|e| e > self.buf.len()) {
            return Err(CudaError::InvalidArgument(format!(
                "{count} f32 at offset {offset} do not fit the {}-byte weight region",
                self.buf.len()
            )));
        }
        Ok(self.buf.ptr() + offset as u64)
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether any byte of `range` (of the region) lives in host memory (a tensor placed
    /// there keeps the ends that share a granule with its neighbours in GPU memory).
    pub fn touches_host_memory(&self, range: Range<usize>) -> bool {
        self.placement
            .host
            .iter()
            .any(|h| h.start < range.end && range.start < h.end)
    }

    /// Bytes of the region in GPU memory.
    pub fn device_bytes(&self) -> usize {
        self.buf.len().saturating_sub(self.placement.host_bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn cand(name: &str, start: usize, end: usize) -> HostCandidate {
        HostCandidate {
            name: name.into(),
            range: start..end,
            staged: name.contains("down_exps"),
        }
    }

    #[test]
    fn placement_takes_whole_granules_inside_the_tensors_in_order_until_enough() {
        // A 1 MiB-unaligned embedding, then two expert stacks.
        let c = [
            cand("token_embd", MIB, 9 * MIB + 5),
            cand("blk.42.ffn_down_exps", 20 * MIB + 1, 40 * MIB),
            cand("blk.42.ffn_up_exps", 40 * MIB, 70 * MIB),
        ];
        let p = plan_placement(&c, 2 * MIB, 10 * MIB);
        // token_embd keeps only [2, 8) MiB: 6 MiB, not enough; the down stack adds [22, 40).
        assert_eq!(p.host, vec![2 * MIB..8 * MIB, 22 * MIB..40 * MIB]);
        assert_eq!(p.host_bytes, 24 * MIB);
        assert_eq!(p.tensors, vec!["token_embd", "blk.42.ffn_down_exps"]);
        // The down stack is staged: its GPU copy takes its whole size.
        assert_eq!(p.staging_bytes, 20 * MIB - 1);
        // Touching ranges merge; nothing is taken past what is wanted.
        let p = plan_placement(&c, 2 * MIB, 25 * MIB);
        assert_eq!(p.host, vec![2 * MIB..8 * MIB, 22 * MIB..70 * MIB]);
        assert_eq!(p.tensors.len(), 3);
        assert_eq!(plan_placement(&c, 2 * MIB, 0), Placement::default());
    }

    #[test]
    fn aliased_and_tiny_tensors_count_once_or_not_at_all() {
        // Layers of an aliased file share one stack; a tensor under a granule has none inside.
        let c = [
            cand("blk.1.ffn_gate_exps", 4 * MIB, 12 * MIB),
            cand("blk.0.ffn_gate_exps", 4 * MIB, 12 * MIB),
            cand("output_norm", 13 * MIB, 14 * MIB),
        ];
        let p = plan_placement(&c, 2 * MIB, 100 * MIB);
        assert_eq!(p.host, vec![4 * MIB..12 * MIB]);
        assert_eq!(p.host_bytes, 8 * MIB);
        assert_eq!(p.tensors, vec!["blk.1.ffn_gate_exps"]);
    }

    #[test]
    fn each_setting_places_what_it_says() {
        const GIB: usize = 1 << 30;
        // An embedding, then three 1 GiB down stacks (staged), then a gate stack.
        let c = [
            cand("token_embd", 0, GIB),
            cand("blk.2.ffn_down_exps", GIB, 2 * GIB),
            cand("blk.1.ffn_down_exps", 2 * GIB, 3 * GIB),
            cand("blk.0.ffn_down_exps", 3 * GIB, 4 * GIB),
            cand("blk.0.ffn_gate_exps", 4 * GIB, 5 * GIB),
        ];
        let len = 6 * GIB;
        let g = || Ok(2 * MIB);
        let plan = |policy, free| plan_for(policy, len, GIB, free, &c, g).unwrap();
        // Fits: nothing placed unless asked.
        assert_eq!(plan(HostWeights::Auto, 8 * GIB), Placement::default());
        assert_eq!(plan(HostWeights::Off, GIB), Placement::default());
        // 0.25 GiB short: + 0.5 GiB headroom is within the embedding alone; no staging.
        let p = plan(HostWeights::Auto, 7 * GIB - GIB / 4);
        assert_eq!((p.host_bytes, p.staging_bytes), (GIB, 0));
        // 1.25 GiB short: the embedding and a down stack, whose 1 GiB staging copy makes
        // the plan take one more stack.
        let p = plan(HostWeights::Auto, 7 * GIB - GIB - GIB / 4);
        assert_eq!(
            p.tensors,
            ["token_embd", "blk.2.ffn_down_exps", "blk.1.ffn_down_exps"]
        );
        assert_eq!((p.host_bytes, p.staging_bytes), (3 * GIB, GIB));
        // At least 0.5 GiB where everything fits: exactly what was asked, rounded to tensors.
        let p = plan(HostWeights::AtLeast(GIB / 2), 8 * GIB);
        assert_eq!(p.host_bytes, GIB);
        // All: the whole region, rounded up to the granularity.
        let p = plan(HostWeights::All, 8 * GIB);
        assert_eq!(p.host.len(), 1);
        assert_eq!((p.host[0].start, p.host[0].end), (0, len));
        assert_eq!(p.staging_bytes, GIB);
        // The granularity is not asked for when nothing is placed.
        let never = || -> Result<usize> { panic!("granularity asked") };
        assert!(plan_for(HostWeights::Auto, len, GIB, 8 * GIB, &c, never).is_ok());
    }

    #[test]
    fn the_host_weights_setting_parses_or_names_the_problem() {
        assert_eq!(HostWeights::parse("auto").unwrap(), HostWeights::Auto);
        assert_eq!(HostWeights::parse("off").unwrap(), HostWeights::Off);
        assert_eq!(HostWeights::parse("0.0").unwrap(), HostWeights::Off);
        assert_eq!(HostWeights::parse("all").unwrap(), HostWeights::All);
        assert_eq!(
            HostWeights::parse("1.5").unwrap(),
            HostWeights::AtLeast(3 << 29)
        );
        for bad in ["-1", "lots", "nan", "1e9"] {
            let e = HostWeights::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("DS4_CUDA_HOST_WEIGHTS") && e.contains(bad),
                "{e}"
            );
        }
    }
}

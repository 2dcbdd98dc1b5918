//! The two ends of a step that touch token ids (tokens.cu): the chunk's embedding rows, and a
//! decode step's greedy pick on the GPU, which also leaves the picked id and the next position
//! where the next step reads them.

use super::*;

/// CTAs of greedy_pick: each picks from a 1/GREEDY_CTAS range of the vocabulary (~4 values a
/// thread for the Flash vocabulary), the last to finish among their picks (one a thread: at
/// most GREEDY_THREADS CTAs).
const GREEDY_CTAS: usize = 128;
/// Threads per CTA (tokens.cu GREEDY_THREADS).
const GREEDY_THREADS: u32 = 256;
/// Threads per CTA and values per thread of embed_streams (tokens.cu EMBED_THREADS,
/// EMBED_PER_THREAD).
const EMBED_THREADS: usize = 256;
const EMBED_PER_THREAD: usize = 4;
/// The most ids a greedy pick on the GPU excludes (tokens.cu GREEDY_MAX_EXCLUDE); a longer
/// list is picked on the host.
pub(crate) const GREEDY_MAX_EXCLUDE: usize = 16;

/// The device buffers of the greedy pick.
pub(crate) struct GreedyBuffers {
    /// [count, ids...] of the excluded ids, and the list they hold.
    exclude: DeviceBuffer<i32>,
    exclude_ids: Vec<u32>,
    /// Each CTA's pick (value bits, id), and the count of CTAs done (0 between launches).
    partial: DeviceBuffer<i32>,
    counter: DeviceBuffer<i32>,
    /// The picked id, and its page-locked copy for the host.
    pub pick: DeviceBuffer<i32>,
    pub host_pick: HostStaging<i32>,
}

impl GreedyBuffers {
    pub fn new(dev: &crate::device::CudaDevice) -> Result<GreedyBuffers> {
        Ok(GreedyBuffers {
            exclude: dev.alloc_filled(1 + GREEDY_MAX_EXCLUDE, 0)?,
            exclude_ids: Vec::new(),
            partial: dev.alloc_filled(2 * GREEDY_CTAS, 0)?,
            counter: dev.alloc_filled(1, 0)?,
            pick: dev.alloc_filled(1, 0)?,
            host_pick: dev.host_staging(1)?,
        })
    }

    /// Makes `ids` the excluded ids (uploaded only when they change); false, changing
    /// nothing, when there are more than [`GREEDY_MAX_EXCLUDE`].
    pub fn set_exclude(&mut self, dev: &crate::device::CudaDevice, ids: &[u32]) -> Result<bool> {
        if ids.len() > GREEDY_MAX_EXCLUDE {
            return Ok(false);
        }
        if self.exclude_ids != ids {
            // An id past i32::MAX is no vocabulary id: as -1 it excludes nothing, as it would
            // on the host.
            let mut list = vec![ids.len() as i32];
            list.extend(ids.iter().map(|&id| i32::try_from(id).unwrap_or(-1)));
            dev.copy_to(&list, &mut self.exclude, 0)?;
            self.exclude_ids = ids.to_vec();
        }
        Ok(true)
    }
}

impl CudaModel {
    /// Every residual stream of the chunk's n tokens starts as its embedding row (s.tokens,
    /// uploaded with the chunk, picks the rows of token_embd where the weight upload put it).
    pub(super) fn embed_streams(&self, s: &mut Scratch, n: usize) -> Result<()> {
        let c = &self.cfg;
        let table = self.matrix(&self.embed)?;
        // hc.cu's EMBED_* codes: the types a model file may store token_embd in.
        let format = match table.format {
            WeightFormat::F32 => 0u64,
            WeightFormat::F16 => 1,
            WeightFormat::Q8_0 => 2,
            other => {
                return Err(CudaError::InvalidArgument(format!(
                    "token_embd stored as {other:?}: the embedding kernel reads F32, F16 or Q8_0"
                )))
            }
        };
        if table.cols != c.hidden || table.rows != c.vocab_size {
            return Err(CudaError::InvalidArgument(format!(
                "token_embd is {} x {}, the model needs {} x {}",
                table.rows, table.cols, c.vocab_size, c.hidden
            )));
        }
        let a = kargs![
            table.ptr,
            format,
            table.row_bytes,
            c.vocab_size,
            s.tokens.ptr(),
            s.streams.ptr(),
            c.hc_mult,
            c.hidden
        ];
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (
                c.hidden.div_ceil(EMBED_THREADS * EMBED_PER_THREAD) as u32,
                n as u32,
                1,
            ),
            block_dim: (EMBED_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: embed_streams(table, format, row_bytes, vocab, tokens, streams, n, d), a grid
        // of (d slices, tokens), reads n token ids of s.tokens (the chunk's, at most its
        // capacity), one row_bytes row of the vocab x d table per token (an id outside the
        // vocabulary reads row 0: the matrix lies inside the weight region, checked by
        // `matrix`), and writes hc_mult x d values per token of s.streams (cap x hc_mult x d);
        // values past d are neither read nor written.
        unsafe {
            self.fk
                .launch(&self.gpu.device, "fwd_tokens", "embed_streams", cfg, &a)
        }
    }

    /// The greedy pick of the single token's logits (s.logits): greedy_pick writes the id into
    /// s.greedy.pick and the token slot (s.tokens), and advances s.pos.
    pub(super) fn greedy_pick(&self, s: &mut Scratch) -> Result<()> {
        let g = &s.greedy;
        let a = kargs![
            s.logits.ptr(),
            self.cfg.vocab_size,
            g.exclude.ptr(),
            g.partial.ptr(),
            g.counter.ptr(),
            s.tokens.ptr(),
            s.pos.ptr(),
            g.pick.ptr()
        ];
        // SAFETY: greedy_pick(logits, n, exclude, partial, counter, token, pos, pick), a grid
        // of GREEDY_CTAS CTAs of GREEDY_THREADS, reads n = vocab logits of the chunk's first
        // row (s.logits holds up to HEAD_ROWS rows), the [count, ids] list (count <= GREEDY_MAX_EXCLUDE,
        // clamped again in the kernel) and writes 2 ints per CTA of `partial` (2 x
        // GREEDY_CTAS), one counter, one token slot, one position and one pick.
        unsafe {
            self.fk.launch(
                &self.gpu.device,
                "fwd_tokens",
                "greedy_pick",
                per_item(GREEDY_CTAS, GREEDY_THREADS, 0),
                &a,
            )
        }
    }
}

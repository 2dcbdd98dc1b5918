//! A DeepSeek V4 model resident on one GPU: the GGUF tensor-data region uploaded once (tensors
//! are views into it, so layers that alias the same bytes cost them once), the small per-layer
//! vectors (norm weights, biases, slot biases, routing tables) as their own buffers, the RoPE
//! frequency tables computed on the host exactly as the CPU backend computes them, and the
//! compiled kernels.

use std::sync::Arc;

use ds4_gguf::reader::GgufFile;
use ds4_model::config::{AttnKind, ModelConfig};
use ds4_model::cpu::rope::RopeTable;
use ds4_model::numerics::Numerics;
use ds4_model::weights::{CompressorWeights, HcWeights, Matrix, ModelWeights};

use crate::compile::KernelCache;
use crate::device::{gib, DeviceBuffer};
use crate::error::{CudaError, Result};
use crate::fwd_kernels::ForwardKernels;
use crate::gemv::{DeviceMatrix, WeightFormat};
use crate::kernels::Gpu;
use crate::weights::{DeviceWeights, HostCandidate, HostWeights};

/// A weight matrix (or a stack of equally shaped ones) inside the uploaded region.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat {
    /// Byte offset into the tensor-data region.
    pub offset: usize,
    pub format: WeightFormat,
    pub cols: usize,
    /// Rows of one matrix of the stack.
    pub rows: usize,
    pub experts: usize,
}

/// One hyper-connection's parameters on the device.
pub(crate) struct DevHc {
    pub fn_: Mat,
    pub base: DeviceBuffer<f32>,
    pub scale: DeviceBuffer<f32>,
}

pub(crate) struct DevCompressor {
    pub kv: Mat,
    pub gate: Mat,
    pub ape: DeviceBuffer<f32>,
    pub norm: DeviceBuffer<f32>,
}

pub(crate) struct DevIndexer {
    pub compressor: DevCompressor,
    pub q_b: Mat,
    pub proj: Mat,
}

pub(crate) struct DevLayer {
    pub hc_attn: DevHc,
    pub hc_ffn: DevHc,
    pub attn_norm: DeviceBuffer<f32>,
    pub ffn_norm: DeviceBuffer<f32>,
    pub q_a: Mat,
    pub q_a_norm: DeviceBuffer<f32>,
    pub q_b: Mat,
    pub kv: Mat,
    pub kv_norm: DeviceBuffer<f32>,
    pub sinks: DeviceBuffer<f32>,
    /// o_a seen as G stacked d_o × (H·D/G) matrices, one per output group.
    pub o_a_groups: Mat,
    pub o_b: Mat,
    pub compressor: Option<DevCompressor>,
    pub indexer: Option<DevIndexer>,
    pub router: Mat,
    pub router_bias: Option<DeviceBuffer<f32>>,
    pub tid2eid: Option<DeviceBuffer<i32>>,
    pub gate_exps: Mat,
    pub up_exps: Mat,
    pub down_exps: Mat,
    pub gate_shexp: Mat,
    pub up_shexp: Mat,
    pub down_shexp: Mat,
}

/// Tokens per internal forward chunk: longer spans are evaluated chunk by chunk (each token's
/// arithmetic does not depend on the chunking, as on the CPU), which bounds the scratch.
/// 2048: the GEMMs and the grouped experts need many vectors to pay off (~48 slots per expert,
/// decoded once by the wide expert kernels). H200 q2 aliased, ds4 bench prefill at 2K / 8K,
/// one call (h-experts 41f6db7): 2048 3 547-3 556 / 3 466-3 523 t/s, 1024 3 271 / 3 230 (main
/// at aae30f3: 2048 3 180-3 216 / 3 180-3 186, 1024 3 012-3 044 / 2 993). The span scratch
/// doubles: peak GPU memory 6 483 -> 8 499 MiB (~2 MiB per token of span).
/// `DS4_CUDA_CHUNK` overrides it (1..=4096) for experiments with the prefill batch size.
/// Where the default's scratch does not fit beside the weights, a model loads with the
/// largest smaller span that does ([`fitting_chunk`], down to [`MIN_AUTO_CHUNK`]).
pub const CHUNK: usize = 2048;

/// The smallest span [`fitting_chunk`] falls back to (prefill gets slow below it).
pub const MIN_AUTO_CHUNK: usize = 256;

/// The span `DS4_CUDA_CHUNK` asks for, if it names a valid size.
fn chunk_override() -> Option<usize> {
    std::env::var("DS4_CUDA_CHUNK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=4096).contains(n))
}

/// The span a model loads with: `preferred`, else (when `fits` says its scratch does not fit)
/// the largest of its halvings down to [`MIN_AUTO_CHUNK`] that fits; the smallest of them when
/// none does (the fit check then reports the least memory the model needs).
pub fn fitting_chunk(preferred: usize, fits: impl Fn(usize) -> bool) -> usize {
    let mut chunk = preferred;
    while !fits(chunk) && chunk / 2 >= MIN_AUTO_CHUNK {
        chunk /= 2;
    }
    chunk
}

/// Everything the forward pass needs on one GPU.
pub struct CudaModel {
    pub cfg: ModelConfig,
    pub numerics: Numerics,
    pub(crate) gpu: Gpu,
    pub(crate) fk: ForwardKernels,
    pub(crate) weights: DeviceWeights,
    pub(crate) layers: Vec<DevLayer>,
    /// token_embd, where the upload put it: the chunk's rows are gathered on the GPU.
    pub(crate) embed: Mat,
    pub(crate) output_hc: DevHc,
    pub(crate) output_norm: DeviceBuffer<f32>,
    pub(crate) output: Mat,
    /// Expert ids 0..G for the grouped output projection.
    pub(crate) group_ids: DeviceBuffer<i32>,
    /// RoPE pair frequencies (f64 bit patterns) of sliding and compressed layers.
    pub(crate) rope_main: DeviceBuffer<u64>,
    pub(crate) rope_compress: DeviceBuffer<u64>,
    /// Tokens per forward chunk (prefill span) of this model's sessions.
    pub(crate) chunk: usize,
    /// Routed-expert down stacks in host memory, copied into GPU memory for long spans.
    pub(crate) staging: Option<ExpertStaging>,
    /// Free GPU memory once the model was loaded (before any session): what sessions have
    /// taken since is this minus the free memory now ([`CudaModel::session_memory`]).
    pub(crate) free_after_load: usize,
}

/// The routed experts' down stacks that live in host memory ([`HostWeights`]) are copied
/// whole into this GPU buffer ahead of the prefill spans that read most of their experts:
/// a copy moves a stack at PCIe speed once, while the grouped GEMM reading it in place
/// fetches it in small pieces (~13 GB/s measured on an H100). Host stacks are spaced
/// layers apart ([`host_candidates`]), so that each copy runs behind the layers before it.
///
/// One buffer per model: like the model's streams, it assumes that one forward pass at a time
/// is issued (sessions of one model take turns, as the server's single worker does).
pub(crate) struct ExpertStaging {
    pub buf: DeviceBuffer<u8>,
    /// The layers whose down stack is staged, ascending.
    pub layers: Vec<usize>,
    /// Down GEMMs that read the staged copy so far (tests check that staging happens).
    pub reads: std::sync::atomic::AtomicUsize,
}

fn inv_freq_bits(t: &RopeTable) -> Vec<u64> {
    t.inv_freq().iter().map(|v| v.to_bits()).collect()
}

impl CudaModel {
    /// Opens GPU `ordinal`, checks that the model and one session of `session_ctx` tokens fit,
    /// uploads it (reporting progress as (bytes done, bytes total)) and binds every tensor.
    /// Weights that do not fit in GPU memory go to host memory as `DS4_CUDA_HOST_WEIGHTS`
    /// says (default: only when needed).
    pub fn load(
        file: Arc<GgufFile>,
        cfg: ModelConfig,
        numerics: Numerics,
        ordinal: usize,
        session_ctx: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> std::result::Result<CudaModel, ds4_model::backend::ModelError> {
        let policy = HostWeights::from_env()
            .map_err(|e| ds4_model::backend::ModelError::Unsupported(format!("CUDA: {e}")))?;
        CudaModel::load_placed(file, cfg, numerics, ordinal, policy, session_ctx, progress)
    }

    /// As [`CudaModel::load`] with the host-memory placement given by the caller.
    pub fn load_placed(
        file: Arc<GgufFile>,
        cfg: ModelConfig,
        numerics: Numerics,
        ordinal: usize,
        policy: HostWeights,
        session_ctx: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> std::result::Result<CudaModel, ds4_model::backend::ModelError> {
        use ds4_model::backend::ModelError;
        cfg.validate()?;
        if numerics == Numerics::Ds4
            && cfg.attn_kind.contains(&AttnKind::Csa)
            && !cfg.index_head_dim.is_power_of_two()
        {
            return Err(ModelError::Unsupported(format!(
                "ds4 numerics rotate indexer vectors with a Hadamard transform, which needs a power-of-two indexer key length (got {})",
                cfg.index_head_dim
            )));
        }
        if cfg.n_experts_used > 16 {
            return Err(ModelError::Unsupported(format!(
                "the CUDA router supports at most 16 experts per token (model uses {})",
                cfg.n_experts_used
            )));
        }
        if cfg.hc_mult > 16 {
            return Err(ModelError::Unsupported(format!(
                "the CUDA kernels support at most 16 hyper-connection streams (model has {})",
                cfg.hc_mult
            )));
        }
        let host = ModelWeights::bind(file.clone(), &cfg)?;
        let err = |e: CudaError| ModelError::Unsupported(format!("CUDA: {e}"));
        let gpu = Gpu::open(ordinal).map_err(err)?;
        let fk = ForwardKernels::load(&gpu.device, &KernelCache::from_env()).map_err(err)?;
        let base = file.data_offset() as usize;
        let region = &file.bytes()[base..];
        // An explicit DS4_CUDA_CHUNK is kept. Otherwise, where weights may go to host memory,
        // the default span stays and weights make room for its scratch: on an 80 GB H100 with
        // the 80.76 GiB q2 file, 2048-token spans (4.91 GiB of weights in host memory for a
        // 4K session) prefill at ~5 000 t/s and decode at ~106 (docs/speed-log.md, session 21).
        // Without that, the span shrinks until its scratch fits.
        // The span scratch's layout from the tensors' formats, as they will be bound.
        let layout = {
            let experts =
                |e: &ds4_model::weights::ExpertMatrices| to_mat(&e.all, base, e.rows, e.n_experts);
            let fn_ = |h: &ds4_model::weights::HcWeights| to_mat(&h.fn_, base, h.fn_.rows, 1);
            let mats = host
                .layers
                .iter()
                .map(|w| {
                    Ok([
                        to_mat(&w.o_a, base, cfg.o_lora_rank, cfg.o_groups)?,
                        experts(&w.gate_exps)?,
                        experts(&w.up_exps)?,
                        fn_(&w.hc_attn)?,
                        fn_(&w.hc_ffn)?,
                    ])
                })
                .collect::<Result<Vec<_>>>()
                .map_err(err)?;
            crate::forward::ScratchLayout::from_mats(
                &cfg,
                numerics,
                mats.iter().map(|[a, b, c, d, e]| [a, b, c, d, e]),
            )
        };
        // Beside the weights: one session of session_ctx tokens (its KV cache and the span's
        // scratch).
        let reserve_for = |chunk: usize| {
            crate::session::session_bytes_for(&cfg, numerics, layout, chunk, session_ctx.max(1))
        };
        let shrunk_chunk = || -> Result<usize> {
            let (free, _) = gpu.device.memory_info()?;
            let chunk = fitting_chunk(CHUNK, |c| {
                region.len().saturating_add(reserve_for(c)) <= free
            });
            if chunk < CHUNK {
                eprintln!(
                    "ds4: prefill in spans of {chunk} tokens: the {CHUNK}-token span's scratch does not fit beside the weights in GPU memory"
                );
            }
            Ok(chunk)
        };
        let mut chunk = match chunk_override() {
            Some(c) => c,
            None if policy != HostWeights::Off => CHUNK,
            None => shrunk_chunk().map_err(err)?,
        };
        let candidates = host_candidates(&host, base);
        let reserve = reserve_for(chunk);
        let placed = DeviceWeights::upload_placed(
            &gpu.device,
            region,
            reserve,
            policy,
            &candidates,
            progress,
        );
        let weights = match placed {
            Ok(w) => w,
            // Host memory could not take the weights (a driver without host allocations in
            // its virtual memory API, too little RAM to pin): the span shrinks instead, as
            // it did before weights could go there.
            Err(e) if policy == HostWeights::Auto && chunk_override().is_none() => {
                eprintln!("ds4: placing weights in host memory failed ({e}); trying shorter prefill spans instead");
                chunk = shrunk_chunk().map_err(err)?;
                let reserve = reserve_for(chunk);
                DeviceWeights::upload(&gpu.device, region, reserve, progress).map_err(|e2| {
                    err(CudaError::OutOfMemory(format!(
                        "{e2}; placing weights in host memory failed too: {e}"
                    )))
                })?
            }
            Err(e) => return Err(err(e)),
        };
        let placed = weights.placement();
        if placed.host_bytes > 0 {
            // What a token reads over PCIe: one embedding row, and of each routed-expert
            // stack its 6 (of 256) experts.
            let per_token: usize = candidates
                .iter()
                .filter(|c| weights.touches_host_memory(c.range.clone()))
                .map(|c| {
                    let bytes = c.range.end - c.range.start;
                    if c.name.starts_with("token_embd") {
                        bytes / cfg.vocab_size.max(1)
                    } else {
                        bytes / cfg.n_experts.max(1) * cfg.n_experts_used
                    }
                })
                .sum();
            eprintln!(
                "ds4: {} of the weights in host memory ({}), {} on the GPU; a decoded token reads ~{:.0} MB of them over PCIe. DS4_CUDA_CHUNK=256 puts fewer there (faster decode, slower prefill); DS4_CUDA_HOST_WEIGHTS=off refuses the model instead",
                gib_str(placed.host_bytes),
                placed.tensors.join(", "),
                gib_str(weights.device_bytes()),
                per_token as f64 / 1e6
            );
        }
        let parts = DevParts::bind(&gpu, &host, &cfg, base).map_err(err)?;
        // Down stacks that touch host memory, and that stage_copy can copy (16-byte words).
        let staged: Vec<usize> = (0..cfg.n_layers)
            .filter(|&l| {
                let r = region_range(&host.layers[l].down_exps.all, base);
                weights.touches_host_memory(r.clone())
                    && r.start.is_multiple_of(16)
                    && r.len().is_multiple_of(16)
            })
            .collect();
        let staging = if staged.is_empty() {
            None
        } else {
            let bytes = staged
                .iter()
                .map(|&l| region_range(&host.layers[l].down_exps.all, base).len())
                .max()
                .unwrap_or(0);
            Some(ExpertStaging {
                buf: gpu.device.alloc::<u8>(bytes).map_err(err)?,
                layers: staged,
                reads: Default::default(),
            })
        };
        let mut model = CudaModel {
            cfg,
            numerics,
            gpu,
            fk,
            weights,
            layers: parts.layers,
            embed: parts.embed,
            output_hc: parts.output_hc,
            output_norm: parts.output_norm,
            output: parts.output,
            group_ids: parts.group_ids,
            rope_main: parts.rope_main,
            rope_compress: parts.rope_compress,
            chunk,
            staging,
            free_after_load: 0,
        };
        // The indexer's side streams carry the longer path to a CSA layer's attention: their
        // CTAs go before those of the query projection, which runs beside them.
        for lane in crate::forward::PRIORITY_LANES {
            model.gpu.device.prioritize_lane(lane).map_err(err)?;
        }
        // Every matrix must lie inside the region with a kernel for its format.
        for l in &model.layers {
            let mats = [
                l.q_a,
                l.q_b,
                l.kv,
                l.o_a_groups,
                l.o_b,
                l.router,
                l.gate_exps,
                l.up_exps,
                l.down_exps,
                l.gate_shexp,
                l.up_shexp,
                l.down_shexp,
                l.hc_attn.fn_,
                l.hc_ffn.fn_,
            ];
            for m in mats {
                model.matrix(&m).map_err(err)?;
            }
        }
        model.matrix(&model.embed).map_err(err)?;
        model.free_after_load = model.gpu.device.memory_info().map_err(err)?.0;
        Ok(model)
    }

    /// For a session of `ctx` tokens: (the bytes the fit checks plan for it,
    /// [`crate::session::session_bytes`]; the GPU memory taken since the model was loaded, as
    /// the driver reports it, device-wide). With one session made and used, the difference is
    /// the estimate's margin.
    pub fn session_memory(&self, ctx: usize) -> Option<(usize, usize)> {
        let (free, _) = self.gpu.device.memory_info().ok()?;
        Some((
            crate::session::session_bytes(self, ctx),
            self.free_after_load.saturating_sub(free),
        ))
    }

    /// The device view of a matrix (range-checked against the region).
    pub(crate) fn matrix(&self, m: &Mat) -> Result<DeviceMatrix<'_>> {
        self.weights
            .matrix(m.offset, m.format, m.cols, m.rows, m.experts)
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Bytes of the uploaded weights (GPU and host memory together).
    pub fn weight_bytes(&self) -> usize {
        self.weights.len()
    }

    /// Layers whose routed down stack lives in host memory and is staged for long spans.
    pub fn staged_down_layers(&self) -> usize {
        self.staging.as_ref().map_or(0, |s| s.layers.len())
    }

    /// Down GEMMs that have read a staged copy of their stack so far.
    pub fn staged_reads(&self) -> usize {
        self.staging
            .as_ref()
            .map_or(0, |s| s.reads.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Bytes of the weights placed in host memory (0 when they all fit on the GPU).
    pub fn host_weight_bytes(&self) -> usize {
        self.weights.placement().host_bytes
    }

    pub(crate) fn rope_for(&self, layer: usize) -> &DeviceBuffer<u64> {
        match self.cfg.attn_kind[layer] {
            AttnKind::Sliding => &self.rope_main,
            _ => &self.rope_compress,
        }
    }
}

/// The device-side parameters bound from the host weights.
struct DevParts {
    layers: Vec<DevLayer>,
    embed: Mat,
    output_hc: DevHc,
    output_norm: DeviceBuffer<f32>,
    output: Mat,
    group_ids: DeviceBuffer<i32>,
    rope_main: DeviceBuffer<u64>,
    rope_compress: DeviceBuffer<u64>,
}

impl DevParts {
    fn bind(gpu: &Gpu, host: &ModelWeights, cfg: &ModelConfig, base: usize) -> Result<DevParts> {
        let up = |v: &[f32]| gpu.device.upload(v);
        let mat = |m: &Matrix| -> Result<Mat> { to_mat(m, base, m.rows, 1) };
        let hc = |h: &HcWeights| -> Result<DevHc> {
            Ok(DevHc {
                fn_: mat(&h.fn_)?,
                base: up(&h.base)?,
                scale: up(&h.scale)?,
            })
        };
        let comp = |c: &CompressorWeights| -> Result<DevCompressor> {
            Ok(DevCompressor {
                kv: mat(&c.kv)?,
                gate: mat(&c.gate)?,
                ape: up(&c.ape)?,
                norm: up(&c.norm)?,
            })
        };
        let experts =
            |e: &ds4_model::weights::ExpertMatrices| to_mat(&e.all, base, e.rows, e.n_experts);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for w in &host.layers {
            layers.push(DevLayer {
                hc_attn: hc(&w.hc_attn)?,
                hc_ffn: hc(&w.hc_ffn)?,
                attn_norm: up(&w.attn_norm)?,
                ffn_norm: up(&w.ffn_norm)?,
                q_a: mat(&w.q_a)?,
                q_a_norm: up(&w.q_a_norm)?,
                q_b: mat(&w.q_b)?,
                kv: mat(&w.kv)?,
                kv_norm: up(&w.kv_norm)?,
                sinks: up(&w.sinks)?,
                o_a_groups: to_mat(&w.o_a, base, cfg.o_lora_rank, cfg.o_groups)?,
                o_b: mat(&w.o_b)?,
                compressor: w.compressor.as_ref().map(comp).transpose()?,
                indexer: match &w.indexer {
                    Some(i) => Some(DevIndexer {
                        compressor: comp(&i.compressor)?,
                        q_b: mat(&i.q_b)?,
                        proj: mat(&i.proj)?,
                    }),
                    None => None,
                },
                router: mat(&w.router)?,
                router_bias: w.router_bias.as_deref().map(up).transpose()?,
                tid2eid: w
                    .tid2eid
                    .as_deref()
                    .map(|t| gpu.device.upload(t))
                    .transpose()?,
                gate_exps: experts(&w.gate_exps)?,
                up_exps: experts(&w.up_exps)?,
                down_exps: experts(&w.down_exps)?,
                gate_shexp: mat(&w.gate_shexp)?,
                up_shexp: mat(&w.up_shexp)?,
                down_shexp: mat(&w.down_shexp)?,
            });
        }
        let group_ids: Vec<i32> = (0..cfg.o_groups as i32).collect();
        Ok(DevParts {
            layers,
            embed: mat(&host.embed)?,
            output_hc: hc(&host.output_hc)?,
            output_norm: up(&host.output_norm)?,
            output: mat(&host.output)?,
            group_ids: gpu.device.upload(&group_ids)?,
            rope_main: gpu.device.upload(&inv_freq_bits(&RopeTable::new(
                &cfg.rope_main,
                cfg.rope_dim,
            )))?,
            rope_compress: gpu.device.upload(&inv_freq_bits(&RopeTable::new(
                &cfg.rope_compress,
                cfg.rope_dim,
            )))?,
        })
    }
}

/// The tensors that may live in host memory, cheapest per token first: the token embedding
/// (one row per token), then the routed experts' down stacks (a token reads 6 of 256 experts
/// of each; a long span copies them to the GPU, [`ExpertStaging`]) in an order that spaces
/// their layers apart (from the last layer back in steps of 4, then the layers between), then
/// the gate and up stacks from the last layer back (long spans read these in place). Byte
/// ranges are relative to the tensor-data region.
fn host_candidates(host: &ModelWeights, base: usize) -> Vec<HostCandidate> {
    let cand = |m: &Matrix, staged: bool| HostCandidate {
        name: m.name.clone(),
        range: region_range(m, base),
        staged,
    };
    let mut out = vec![cand(&host.embed, false)];
    for l in spaced_layers(host.layers.len()) {
        out.push(cand(&host.layers[l].down_exps.all, true));
    }
    for w in host.layers.iter().rev() {
        out.push(cand(&w.up_exps.all, false));
        out.push(cand(&w.gate_exps.all, false));
    }
    out
}

/// Every layer of `n` once, from the last back in steps of 4, then the layers between
/// (n = 43: 42, 38, ..., 2, 41, 37, ..., 1, 40, ..., 0, 39, ..., 3).
fn spaced_layers(n: usize) -> Vec<usize> {
    const STEP: usize = 4;
    let mut out = Vec::with_capacity(n);
    for phase in 0..STEP.min(n) {
        out.extend((0..n - phase).rev().step_by(STEP));
    }
    out
}

/// A matrix's bytes as a range of the tensor-data region (which starts at file offset `base`).
fn region_range(m: &Matrix, base: usize) -> std::ops::Range<usize> {
    let start = m.offset - base;
    start..start + m.rows * m.row_bytes
}

/// A host matrix view as a device matrix: `rows` rows per matrix, `experts` matrices.
fn to_mat(m: &Matrix, data_offset: usize, rows: usize, experts: usize) -> Result<Mat> {
    let format = WeightFormat::from_ggml(m.ty).ok_or_else(|| {
        CudaError::InvalidArgument(format!(
            "tensor `{}`: type {} has no CUDA kernel (F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS are supported)",
            m.name, m.ty
        ))
    })?;
    Ok(Mat {
        offset: m.offset - data_offset,
        format,
        cols: m.cols,
        rows,
        experts,
    })
}

/// GPU memory a session takes beyond its KV state, scratch and quant slots, as measured
/// (CUDA graphs, kernel modules loaded on first use, allocation rounding, the small fixed
/// buffers): ~100 MiB at 2K-64K contexts on an H100 (docs/speed-log.md, session 21), about
/// 2.5 times that for a margin; and per context token [`SESSION_BYTES_PER_CONTEXT_TOKEN`].
pub const SESSION_FIXED_BYTES: usize = 256 << 20;

/// What a session took beyond the plan per token of context, measured on an H100 between 64K
/// and 256K-token sessions (the plan's margin fell from 57 to 21 MiB: ~190 bytes a token).
pub const SESSION_BYTES_PER_CONTEXT_TOKEN: usize = 256;

/// GiB, for messages.
pub(crate) fn gib_str(bytes: usize) -> String {
    format!("{:.2} GiB", gib(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefill_span_halves_until_its_scratch_fits() {
        // Fits from 600 tokens down: 2048 -> 1024 -> 512.
        assert_eq!(fitting_chunk(2048, |c| c <= 600), 512);
        // The preferred span when it fits; no search below the floor when nothing fits (the
        // fit check then reports the smallest span's need).
        assert_eq!(fitting_chunk(2048, |_| true), 2048);
        assert_eq!(fitting_chunk(2048, |_| false), MIN_AUTO_CHUNK);
        assert_eq!(fitting_chunk(300, |_| false), 300);
    }

    #[test]
    fn host_memory_takes_down_stacks_four_layers_apart_and_each_once() {
        let order = spaced_layers(43);
        assert_eq!(&order[..4], &[42, 38, 34, 30]);
        assert_eq!(&order[10..13], &[2, 41, 37]);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..43).collect::<Vec<_>>());
        // Consecutive picks are never adjacent layers within a phase.
        assert!(order[..11].windows(2).all(|w| w[0] - w[1] == 4));
        for n in [0, 1, 3, 4, 5] {
            let mut o = spaced_layers(n);
            o.sort_unstable();
            assert_eq!(o, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
    }

    #[test]
    fn a_session_plan_covers_what_an_h100_measured() {
        // GPU memory the Flash model's sessions took on an H100 (aliased q2, ds4 numerics;
        // `ds4 bench` "session of N tokens: planned, taken", docs/speed-log.md session 21):
        // (span, context, MiB taken). Before session 21 the plan fell short at a 4096-token
        // span (2 643 MiB planned, 3 098 taken) and at long contexts (2 669 against 2 780).
        let cfg = ModelConfig::flash();
        let ds4 = crate::forward::ScratchLayout::ds4_file(Numerics::Ds4);
        for (chunk, ctx, taken_mib) in [
            (2048, 2056, 1614),
            (2048, 4104, 1690),
            (2048, 32768, 2242),
            (2048, 65544, 2780),
            (4096, 8200, 3098),
            (512, 4104, 688),
            (2048, 262144, 6032),
        ] {
            let plan =
                crate::session::session_bytes_for(&cfg, Numerics::Ds4, ds4, chunk, ctx) >> 20;
            // Covered, with at most the fixed part's margin and the allocation slack beside it.
            assert!(
                plan >= taken_mib + 48 && plan <= taken_mib + 256,
                "span {chunk}, context {ctx}: {plan} MiB planned, {taken_mib} taken"
            );
        }
    }

    #[test]
    fn a_longer_span_needs_more_session_memory() {
        use crate::forward::{ScratchLayout, ScratchSizes};
        let cfg = ModelConfig::flash();
        // Per token of span at Flash's shapes (the head's rows stop growing at HEAD_ROWS,
        // below 1024): the buffers allocated on their own, the query heads / attention output
        // that share one allocation with the routed experts' slots, and the quant slots.
        let per_token = |numerics| {
            let layout = ScratchLayout::ds4_file(numerics);
            let (a, b) = (
                ScratchSizes::new(&cfg, 1024, layout, 1, 1),
                ScratchSizes::new(&cfg, 2048, layout, 1, 1),
            );
            (
                (b.elems() - a.elems()) * 4 / 1024,
                (b.shared.bytes - a.shared.bytes) / 1024,
                (b.quant_bytes - a.quant_bytes) / 1024,
            )
        };
        assert_eq!(per_token(Numerics::Ds4), (316_120, 262_144, 95_744));
        // The reference numerics keep f32 expert inputs (98 304 bytes a token) and the whole
        // span's group-major copies (131 072 + 32 768) but no quantized activations.
        assert_eq!(
            per_token(Numerics::Reference),
            (316_120 + 98_304 + 131_072 + 32_768, 262_144, 0)
        );
        // The session plan grows by that and the span's indexer score rows (2 048 at 8K).
        let ds4 = ScratchLayout::ds4_file(Numerics::Ds4);
        let plan = |chunk| crate::session::session_bytes_for(&cfg, Numerics::Ds4, ds4, chunk, 8192);
        let slope = (plan(2048) - plan(1024)) / 1024;
        let want = 316_120 + 262_144 + 95_744 + 2048 * 4;
        assert!(slope.abs_diff(want) <= 16, "{slope} {want}");
    }

    #[test]
    fn absurd_contexts_plan_saturated_memory_instead_of_overflowing() {
        let cfg = ModelConfig::flash();
        for ctx in [1usize << 50, 1 << 57, usize::MAX / 2, usize::MAX] {
            let ds4 = crate::forward::ScratchLayout::ds4_file(Numerics::Ds4);
            let plan = crate::session::session_bytes_for(&cfg, Numerics::Ds4, ds4, 2048, ctx);
            assert!(plan > 1 << 60, "context {ctx}: {plan}");
        }
    }
}

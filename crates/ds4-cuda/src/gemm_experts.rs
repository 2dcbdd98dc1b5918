//! Tensor-core grouped expert products for prefill (the routed MoE experts); kernel in
//! `gemm_experts.cu`.
//!
//! Same contract as [`Gpu::expert_gemv_grouped`] / [`Gpu::expert_gemv_grouped_pair`]: x holds
//! `n_vecs_total` Q8_K activation vectors sorted by expert, `group_start[e]..group_start[e+1]`
//! are expert e's vectors (read on the device, clamped, never trusted), y receives
//! `n_vecs_total × rows` values (`y[v·rows + r]`), and vectors outside every group get NaN
//! rows. The difference is the arithmetic: the integer sums run on the tensor cores
//! (`mma.m16n8k32` s8) and each output is bit-equal to ds4-gguf's scalar
//! `vec_dot_{iq2_xxs,q2_k,q4_k}` (one exact int32 sum and one f32 update per 256-element
//! block, blocks in order, each operation rounded on its own), whereas the dp4a kernels add
//! per 32-element item and agree with it only up to f32 rounding.
//!
//! Formats: IQ2_XXS, Q2_K and Q4_K (the q2 and q4 models' expert stacks); Q8_0 stacks keep
//! [`Gpu::expert_gemv_grouped`]. Tiles, pipeline and what bounds the kernel: see the header
//! of gemm_experts.cu.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{DeviceRepr, LaunchConfig};

use crate::device::DeviceBuffer;
use crate::error::{CudaError, DriverContext, Result};
use crate::gemv::{
    aligned16, check_grouped, check_len, Activations, DeviceMatrix, GroupedArgs, WeightFormat,
};
use crate::kernels::Gpu;
use crate::tensor_map::{tensor_map_3d, weight_stack_map, Element, TensorMapBytes};

/// Weight rows per CTA (`GE_BM` in gemm_experts.cu): 4 warps of one m16 tile each.
const TILE_ROWS: usize = 64;
/// Threads per CTA (`GE_THREADS`).
const THREADS: usize = 128;
/// Vectors per pass of a CTA over its expert's rows: `GE_NV` (narrow kernels, three CTAs per
/// SM) and `GE_NV_WIDE` (wide kernels, two CTAs per SM).
const PASS_NARROW: usize = 32;
const PASS_WIDE: usize = 64;
/// 256-element blocks per K tile (`GE_KT`).
const TILE_BLOCKS: usize = 2;
/// Stages per CTA (double buffering).
const STAGES: usize = 2;
/// CTAs per multiprocessor the kernels are built for (`__launch_bounds__(128, 3 or 2)`).
const fn ctas_per_sm(pass: usize) -> usize {
    if pass == PASS_WIDE {
        2
    } else {
        3
    }
}

const MODULE: &str = "gemm_experts";

/// Stride of a weight row in a stage (`GE_WROW_*`): a K tile's bytes from the 16-byte boundary
/// at or before it, rounded up to 16, plus 16 where that is a multiple of 32 (bank spread).
const fn weight_row_bytes(format: WeightFormat) -> usize {
    match format {
        WeightFormat::IQ2XXS => 176,
        WeightFormat::Q2K => 208,
        WeightFormat::Q4K => 304,
        _ => 0,
    }
}

/// Stride of an activation row in a stage (`GE_XROW_*`): a K tile's int8 values and 16 bytes
/// (32 for IQ2_XXS's 8-byte B loads), so the rows a fragment load touches spread over the banks.
const fn activation_row_bytes(format: WeightFormat) -> usize {
    TILE_BLOCKS * 256
        + match format {
            WeightFormat::IQ2XXS => 32,
            _ => 16,
        }
}

/// Bytes of one shared-memory stage: the tile's weight rows, the pass's vectors' int8 values
/// and their block scales.
const fn stage_bytes(format: WeightFormat, pass: usize) -> usize {
    TILE_ROWS * weight_row_bytes(format)
        + pass * activation_row_bytes(format)
        + TILE_BLOCKS * pass * 4
}

/// Dynamic shared memory per CTA: the stages and an 8-byte mbarrier per stage.
const fn shared_bytes(format: WeightFormat, pass: usize) -> usize {
    STAGES * (stage_bytes(format, pass) + 8)
}

/// Static shared memory of the IQ2_XXS kernels: `GE_IQ2_COPIES` (16) copies of the 256 grid
/// selector words and the 4-byte `ge_iq2_pos`, rounded up to 16 bytes, then to 128 (the
/// dynamic stages that follow are 128-byte aligned for the copy engine).
const IQ2XXS_STATIC_SHARED: usize = (16 * 256 * 4 + 16usize).next_multiple_of(128);

/// The most dynamic shared memory one of these kernels asks for (the device check in
/// compile.rs); the IQ2_XXS kernels' static tables come on top.
pub(crate) fn largest_shared_bytes() -> usize {
    [WeightFormat::IQ2XXS, WeightFormat::Q2K, WeightFormat::Q4K]
        .into_iter()
        .flat_map(|f| [PASS_NARROW, PASS_WIDE].map(|pass| shared_bytes(f, pass)))
        .max()
        .unwrap_or(0)
        + IQ2XXS_STATIC_SHARED
}

/// Whether the resident CTAs' stages (and IQ2_XXS's static tables) fit in Hopper's 228 KiB of
/// shared memory per SM, 1 KiB reserved per CTA.
const fn fits(format: WeightFormat, pass: usize, static_bytes: usize) -> bool {
    ctas_per_sm(pass) * (shared_bytes(format, pass) + static_bytes + 1024) <= 228 * 1024
}
const _: () = assert!(fits(
    WeightFormat::IQ2XXS,
    PASS_NARROW,
    IQ2XXS_STATIC_SHARED
));
const _: () = assert!(fits(WeightFormat::IQ2XXS, PASS_WIDE, IQ2XXS_STATIC_SHARED));
const _: () = assert!(fits(WeightFormat::Q2K, PASS_NARROW, 0));
const _: () = assert!(fits(WeightFormat::Q2K, PASS_WIDE, 0));
const _: () = assert!(fits(WeightFormat::Q4K, PASS_NARROW, 0));
const _: () = assert!(fits(WeightFormat::Q4K, PASS_WIDE, 0));

/// The pass width for `n_vecs` vectors of a `format` stack of `experts` experts: wide passes
/// where the average group exceeds a narrow pass (each wide pass decodes an expert's rows once
/// for up to 64 vectors, at two CTAs per SM instead of three), except for Q4_K, whose kernels
/// decode item by item and gain nothing from them. H100, 256 experts, uniform routing: IQ2_XXS
/// pair 1 024 tokens (24 vectors per expert) narrow 1.53 ms, wide 1.89; 2 048 tokens narrow
/// 2.78, wide 2.58; Q2_K 2 048 tokens 1.54 / 1.43; Q4_K 1.96 / 2.00.
/// `DS4_CUDA_EXPERTS_PASS` (32 or 64) overrides the choice, for experiments.
fn auto_pass(format: WeightFormat, n_vecs: usize, experts: usize) -> usize {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *FORCED.get_or_init(|| {
        std::env::var("DS4_CUDA_EXPERTS_PASS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&p| p == PASS_NARROW || p == PASS_WIDE)
    });
    forced.unwrap_or(
        if format != WeightFormat::Q4K && n_vecs > PASS_NARROW * experts {
            PASS_WIDE
        } else {
            PASS_NARROW
        },
    )
}

/// Kernel parameters; layout identical to `struct GemmExpertsParams` in gemm_experts.cu (the
/// tensor maps 64-byte aligned from byte 128).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
struct GemmExpertsParams {
    w: u64,
    w_pair: u64,
    x: u64,
    xd: u64,
    y: u64,
    y_pair: u64,
    groups: u64,
    grid: u64,
    row_bytes: i64,
    expert_stride: i64,
    n_experts: i64,
    n_rows: i64,
    n_blocks: i64,
    n_vecs_total: i64,
    aligned16: i64,
    reserved: i64,
    /// The copy engine's tensor maps of w and w2 (when aligned16; zeros otherwise,
    /// and unread).
    wmap: TensorMapBytes,
    wmap_pair: TensorMapBytes,
    /// The activations' tensor map.
    xmap: TensorMapBytes,
}
const _: () = assert!(std::mem::offset_of!(GemmExpertsParams, wmap) == 128);
const _: () = assert!(std::mem::offset_of!(GemmExpertsParams, xmap) == 384);
const _: () = assert!(std::mem::size_of::<GemmExpertsParams>() == 512);
// SAFETY: a #[repr(C)] struct of 8-byte integers (64-byte aligned, no padding: asserted above),
// bit-for-bit the CUDA struct it is passed as.
unsafe impl DeviceRepr for GemmExpertsParams {}

fn invalid(msg: String) -> CudaError {
    CudaError::InvalidArgument(msg)
}

impl Gpu {
    /// Whether [`Gpu::expert_gemm_grouped`] has a kernel for expert stacks of `format`
    /// (IQ2_XXS, Q2_K, Q4_K).
    pub fn expert_gemm_grouped_supports(format: WeightFormat) -> bool {
        weight_row_bytes(format) != 0
    }

    /// Prefill MoE on the tensor cores: expert e of the stack `w` against its vectors
    /// `group_start[e]..group_start[e+1]` of x, one launch for all experts; each expert's
    /// weights are read once per 64-row tile for up to 32 of its vectors.
    ///
    /// Arguments as [`Gpu::expert_gemv_grouped`]: `group_start` holds `w.experts + 1`
    /// offsets (only those are read; on the device, clamped to `[0, n_vecs_total]`, a group
    /// that ends before it starts is empty, so bad offsets give wrong rows, never an access
    /// outside x or y); vectors before `group_start[0]` or from `group_start[w.experts]` on
    /// get NaN rows; x must be [`Activations::Quantized`] Q8_K of `w.cols` values (at least
    /// `n_vecs_total` vectors), y at least `n_vecs_total × w.rows` values. Every output equals
    /// ds4-gguf's scalar `vec_dot_*` of its row and vector bit for bit.
    pub fn expert_gemm_grouped(
        &self,
        w: &DeviceMatrix,
        group_start: &DeviceBuffer<i32>,
        x: Activations<'_>,
        n_vecs_total: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        let pass = auto_pass(w.format, n_vecs_total, w.experts);
        self.expert_gemm_launch(pass, w, None, group_start, x, n_vecs_total, y, None)
    }

    /// [`Gpu::expert_gemm_grouped`] with the pass width chosen by the caller: `pass_vecs`
    /// vectors per pass, one of [`Gpu::EXPERT_GEMM_PASSES`]. Same outputs bit for bit.
    pub fn expert_gemm_grouped_pass(
        &self,
        pass_vecs: usize,
        w: &DeviceMatrix,
        group_start: &DeviceBuffer<i32>,
        x: Activations<'_>,
        n_vecs_total: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        self.expert_gemm_launch(pass_vecs, w, None, group_start, x, n_vecs_total, y, None)
    }

    /// The pass widths (vectors per pass over an expert's rows) of the grouped expert kernels.
    pub const EXPERT_GEMM_PASSES: [usize; 2] = [PASS_NARROW, PASS_WIDE];

    /// [`Gpu::expert_gemm_grouped`] for two expert stacks of the same format and shape with the
    /// same groups and activations (the MoE gate and up projections) in one launch: `y[i]` gets
    /// stack `w[i]`. Bit-identical to two `expert_gemm_grouped` calls.
    pub fn expert_gemm_grouped_pair(
        &self,
        w: [&DeviceMatrix; 2],
        group_start: &DeviceBuffer<i32>,
        x: Activations<'_>,
        n_vecs_total: usize,
        y: [&mut DeviceBuffer<f32>; 2],
    ) -> Result<()> {
        let pass = auto_pass(w[0].format, n_vecs_total, w[0].experts);
        self.expert_gemm_grouped_pair_pass(pass, w, group_start, x, n_vecs_total, y)
    }

    /// [`Gpu::expert_gemm_grouped_pair`] with the pass width chosen by the caller (see
    /// [`Gpu::expert_gemm_grouped_pass`]).
    pub fn expert_gemm_grouped_pair_pass(
        &self,
        pass_vecs: usize,
        w: [&DeviceMatrix; 2],
        group_start: &DeviceBuffer<i32>,
        x: Activations<'_>,
        n_vecs_total: usize,
        y: [&mut DeviceBuffer<f32>; 2],
    ) -> Result<()> {
        let [y0, y1] = y;
        self.expert_gemm_launch(
            pass_vecs,
            w[0],
            Some(w[1]),
            group_start,
            x,
            n_vecs_total,
            y0,
            Some(y1),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn expert_gemm_launch(
        &self,
        pass: usize,
        w: &DeviceMatrix,
        w2: Option<&DeviceMatrix>,
        group_start: &DeviceBuffer<i32>,
        x: Activations<'_>,
        n_vecs_total: usize,
        y: &mut DeviceBuffer<f32>,
        y2: Option<&mut DeviceBuffer<f32>>,
    ) -> Result<()> {
        if !Gpu::expert_gemm_grouped_supports(w.format) {
            return Err(invalid(format!(
                "tensor-core grouped expert product of a {:?} stack: only IQ2_XXS, Q2_K and Q4_K have one (use expert_gemv_grouped)",
                w.format
            )));
        }
        if pass != PASS_NARROW && pass != PASS_WIDE {
            return Err(invalid(format!(
                "grouped expert product with passes of {pass} vectors: the kernels have {PASS_NARROW} and {PASS_WIDE}"
            )));
        }
        let GroupedArgs { qa, y2_ptr } =
            check_grouped(w, w2, group_start, x, n_vecs_total, y, y2.as_deref())?;
        // Whole blocks: DeviceMatrix guarantees cols is a multiple of 256 for these formats.
        let n_blocks = w.cols / 256;
        // Saturating products: an absurd count then fails the length checks.
        check_len(
            "activation quants",
            &qa.q,
            n_vecs_total.saturating_mul(w.cols),
        )?;
        check_len(
            "activation scales",
            &qa.d,
            n_vecs_total.saturating_mul(n_blocks),
        )?;
        // cp.async copies 16-byte pieces of the activation rows (each a multiple of 256 bytes
        // long) and 4-byte scales.
        if !qa.q.ptr().is_multiple_of(16) || !qa.d.ptr().is_multiple_of(4) {
            return Err(invalid(format!(
                "grouped expert product: activation buffers at {:#x} / {:#x} are not 16 / 4-byte aligned",
                qa.q.ptr(),
                qa.d.ptr()
            )));
        }
        if n_vecs_total == 0 {
            return Ok(());
        }
        let row_tiles = w.rows.div_ceil(TILE_ROWS);
        if row_tiles > i32::MAX as usize {
            return Err(invalid(format!(
                "grouped expert product of {} rows exceeds the launch grid",
                w.rows
            )));
        }
        let name = format!(
            "gemm_experts_{}{}",
            w.format.tag(),
            if pass == PASS_WIDE { "_wide" } else { "" }
        );
        let shared = shared_bytes(w.format, pass);
        // More than the default 48 KiB of dynamic shared memory must be opted into per kernel;
        // the largest carveout lets ctas_per_sm(pass) CTAs reside on each SM.
        let f = self.kernels.function(MODULE, &name)?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .ctx("allowing gemm_experts its shared memory")?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            100,
        )
        .ctx("setting gemm_experts's shared memory carveout")?;
        let n_mats = if w2.is_some() { 2 } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: (row_tiles as u32, (w.experts + 1) as u32, n_mats),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        // 16-byte aligned stacks go through the copy engine (its tensor maps need that).
        let aligned = aligned16(w, w2);
        let mut params = GemmExpertsParams {
            w: w.ptr,
            w_pair: w2.map_or(0, |w2| w2.ptr),
            x: qa.q.ptr(),
            xd: qa.d.ptr(),
            y: y.ptr(),
            y_pair: y2_ptr,
            groups: group_start.ptr(),
            grid: self.kernels.iq2xxs_grid.ptr(),
            row_bytes: w.row_bytes as i64,
            expert_stride: w.expert_bytes() as i64,
            n_experts: w.experts as i64,
            n_rows: w.rows as i64,
            n_blocks: n_blocks as i64,
            n_vecs_total: n_vecs_total as i64,
            aligned16: aligned as i64,
            ..Default::default()
        };
        // The activations as u32 values x vectors, boxes of 8 stage rows (XROW bytes from a K
        // tile's first value: the tile and the stage row's padding).
        params.xmap = tensor_map_3d(
            "gemm_experts' activations",
            qa.q.ptr(),
            Element::U32,
            [(w.cols / 4) as u64, n_vecs_total as u64, 1],
            [w.cols as u64, (w.cols * n_vecs_total) as u64],
            [(activation_row_bytes(w.format) / 4) as u32, 8, 1],
            false,
        )?;
        if aligned {
            // Each stack as u32 values x rows x experts, boxes of a stage row (from the 16-byte
            // boundary at or before a K tile, through the tile) x TILE_ROWS rows.
            let map = |m: &DeviceMatrix| {
                let box_bytes = weight_row_bytes(m.format);
                weight_stack_map(
                    "gemm_experts' weights",
                    m,
                    Element::U32,
                    box_bytes,
                    TILE_ROWS,
                )
            };
            params.wmap = map(w)?;
            if let Some(w2) = w2 {
                params.wmap_pair = map(w2)?;
            }
        }
        let label = format!(
            "{name} {}x{} x{} experts {n_vecs_total} vecs{}",
            w.rows,
            w.cols,
            w.experts,
            if n_mats == 2 { " pair" } else { "" }
        );
        // Profile bytes: an upper bound (every expert's rows once; experts without vectors read
        // nothing), the activations and the outputs.
        let bytes = w.total_bytes() * n_mats as usize
            + n_vecs_total * (w.cols + 4 * n_blocks)
            + n_vecs_total * w.rows * 4 * n_mats as usize;
        // SAFETY: the kernel takes one GemmExpertsParams by value. Its CTA has THREADS threads
        // and STAGES stages of stage_bytes(format, pass) of dynamic shared memory and their
        // barriers (the kernel
        // `name` is the one built for `pass` vectors per pass), which the attribute
        // set above allows. It reads group_start[0..=experts] (the buffer has at least
        // experts + 1 entries, checked above) and clamps every offset to [0, n_vecs_total], so it
        // reads activation vectors and writes output vectors only in [0, n_vecs_total): the
        // quants hold at least n_vecs_total × cols values and the scales n_vecs_total × cols/256
        // (checked above), y and y2 at least n_vecs_total × rows floats. Grid row e < experts
        // reads rows < rows of expert e of w (and of w2, same shape) inside
        // [ptr, ptr + total_bytes), live device memory by DeviceMatrix's construction contract;
        // grid row `experts` reads no weights. When aligned16 says w, w2, the rows and the
        // expert stride are multiples of 16, the weight tiles come through tensor maps of
        // exactly w and w2 (rows × row_bytes / 4 × experts: a box running past a row's end is
        // filled with zeros, not read); else 2-byte loads inside each row. The activation tiles
        // come through the tensor map of exactly the n_vecs_total vectors (cols / 4 ×
        // n_vecs_total), so the copy engine reads nothing outside them. The activation buffers
        // are 16 / 4-byte aligned (checked above) and each vector's row (cols bytes, a multiple
        // of 256) keeps that alignment. The
        // IQ2_XXS kernel reads the 256-entry codebook at `grid`, which Kernels keeps alive.
        unsafe { self.launch(MODULE, &name, (&label, bytes), cfg, &[&params]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::compile::source_define as define;

    /// The tile constants here must be the kernel's: the launch sizes its grid, CTA and shared
    /// memory from them.
    #[test]
    fn tile_constants_match_the_kernel_source() {
        let src = include_str!("gemm_experts.cu");
        assert_eq!(define(src, "GE_BM"), TILE_ROWS);
        assert_eq!(32 * define(src, "GE_WARPS"), THREADS);
        assert_eq!(16 * define(src, "GE_WARPS"), TILE_ROWS);
        assert_eq!(define(src, "GE_NV"), PASS_NARROW);
        assert_eq!(define(src, "GE_NV_WIDE"), PASS_WIDE);
        assert_eq!(define(src, "GE_KT"), TILE_BLOCKS);
        assert_eq!(
            (define(src, "GE_IQ2_COPIES") * 256 * 4 + 16).next_multiple_of(128),
            IQ2XXS_STATIC_SHARED
        );
        for (format, tag) in [
            (WeightFormat::IQ2XXS, "IQ2_XXS"),
            (WeightFormat::Q2K, "Q2_K"),
            (WeightFormat::Q4K, "Q4_K"),
        ] {
            assert_eq!(
                define(src, &format!("GE_WROW_{tag}")),
                weight_row_bytes(format)
            );
            for (pass, suffix, nv) in [
                (PASS_NARROW, "", "GE_NV"),
                (PASS_WIDE, "_wide", "GE_NV_WIDE"),
            ] {
                let kernel = format!(
                    "__launch_bounds__({THREADS}, {}) gemm_experts_{}{suffix}(const __grid_constant__ GemmExpertsParams p) {{\n    PDL_ENTRY();\n    gemm_experts_tile<GE_{tag}, {nv}>(p);",
                    ctas_per_sm(pass),
                    format.tag(),
                );
                assert!(src.contains(&kernel), "gemm_experts.cu lacks `{kernel}`");
            }
        }
        for (format, tag) in [(WeightFormat::IQ2XXS, "IQ2_XXS"), (WeightFormat::Q4K, "K")] {
            let pad = activation_row_bytes(format) - TILE_BLOCKS * 256;
            let define = format!("#define GE_XROW_{tag} (GE_KT * QK_K + {pad})");
            assert!(src.contains(&define), "gemm_experts.cu lacks `{define}`");
        }
        assert_eq!(
            activation_row_bytes(WeightFormat::Q2K),
            activation_row_bytes(WeightFormat::Q4K)
        );
        assert_eq!(stage_bytes(WeightFormat::IQ2XXS, PASS_NARROW), 28928);
        assert_eq!(stage_bytes(WeightFormat::Q2K, PASS_NARROW), 30464);
        assert_eq!(stage_bytes(WeightFormat::Q4K, PASS_NARROW), 36608);
        assert_eq!(stage_bytes(WeightFormat::IQ2XXS, PASS_WIDE), 46592);
        assert_eq!(stage_bytes(WeightFormat::Q2K, PASS_WIDE), 47616);
        assert_eq!(stage_bytes(WeightFormat::Q4K, PASS_WIDE), 53760);
    }

    #[test]
    fn only_the_expert_formats_have_a_kernel() {
        for f in WeightFormat::ALL {
            let want = matches!(
                f,
                WeightFormat::IQ2XXS | WeightFormat::Q2K | WeightFormat::Q4K
            );
            assert_eq!(Gpu::expert_gemm_grouped_supports(f), want, "{f:?}");
        }
    }
}

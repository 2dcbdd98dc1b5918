//! F16-weight × f32-activation products of many vectors (prefill's router, compressor and
//! indexer projections); kernels in `gemm_f16.cu`. Two kernel families:
//!
//! - tensor cores ([`F16TcTile`]): each 64-column block of a vector is scaled by a power of
//!   two and split into two f16 halves (hi + lo, 22 significant bits), mma.sync sums W·hi and
//!   W·lo per block, and the block sums are added in f32 — f32-class accuracy at the f16 MMA
//!   rate. Used for every matrix whose columns are a multiple of 64 ([`Gpu::gemm_f16_kernel`]).
//! - CUDA cores ([`F16Tile`]): a split-K f32 FMA GEMM, for the other column counts.
//!
//! Same conventions as [`Gpu::gemv`]: x is `n_vecs` vectors of `cols` f32 values, y is
//! `n_vecs` vectors of `rows` values. Which family runs depends on the matrix's shape only, and
//! each family's summation order on the matrix only (K chunks: [`gemm_f16_split`],
//! [`gemm_f16_tc_split`]), so a token's result has the same bits whatever its batch, its place
//! in the batch or the tile shape that computed it.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::LaunchConfig;

use crate::device::DeviceBuffer;
use crate::error::{CudaError, DriverContext, Result};
use crate::gemv::{DeviceMatrix, WeightFormat};
use crate::kernels::Gpu;

/// Granularity of K (GF_KTILE in gemm_f16.cu): columns must be a multiple of it.
const K_TILE: usize = 32;
/// Threads per CTA (GF_THREADS), every tile shape.
const THREADS: u32 = 128;
/// Columns per K chunk the split aims at, and the most chunks (the largest portable cluster).
const CHUNK_COLS: usize = 512;
const MAX_SPLIT: usize = 8;
/// Largest grid y and z dimension.
const MAX_GRID_YZ: usize = 65_535;
/// Columns per stage and per scale block of the tensor-core kernels (GT_BK): their columns
/// must be a multiple of it.
const TC_BLOCK: usize = 64;
/// Shared-memory row strides of the tensor-core kernels (GT_WROW, GT_XROW), in bytes.
const TC_WROW: usize = 144;
const TC_XROW: usize = 256;

/// The number of K chunks of a `cols`-column matrix: the smallest power of two that is at
/// least cols / 512, at most 8. It fixes the summation order (see gemm_f16.cu), so it depends
/// on the column count only.
pub fn gemm_f16_split(cols: usize) -> usize {
    cols.div_ceil(CHUNK_COLS).next_power_of_two().min(MAX_SPLIT)
}

/// Tile shape of one CTA. Both give the same bits; they differ in speed only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F16Tile {
    /// 128 rows × 64 vectors, 8 × 8 outputs per thread: the fastest per FLOP.
    Wide,
    /// 64 rows × 32 vectors, 4 × 4 per thread: four times the CTAs, for matrices whose wide
    /// grid would leave multiprocessors idle.
    Narrow,
}

impl F16Tile {
    /// Rows and vectors per CTA.
    pub fn shape(self) -> (usize, usize) {
        match self {
            F16Tile::Wide => (128, 64),
            F16Tile::Narrow => (64, 32),
        }
    }

    /// The kernel of this shape for a split (cluster size) of 1, 2, 4 or 8.
    fn kernel(self, split: usize) -> &'static str {
        by_split(
            match self {
                F16Tile::Wide => &[
                    "gemm_f16_wide_s1",
                    "gemm_f16_wide_s2",
                    "gemm_f16_wide_s4",
                    "gemm_f16_wide_s8",
                ],
                F16Tile::Narrow => &[
                    "gemm_f16_narrow_s1",
                    "gemm_f16_narrow_s2",
                    "gemm_f16_narrow_s4",
                    "gemm_f16_narrow_s8",
                ],
            },
            split,
        )
    }

    /// CTAs of a launch: row tiles × vector tiles × K chunks.
    fn ctas(self, rows: usize, n_vecs: usize, split: usize) -> usize {
        launch_ctas(self.shape(), rows, n_vecs, split)
    }
}

/// The name for a split (cluster size) of 1, 2, 4 or 8 (anything larger: 8) among a tile's
/// four kernels.
fn by_split(names: &[&'static str; 4], split: usize) -> &'static str {
    match split {
        1 => names[0],
        2 => names[1],
        4 => names[2],
        _ => names[3],
    }
}

/// CTAs of a launch of (rows, vectors) tiles: row tiles × vector tiles × K chunks.
fn launch_ctas((bm, bn): (usize, usize), rows: usize, n_vecs: usize, split: usize) -> usize {
    rows.div_ceil(bm) * n_vecs.div_ceil(bn) * split
}

/// The number of K chunks of the tensor-core kernels for a `rows` × `cols` matrix: 8 up to
/// 256 rows, 2 up to 2 047, then 1 — at most a quarter of the 64-column blocks (or 1). It fixes
/// the summation order (see gemm_f16.cu), so it depends on the matrix only.
///
/// Measured at 1 024 vectors (H200, gemm_f16_gpu's throughput test; µs for splits 1 / 2 / 4 /
/// 8, the tile that `gemm_f16_tc_tile` then picks): 64 × 4096 narrow 74.5 / 40.1 / 21.6 /
/// 17.9; 256 × 4096 narrow 74.9 / 40.9 / 51.0 / 43.2; 512 × 4096 narrow 75.0 / 62.3 / 79.5 /
/// 73.9; 1024 × 4096 wide 152.7 / 81.0 / 127.8 / 119.7; 8192 × 1024 wide 162.8 / 182.7 /
/// 244.1 / 330.5. Clusters of 4 were slow throughout; 256 rows take 8 over 2 for the CTAs it
/// gives smaller batches.
pub fn gemm_f16_tc_split(rows: usize, cols: usize) -> usize {
    let want = match rows {
        0..=256 => 8,
        257..=2047 => 2,
        _ => 1,
    };
    // The largest power of two that leaves every chunk at least 4 blocks (or 1 chunk).
    want.min(1 << (cols / TC_BLOCK / 4).max(1).ilog2())
}

/// Tile shape of a tensor-core CTA. Both give the same bits; they differ in speed only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F16TcTile {
    /// 128 rows × 128 vectors, 8 warps of 64 × 32, one CTA per multiprocessor.
    Wide,
    /// 64 rows × 64 vectors, 4 warps of 32 × 32, two CTAs per multiprocessor: for grids that
    /// wide tiles would not fill.
    Narrow,
}

impl F16TcTile {
    /// Rows and vectors per CTA.
    pub fn shape(self) -> (usize, usize) {
        match self {
            F16TcTile::Wide => (128, 128),
            F16TcTile::Narrow => (64, 64),
        }
    }

    fn threads(self) -> u32 {
        match self {
            F16TcTile::Wide => 256,
            F16TcTile::Narrow => 128,
        }
    }

    /// Dynamic shared memory (GtSmem in gemm_f16.cu): three weight stages, two raw activation
    /// stages, two converted ones (hi rows, lo rows, inverse scales); the partial tile reuses
    /// it.
    pub fn shared_bytes(self) -> usize {
        let (bm, bn) = self.shape();
        let pipe = 3 * bm * TC_WROW + 2 * bn * TC_XROW + 2 * (2 * bn * TC_WROW + 4 * bn);
        pipe.max(bn * (bm + 4) * 4)
    }

    /// The kernel of this shape for a split (cluster size) of 1, 2, 4 or 8.
    fn kernel(self, split: usize) -> &'static str {
        by_split(
            match self {
                F16TcTile::Wide => &[
                    "gemm_f16_tc_wide_s1",
                    "gemm_f16_tc_wide_s2",
                    "gemm_f16_tc_wide_s4",
                    "gemm_f16_tc_wide_s8",
                ],
                F16TcTile::Narrow => &[
                    "gemm_f16_tc_narrow_s1",
                    "gemm_f16_tc_narrow_s2",
                    "gemm_f16_tc_narrow_s4",
                    "gemm_f16_tc_narrow_s8",
                ],
            },
            split,
        )
    }

    /// CTAs of a launch: row tiles × vector tiles × K chunks.
    fn ctas(self, rows: usize, n_vecs: usize, split: usize) -> usize {
        launch_ctas(self.shape(), rows, n_vecs, split)
    }
}

/// The kernel family and tile of one product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F16Kernel {
    /// The f32 FMA kernel on the CUDA cores.
    CudaCores(F16Tile),
    /// The hi/lo f16 kernel on the tensor cores.
    TensorCores(F16TcTile),
}

impl Gpu {
    /// Whether [`Gpu::gemm_f16`] takes this matrix: F16, one matrix (not an expert stack),
    /// columns a multiple of 32, rows and base 16-byte aligned.
    pub fn gemm_f16_fits(w: &DeviceMatrix) -> bool {
        w.format == WeightFormat::F16
            && w.experts == 1
            && w.cols.is_multiple_of(K_TILE)
            && w.row_bytes.is_multiple_of(16)
            && w.ptr.is_multiple_of(16)
    }

    /// The tile shape [`Gpu::gemm_f16`] uses: wide when its grid gives at least half of the
    /// multiprocessors a CTA, else narrow (4× the CTAs, shorter per-thread chains).
    pub fn gemm_f16_tile(&self, rows: usize, cols: usize, n_vecs: usize) -> F16Tile {
        let sms = self.device.info().multiprocessors as usize;
        // H100, n = 256 (gemm_f16_gpu's throughput test): 512x4096 ran 62 us wide (128 CTAs)
        // against 83 narrow; 256x4096 39 wide (64 CTAs) against 33 narrow: wide from about
        // half a wave on.
        if F16Tile::Wide.ctas(rows, n_vecs, gemm_f16_split(cols)) >= sms / 2 {
            F16Tile::Wide
        } else {
            F16Tile::Narrow
        }
    }

    /// Whether the tensor-core kernels compute this matrix's products: a matter of its shape
    /// only (columns a multiple of 64, and few enough for the kernel's 32-bit tile offsets), so
    /// the choice never depends on the batch.
    pub fn gemm_f16_uses_tensor_cores(w: &DeviceMatrix) -> bool {
        // (The kernel's copies are 32-bit byte offsets from a tile's first row / vector: at
        // most 128 rows of the matrix and 128 f32 vectors of its columns.)
        w.cols.is_multiple_of(TC_BLOCK)
            && w.row_bytes.max(w.cols * 4).saturating_mul(128) <= u32::MAX as usize
    }

    /// The tensor-core tile shape for `n_vecs` vectors: wide when the K split is at most 2
    /// (a cluster of 4 or 8 wide CTAs, each a whole multiprocessor, ran slower than narrow
    /// ones: 256 × 4096 at 1 024 vectors 48.3 µs against 43.2, split 8) and its grid gives at
    /// least 3/4 of the multiprocessors a CTA, else narrow (4× the CTAs, two per
    /// multiprocessor). At 1 024 vectors: wide for 1024 × 4096 (81 µs against 122 narrow,
    /// H200) and 8192 × 1024 (163 against 236), narrow for 64, 256 and 512 × 4096.
    pub fn gemm_f16_tc_tile(&self, rows: usize, cols: usize, n_vecs: usize) -> F16TcTile {
        let sms = self.device.info().multiprocessors as usize;
        let split = gemm_f16_tc_split(rows, cols);
        if split <= 2 && F16TcTile::Wide.ctas(rows, n_vecs, split) * 4 >= sms * 3 {
            F16TcTile::Wide
        } else {
            F16TcTile::Narrow
        }
    }

    /// The kernel [`Gpu::gemm_f16`] runs for `n_vecs` vectors of this matrix.
    pub fn gemm_f16_kernel(&self, w: &DeviceMatrix, n_vecs: usize) -> F16Kernel {
        if Gpu::gemm_f16_uses_tensor_cores(w) {
            F16Kernel::TensorCores(self.gemm_f16_tc_tile(w.rows, w.cols, n_vecs))
        } else {
            F16Kernel::CudaCores(self.gemm_f16_tile(w.rows, w.cols, n_vecs))
        }
    }

    /// y = W·x for `n_vecs` f32 vectors and F16 weights (see the module comment).
    pub fn gemm_f16(
        &self,
        w: &DeviceMatrix,
        x: &DeviceBuffer<f32>,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        match self.gemm_f16_kernel(w, n_vecs) {
            F16Kernel::CudaCores(tile) => self.gemm_f16_with_tile(w, x, n_vecs, y, tile),
            F16Kernel::TensorCores(tile) => self.gemm_f16_tc_with_tile(w, x, n_vecs, y, tile),
        }
    }

    /// What both kernel families need: one F16 matrix with aligned rows of whole K tiles,
    /// `n_vecs` aligned input vectors and room for the outputs.
    fn gemm_f16_check(
        w: &DeviceMatrix,
        x: &DeviceBuffer<f32>,
        n_vecs: usize,
        y: &DeviceBuffer<f32>,
    ) -> Result<()> {
        if !Gpu::gemm_f16_fits(w) {
            return Err(CudaError::InvalidArgument(format!(
                "gemm_f16 needs one F16 matrix with 16-byte aligned rows of a multiple of {K_TILE} columns, got {:?} {} x {} ({} experts, {} bytes per row)",
                w.format, w.rows, w.cols, w.experts, w.row_bytes
            )));
        }
        if x.len() < n_vecs * w.cols || y.len() < n_vecs * w.rows || !x.ptr().is_multiple_of(16) {
            return Err(CudaError::InvalidArgument(format!(
                "gemm_f16: {n_vecs} vectors need {} aligned input values and {} outputs (have {} and {})",
                n_vecs * w.cols,
                n_vecs * w.rows,
                x.len(),
                y.len()
            )));
        }
        Ok(())
    }

    /// The tensor-core product with a chosen tile shape (same bits, for tuning and tests).
    /// The matrix's columns must be a multiple of 64.
    pub fn gemm_f16_tc_with_tile(
        &self,
        w: &DeviceMatrix,
        x: &DeviceBuffer<f32>,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
        tile: F16TcTile,
    ) -> Result<()> {
        let split = gemm_f16_tc_split(w.rows, w.cols);
        self.gemm_f16_tc_with_split(w, x, n_vecs, y, tile, split)
    }

    /// The tensor-core product with a chosen tile shape and K split (1, 2, 4 or 8), for tuning
    /// [`gemm_f16_tc_split`]: a split other than that one changes the summation order, so the
    /// bits.
    pub fn gemm_f16_tc_with_split(
        &self,
        w: &DeviceMatrix,
        x: &DeviceBuffer<f32>,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
        tile: F16TcTile,
        split: usize,
    ) -> Result<()> {
        Gpu::gemm_f16_check(w, x, n_vecs, y)?;
        if !matches!(split, 1 | 2 | 4 | 8) || split > w.cols / TC_BLOCK {
            return Err(CudaError::InvalidArgument(format!(
                "gemm_f16 on the tensor cores: a split of {split} (1, 2, 4 or 8 chunks of whole 64-column blocks) for {} columns",
                w.cols
            )));
        }
        if !Gpu::gemm_f16_uses_tensor_cores(w) {
            return Err(CudaError::InvalidArgument(format!(
                "gemm_f16 on the tensor cores needs a multiple of {TC_BLOCK} columns and at most {} of them (32-bit tile offsets), got {}",
                u32::MAX as usize / 128 / 4,
                w.cols
            )));
        }
        if n_vecs == 0 || w.rows == 0 {
            return Ok(());
        }
        let (bm, bn) = tile.shape();
        let (row_tiles, vec_tiles) = (w.rows.div_ceil(bm), n_vecs.div_ceil(bn));
        if row_tiles > MAX_GRID_YZ || vec_tiles > MAX_GRID_YZ {
            return Err(CudaError::InvalidArgument(format!(
                "gemm_f16: {} rows x {n_vecs} vectors exceed the grid of {tile:?} tensor-core tiles",
                w.rows
            )));
        }
        let name = tile.kernel(split);
        let shared = tile.shared_bytes();
        let f = self.kernels.function("gemm_f16", name)?;
        // More than the default 48 KiB of dynamic shared memory must be opted into per kernel.
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .ctx("allowing gemm_f16_tc its shared memory")?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            100,
        )
        .ctx("setting gemm_f16_tc's shared memory carveout")?;
        // Grid x is the K split, exactly one cluster wide (the kernel's __cluster_dims__).
        let cfg = LaunchConfig {
            grid_dim: (split as u32, row_tiles as u32, vec_tiles as u32),
            block_dim: (tile.threads(), 1, 1),
            shared_mem_bytes: shared as u32,
        };
        // SAFETY: gemm_f16_tc_<tile>_s<split>(w, row_bytes, x, y, rows, n, k) copies rows ×
        // row_bytes weight bytes in 16-byte pieces (base and row_bytes multiples of 16, k of
        // 64: checked above), n × k inputs in 16-byte pieces (16-byte aligned base, length
        // checked) — tail rows and vectors are clamped to the last valid one — and writes only
        // the n × rows outputs inside y (checked). Grid x equals the kernel's compile-time
        // cluster size `split`, as a cluster launch requires; the dynamic shared memory is the
        // tile's GtSmem size, opted into above.
        unsafe { self.launch_gemm_f16(&f, name, w, x, n_vecs, y, cfg) }
    }

    /// The CUDA-core product with a chosen tile shape (same bits, for tuning and tests).
    pub fn gemm_f16_with_tile(
        &self,
        w: &DeviceMatrix,
        x: &DeviceBuffer<f32>,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
        tile: F16Tile,
    ) -> Result<()> {
        Gpu::gemm_f16_check(w, x, n_vecs, y)?;
        if n_vecs == 0 || w.rows == 0 {
            return Ok(());
        }
        let (bm, bn) = tile.shape();
        let (row_tiles, vec_tiles) = (w.rows.div_ceil(bm), n_vecs.div_ceil(bn));
        if row_tiles > MAX_GRID_YZ || vec_tiles > MAX_GRID_YZ {
            return Err(CudaError::InvalidArgument(format!(
                "gemm_f16: {} rows x {n_vecs} vectors exceed the grid of {tile:?} tiles",
                w.rows
            )));
        }
        let split = gemm_f16_split(w.cols);
        let name = tile.kernel(split);
        let f = self.kernels.function("gemm_f16", name)?;
        // Grid x is the K split, exactly one cluster wide (the kernel's __cluster_dims__).
        let cfg = LaunchConfig {
            grid_dim: (split as u32, row_tiles as u32, vec_tiles as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: gemm_f16_<tile>_s<split>(w, row_bytes, x, y, rows, n, k) reads rows ×
        // row_bytes weight bytes (16-byte loads: base and row_bytes are multiples of 16, k of
        // 32, checked by gemm_f16_fits), n × k inputs (16-byte aligned, length checked) — tail
        // rows and vectors are clamped to the last valid one on load — and writes only the
        // n × rows outputs inside y (checked above). Grid x equals the kernel's compile-time
        // cluster size `split`, as a cluster launch requires; it uses static shared memory only.
        unsafe { self.launch_gemm_f16(&f, name, w, x, n_vecs, y, cfg) }
    }

    /// Launches one of gemm_f16.cu's kernels, all with the parameters (w, row_bytes, x, y,
    /// rows, n, k), timed under "NAME ROWSxCOLS xN" when profiling.
    ///
    /// # Safety
    /// `f` must be such a kernel and `cfg` a launch it can run on these buffers (the callers
    /// state why).
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_gemm_f16(
        &self,
        f: &cudarc::driver::CudaFunction,
        name: &str,
        w: &DeviceMatrix,
        x: &DeviceBuffer<f32>,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
        cfg: LaunchConfig,
    ) -> Result<()> {
        let (wp, xp, yp) = (w.ptr, x.ptr(), y.ptr());
        let (row_bytes, rows, n, k) = (
            w.row_bytes as i64,
            w.rows as i64,
            n_vecs as i64,
            w.cols as i64,
        );
        let label = format!("{name} {}x{} x{n_vecs}", w.rows, w.cols);
        let mut b = self.device.launch_args(f);
        b.arg(&wp)
            .arg(&row_bytes)
            .arg(&xp)
            .arg(&yp)
            .arg(&rows)
            .arg(&n)
            .arg(&k);
        self.device
            // SAFETY: forwarded to the caller.
            .launch_timed(&label, w.rows * w.row_bytes, || unsafe { b.launch(cfg) })
            .ctx(name)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split follows the column count only: 1 up to 512 columns, then powers of two up
    /// to 8 (the model's 1024 and 4096 columns: 2 and 8 chunks).
    #[test]
    fn split_depends_on_the_columns_only() {
        assert_eq!(gemm_f16_split(0), 1);
        assert_eq!(gemm_f16_split(32), 1);
        assert_eq!(gemm_f16_split(512), 1);
        assert_eq!(gemm_f16_split(544), 2);
        assert_eq!(gemm_f16_split(1024), 2);
        assert_eq!(gemm_f16_split(1056), 4);
        assert_eq!(gemm_f16_split(4096), 8);
        assert_eq!(gemm_f16_split(65536), 8);
    }

    /// Every chunk of every split has whole 16-column pipeline stages and at least one.
    #[test]
    fn chunks_are_whole_stages() {
        for cols in (K_TILE..=20_000).step_by(K_TILE) {
            let (split, tiles) = (gemm_f16_split(cols), cols / K_TILE);
            for c in 0..split {
                let (kb, ke) = (c * tiles / split * K_TILE, (c + 1) * tiles / split * K_TILE);
                assert!(ke > kb && (ke - kb) % 16 == 0, "{cols} columns, chunk {c}");
            }
        }
    }

    /// The tensor-core split for the model's shapes (64, 256, 512 and 1024 rows × 4096: 8, 8,
    /// 2, 2 chunks; 8192 × 1024: 1), chunks of at least 4 blocks, powers of two.
    #[test]
    fn tc_split_depends_on_the_matrix_only() {
        assert_eq!(gemm_f16_tc_split(64, 4096), 8);
        assert_eq!(gemm_f16_tc_split(256, 4096), 8);
        assert_eq!(gemm_f16_tc_split(512, 4096), 2);
        assert_eq!(gemm_f16_tc_split(1024, 4096), 2);
        assert_eq!(gemm_f16_tc_split(8192, 1024), 1);
        assert_eq!(gemm_f16_tc_split(100, 64), 1);
        assert_eq!(gemm_f16_tc_split(100, 576), 2);
        assert_eq!(gemm_f16_tc_split(1000, 4096), 2);
        assert_eq!(gemm_f16_tc_split(1, 1024), 4);
        for rows in [1, 64, 129, 1000, 5000] {
            for cols in (TC_BLOCK..=8192).step_by(TC_BLOCK) {
                let s = gemm_f16_tc_split(rows, cols);
                assert!(
                    s.is_power_of_two() && s <= MAX_SPLIT,
                    "{rows} x {cols}: {s}"
                );
                assert!(s == 1 || cols / TC_BLOCK / s >= 4, "{rows} x {cols}: {s}");
            }
        }
    }

    /// The tensor-core tiles fit an H100's 227 KiB of shared memory per CTA, one wide or two
    /// narrow per multiprocessor.
    #[test]
    fn tc_tiles_fit_shared_memory() {
        assert_eq!(F16TcTile::Wide.shared_bytes(), 195_584);
        assert_eq!(F16TcTile::Narrow.shared_bytes(), 97_792);
        assert!(2 * (F16TcTile::Narrow.shared_bytes() + 1024) <= 228 * 1024);
    }

    #[test]
    fn every_kernel_name_is_in_the_module() {
        let src = include_str!("gemm_f16.cu");
        for split in [1, 2, 4, 8] {
            for name in [
                F16Tile::Wide.kernel(split),
                F16Tile::Narrow.kernel(split),
                F16TcTile::Wide.kernel(split),
                F16TcTile::Narrow.kernel(split),
            ] {
                assert!(src.contains(&format!(" {name}(")), "{name}");
                assert!(name.ends_with(&format!("_s{split}")), "{name}");
            }
        }
    }
}

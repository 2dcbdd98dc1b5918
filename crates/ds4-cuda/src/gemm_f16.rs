//! F16-weight × f32-activation products of many vectors (prefill's router, compressor and
//! indexer projections) as a split-K f32 GEMM on the CUDA cores; kernels in `gemm_f16.cu`.
//!
//! Same conventions as [`Gpu::gemv`]: x is `n_vecs` vectors of `cols` f32 values, y is
//! `n_vecs` vectors of `rows` values. The summation order depends on `cols` only
//! ([`gemm_f16_split`] chunks of K, each an ascending chain of fused multiply-adds, then the
//! chunk sums in ascending order), so a token's result has the same bits whatever its batch,
//! its place in the batch or the tile shape ([`F16Tile`]) that computed it.
//! Bound: 2·rows·cols·n FLOPs at the FP32 rate (~60 TFLOPS on an H100); the weights are read
//! once from memory and re-read per vector tile from L2.

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
        match (self, split) {
            (F16Tile::Wide, 1) => "gemm_f16_wide_s1",
            (F16Tile::Wide, 2) => "gemm_f16_wide_s2",
            (F16Tile::Wide, 4) => "gemm_f16_wide_s4",
            (F16Tile::Wide, _) => "gemm_f16_wide_s8",
            (F16Tile::Narrow, 1) => "gemm_f16_narrow_s1",
            (F16Tile::Narrow, 2) => "gemm_f16_narrow_s2",
            (F16Tile::Narrow, 4) => "gemm_f16_narrow_s4",
            (F16Tile::Narrow, _) => "gemm_f16_narrow_s8",
        }
    }

    /// CTAs of a launch: row tiles × vector tiles × K chunks.
    fn ctas(self, rows: usize, n_vecs: usize, split: usize) -> usize {
        let (bm, bn) = self.shape();
        rows.div_ceil(bm) * n_vecs.div_ceil(bn) * split
    }
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

    /// y = W·x for `n_vecs` f32 vectors and F16 weights (see the module comment).
    pub fn gemm_f16(
        &self,
        w: &DeviceMatrix,
        x: &DeviceBuffer<f32>,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        let tile = self.gemm_f16_tile(w.rows, w.cols, n_vecs);
        self.gemm_f16_with_tile(w, x, n_vecs, y, tile)
    }

    /// [`Gpu::gemm_f16`] with a chosen tile shape (same bits, for tuning and tests).
    pub fn gemm_f16_with_tile(
        &self,
        w: &DeviceMatrix,
        x: &DeviceBuffer<f32>,
        n_vecs: usize,
        y: &mut DeviceBuffer<f32>,
        tile: F16Tile,
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
        let (wp, xp, yp) = (w.ptr, x.ptr(), y.ptr());
        let (row_bytes, rows, n, k) = (
            w.row_bytes as i64,
            w.rows as i64,
            n_vecs as i64,
            w.cols as i64,
        );
        // Grid x is the K split, exactly one cluster wide (the kernel's __cluster_dims__).
        let cfg = LaunchConfig {
            grid_dim: (split as u32, row_tiles as u32, vec_tiles as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let label = format!("{name} {}x{} x{n_vecs}", w.rows, w.cols);
        let mut b = self.device.launch_args(&f);
        b.arg(&wp)
            .arg(&row_bytes)
            .arg(&xp)
            .arg(&yp)
            .arg(&rows)
            .arg(&n)
            .arg(&k);
        // SAFETY: gemm_f16_<tile>_s<split>(w, row_bytes, x, y, rows, n, k) reads rows ×
        // row_bytes weight bytes (16-byte loads: base and row_bytes are multiples of 16, k of
        // 32, checked by gemm_f16_fits), n × k inputs (16-byte aligned, length checked) — tail
        // rows and vectors are clamped to the last valid one on load — and writes only the
        // n × rows outputs inside y (checked above). Grid x equals the kernel's compile-time
        // cluster size `split`, as a cluster launch requires; it uses static shared memory only.
        self.device
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

    #[test]
    fn every_kernel_name_is_in_the_module() {
        let src = include_str!("gemm_f16.cu");
        for tile in [F16Tile::Wide, F16Tile::Narrow] {
            for split in [1, 2, 4, 8] {
                let name = tile.kernel(split);
                assert!(src.contains(&format!(" {name}(")), "{name}");
                assert!(name.ends_with(&format!("_s{split}")), "{name}");
            }
        }
    }
}

//! Model weights on the GPU: the GGUF tensor-data region uploaded once, as one allocation.
//!
//! Tensors are byte offsets into it, exactly as in the file, so tensors that alias the same
//! bytes (the `--alias-layers` synthetic model) cost their size once.

use crate::device::{gib, CudaDevice, DeviceBuffer};
use crate::error::{CudaError, Result};
use crate::gemv::{DeviceMatrix, WeightFormat};

/// Bytes copied per host→device transfer (progress granularity).
const UPLOAD_CHUNK: usize = 256 << 20;

/// The tensor-data region of a model, resident in device memory.
pub struct DeviceWeights {
    buf: DeviceBuffer<u8>,
}

impl DeviceWeights {
    /// Uploads `region` (normally the mmapped GGUF data section). Checks free device memory
    /// first, leaving `reserve` bytes for activations, KV cache and scratch; reports progress
    /// as (bytes done, bytes total) after each chunk.
    pub fn upload(
        device: &CudaDevice,
        region: &[u8],
        reserve: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<DeviceWeights> {
        let (free, _total) = device.memory_info()?;
        let need = region.len().saturating_add(reserve);
        if need > free {
            return Err(CudaError::OutOfMemory(format!(
                "model needs {:.2} GiB ({:.2} GiB weights + {:.2} GiB working memory), GPU has {:.2} GiB free ({:.2} GiB missing)",
                gib(need),
                gib(region.len()),
                gib(reserve),
                gib(free),
                gib(need - free)
            )));
        }
        let mut buf = device.alloc::<u8>(region.len())?;
        let mut done = 0;
        progress(0, region.len());
        for chunk in region.chunks(UPLOAD_CHUNK) {
            device.copy_to(chunk, &mut buf, done)?;
            done += chunk.len();
            progress(done, region.len());
        }
        Ok(DeviceWeights { buf })
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

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

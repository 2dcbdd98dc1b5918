//! Tensor maps for the copy engine (TMA, sm_90 and later): how a kernel's `tma_copy_3d`
//! (common.cuh) sees a tensor in device memory. A map is made on the host for each launch
//! (`cuTensorMapEncodeTiled`, no GPU work) and passed inside the kernel's `__grid_constant__`
//! parameters, 64-byte aligned.

use cudarc::driver::sys::{
    cuTensorMapEncodeTiled, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill,
    CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
};

use crate::error::{DriverContext, Result};
use crate::gemv::DeviceMatrix;

/// The 128 opaque bytes of a tensor map, as kernel parameters carry them.
pub(crate) type TensorMapBytes = [u64; 16];

/// The element a map counts in: coordinates and box sizes are in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Element {
    U8,
    U16,
    U32,
}

/// A matrix or stack of experts as `element`s × rows × experts (rows `row_bytes` apart, experts
/// `expert_bytes`; both multiples of 16, as the address), copied in boxes of `box_bytes` of a
/// row (a multiple of 16) × `box_rows` rows of one expert.
pub(crate) fn weight_stack_map(
    what: &str,
    m: &DeviceMatrix,
    element: Element,
    box_bytes: usize,
    box_rows: usize,
) -> Result<TensorMapBytes> {
    let size = match element {
        Element::U8 => 1,
        Element::U16 => 2,
        Element::U32 => 4,
    };
    tensor_map_3d(
        what,
        m.ptr,
        element,
        [(m.row_bytes / size) as u64, m.rows as u64, m.experts as u64],
        [m.row_bytes as u64, m.expert_bytes() as u64],
        [(box_bytes / size) as u32, box_rows as u32, 1],
        false,
    )
}

/// A 3-d tensor: `dims` elements at `ptr` (16-byte aligned), dimension i + 1 `strides[i]`
/// bytes apart (multiples of 16), copied in boxes of `boxes` elements (the innermost a
/// multiple of 16 bytes; each at most 256). A copy's box must start 16-byte aligned (its first
/// coordinate times the element size a multiple of 16: else the copy faults as an illegal
/// instruction). Elements outside `dims` arrive as zeros. With
/// `swizzle_128` the box's 128-byte rows land with their 16-byte chunk c at c ^ (row % 8).
pub(crate) fn tensor_map_3d(
    what: &str,
    ptr: u64,
    element: Element,
    dims: [u64; 3],
    strides: [u64; 2],
    boxes: [u32; 3],
    swizzle_128: bool,
) -> Result<TensorMapBytes> {
    let data_type = match element {
        Element::U8 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        Element::U16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
        Element::U32 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT32,
    };
    let swizzle = if swizzle_128 {
        CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B
    } else {
        CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE
    };
    let steps: [u32; 3] = [1, 1, 1];
    let mut map = CUtensorMap { opaque: [0; 16] };
    // SAFETY: the driver writes the 128-byte map and reads the three dimension, two stride,
    // three box and three step values from live arrays of those lengths; it only records the
    // tensor's address (checked against the limits it documents, else an error).
    unsafe {
        cuTensorMapEncodeTiled(
            &mut map,
            data_type,
            3,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .ctx(&format!("encoding the tensor map of {what}"))?;
    Ok(map.opaque)
}

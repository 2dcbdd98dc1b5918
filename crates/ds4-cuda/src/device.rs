//! Opening a GPU, device memory, and timing.
//!
//! cudarc loads libcuda and libnvrtc at run time, so this crate builds and its non-GPU code
//! runs on machines without CUDA; [`CudaDevice::open`] then fails with a clear error instead
//! of panicking. Work goes to one non-blocking main stream per device (in issue order, captured
//! into a CUDA graph for decode); [`CudaDevice::fork`] and [`CudaDevice::join`] let independent
//! parts of a layer run on side streams in between (branches of that graph), so that small,
//! latency-bound kernels overlap instead of queueing. Kernels chain by programmatic dependent
//! launch, whose early-launched CTAs hold their multiprocessors while they wait; where a side
//! stream carries the longer path, [`CudaDevice::prioritize_lane`] and
//! [`CudaDevice::plain_next_launch`] let its kernels in first.

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::sys::{self, CUdevice_attribute};
use cudarc::driver::{
    result, CudaContext, CudaEvent, CudaFunction, CudaStream, DeviceRepr, DriverError, LaunchConfig,
};

use crate::error::{CudaError, DriverContext, Result};

const NO_DRIVER: &str =
    "CUDA driver library libcuda.so not found: --backend cuda needs an NVIDIA GPU and driver";
const NO_NVRTC: &str = "CUDA runtime compiler library libnvrtc.so not found: --backend cuda needs \
     the CUDA 13 NVRTC library (add its directory, e.g. /usr/local/cuda/lib64, to LD_LIBRARY_PATH)";

/// Whether the CUDA driver and NVRTC libraries can be loaded and at least one GPU exists.
/// Never panics; GPU tests use it to skip on machines without CUDA.
pub fn cuda_available() -> bool {
    driver_present() && nvrtc_present() && device_count().map(|n| n > 0).unwrap_or(false)
}

/// Whether libcuda can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names and closes it again.
    unsafe { sys::is_culib_present() }
}

/// Whether libnvrtc can be loaded (no GPU needed to compile kernels).
pub fn nvrtc_present() -> bool {
    // SAFETY: as above, for the NVRTC library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Number of CUDA devices (an error when no driver is present).
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(CudaError::LibraryMissing(NO_DRIVER.into()));
    }
    let n = catch_unwind(
        || -> std::result::Result<i32, cudarc::driver::DriverError> {
            result::init()?;
            result::device::get_count()
        },
    )
    .map_err(|_| CudaError::LibraryMissing(NO_DRIVER.into()))?
    .ctx("cuDeviceGetCount")?;
    Ok(n.max(0) as usize)
}

/// What the kernels and the planner need to know about a GPU.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for an H100.
    pub compute_capability: (i32, i32),
    pub multiprocessors: u32,
    pub total_memory: usize,
    pub l2_cache_bytes: usize,
    /// Largest dynamic shared memory a block may opt into.
    pub max_shared_per_block_optin: usize,
}

/// Side streams a layer may fork work onto (see [`CudaDevice::fork`]).
pub const SIDE_STREAMS: usize = 6;

/// One GPU: its primary context, the main stream and the side streams.
pub struct CudaDevice {
    /// Per-kernel timing (DS4_CUDA_PROFILE=kernels); first, so it reports before the rest drops.
    profile: Option<crate::profile::KernelProfile>,
    /// CUPTI kernel trace (DS4_CUDA_PROFILE=trace); reports on drop, before the context goes.
    _trace: Option<crate::trace::KernelTrace>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    side: Vec<Arc<CudaStream>>,
    /// Which stream launches go to: 0 the main stream, i > 0 side stream i − 1.
    current: AtomicUsize,
    /// Bit i: side stream i was forked and not joined since. A join of a lane with nothing
    /// pending is skipped: inside a graph capture, waiting on a side stream that was not
    /// forked in the capture is an error (CUDA_ERROR_STREAM_CAPTURE_ISOLATION) that turned the
    /// decode graph off.
    forked: AtomicUsize,
    /// Whether kernels can be launched with programmatic dependent launch (Hopper and
    /// later, unless DS4_CUDA_NO_PDL is set; see [`KernelArgs::launch`]) ...
    pdl: bool,
    /// ... and whether they are now ([`CudaDevice::set_dependent_launch`]).
    pdl_now: AtomicBool,
    /// Whether fork() uses the side streams (DS4_CUDA_NO_BRANCHES turns them off: every
    /// branch then runs in line on the main stream).
    branches: bool,
    /// CUDA launch priority of the kernels of each stream (main, then the side streams); 0
    /// is the default priority and no attribute is set.
    lane_priority: [AtomicI32; SIDE_STREAMS + 1],
    /// The context's highest priority (the lowest number; 0 where priorities are unsupported).
    greatest_priority: i32,
    /// The next launch goes without dependent launch ([`CudaDevice::plain_next_launch`]).
    plain_next: AtomicBool,
    info: DeviceInfo,
}

impl CudaDevice {
    /// Opens GPU `ordinal`. Fails cleanly (no panic) when the driver or NVRTC is missing or
    /// the ordinal does not exist.
    pub fn open(ordinal: usize) -> Result<CudaDevice> {
        if !driver_present() {
            return Err(CudaError::LibraryMissing(NO_DRIVER.into()));
        }
        if !nvrtc_present() {
            return Err(CudaError::LibraryMissing(NO_NVRTC.into()));
        }
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::InvalidArgument(format!(
                "no CUDA device {ordinal}: this machine has {count}"
            )));
        }
        // cudarc panics (instead of returning Err) when a library symbol is missing; the
        // checks above make that unlikely, catch_unwind turns the rest into an error.
        // Before the context, so that CUPTI sees all of its kernels.
        let trace = crate::trace::KernelTrace::from_env().transpose()?;
        let ctx = catch_unwind(AssertUnwindSafe(|| CudaContext::new(ordinal)))
            .map_err(|_| CudaError::LibraryMissing(NO_DRIVER.into()))?
            .ctx("creating the CUDA context")?;
        // SAFETY: every buffer of this crate is used on the one stream below (or after a
        // synchronize), so cudarc's per-buffer event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().ctx("creating a stream")?;
        let side = (0..SIDE_STREAMS)
            .map(|_| ctx.new_stream().ctx("creating a side stream"))
            .collect::<Result<Vec<_>>>()?;
        let attr = |a: CUdevice_attribute| ctx.attribute(a).ctx("cuDeviceGetAttribute");
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().ctx("cuDeviceGetName")?,
            compute_capability: ctx.compute_capability().ctx("compute capability")?,
            multiprocessors: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
                as u32,
            total_memory: ctx.total_mem().ctx("cuDeviceTotalMem")?,
            l2_cache_bytes: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
            max_shared_per_block_optin: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )? as usize,
        };
        let pdl = info.compute_capability.0 >= 9 && std::env::var_os("DS4_CUDA_NO_PDL").is_none();
        ctx.bind_to_thread().ctx("binding the context")?;
        let (_, greatest) =
            result::stream::get_priority_range().ctx("cuCtxGetStreamPriorityRange")?;
        Ok(CudaDevice {
            profile: crate::profile::KernelProfile::from_env(),
            _trace: trace,
            ctx,
            stream,
            side,
            current: AtomicUsize::new(0),
            forked: AtomicUsize::new(0),
            branches: std::env::var_os("DS4_CUDA_NO_BRANCHES").is_none(),
            pdl,
            pdl_now: AtomicBool::new(pdl),
            lane_priority: Default::default(),
            greatest_priority: greatest,
            plain_next: AtomicBool::new(false),
            info,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The NVRTC target for this GPU: `sm_90a` on Hopper (wgmma and friends), `sm_XY` elsewhere.
    pub fn nvrtc_arch(&self) -> String {
        crate::compile::arch_for(self.info.compute_capability)
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream launches go to now: the main stream, or a side stream between
    /// [`CudaDevice::fork`] and [`CudaDevice::to_main`].
    pub fn stream(&self) -> &Arc<CudaStream> {
        match self.current.load(Ordering::Relaxed) {
            0 => &self.stream,
            i => &self.side[i - 1],
        }
    }

    /// The main stream (copies, synchronization, graph capture).
    pub fn main_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Starts a branch: side stream `lane` waits for the work issued on the main stream so
    /// far, and launches go to it until [`CudaDevice::to_main`]. Work on the side stream
    /// must only touch buffers that nothing on the main stream touches until
    /// [`CudaDevice::join`]. Inside a graph capture the branch becomes a parallel path of
    /// the graph.
    pub fn fork(&self, lane: usize) -> Result<()> {
        let side = self.side.get(lane).ok_or_else(|| {
            CudaError::InvalidArgument(format!("side stream {lane} (there are {SIDE_STREAMS})"))
        })?;
        if !self.branches {
            return Ok(());
        }
        side.join(&self.stream).ctx("forking a side stream")?;
        self.forked.fetch_or(1 << lane, Ordering::Relaxed);
        self.current.store(lane + 1, Ordering::Relaxed);
        Ok(())
    }

    /// Side stream `lane` waits for everything issued so far on side stream `other` (if that
    /// was forked since its last join): a branch that reads what another branch writes.
    pub fn lane_waits_for(&self, lane: usize, other: usize) -> Result<()> {
        let (Some(waiter), Some(waited)) = (self.side.get(lane), self.side.get(other)) else {
            return Err(CudaError::InvalidArgument(format!(
                "side streams {lane} and {other} (there are {SIDE_STREAMS})"
            )));
        };
        let forked = self.forked.load(Ordering::Relaxed) & (1 << other) != 0;
        if self.branches && forked {
            waiter
                .join(waited)
                .ctx("a side stream waiting for another")?;
        }
        Ok(())
    }

    /// Launches go to the main stream again (a forked branch stays pending until joined).
    pub fn to_main(&self) {
        self.current.store(0, Ordering::Relaxed);
    }

    /// Ends a branch: the main stream waits for everything issued on side stream `lane` (if
    /// it was forked since its last join); launches go to the main stream.
    pub fn join(&self, lane: usize) -> Result<()> {
        let side = self.side.get(lane).ok_or_else(|| {
            CudaError::InvalidArgument(format!("side stream {lane} (there are {SIDE_STREAMS})"))
        })?;
        let was_forked = self.forked.fetch_and(!(1 << lane), Ordering::Relaxed) & (1 << lane) != 0;
        if self.branches && was_forked {
            self.stream.join(side).ctx("joining a side stream")?;
        }
        self.to_main();
        Ok(())
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        result::mem_get_info().ctx("cuMemGetInfo")
    }

    /// Makes this device's context current on the calling thread (raw driver calls need it;
    /// cudarc's own calls do it themselves).
    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().ctx("binding the context")
    }

    /// Waits until all work issued so far, on every stream, has finished (so no branch is
    /// pending afterwards).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().ctx("synchronizing the stream")?;
        for side in &self.side {
            side.synchronize().ctx("synchronizing a side stream")?;
        }
        self.forked.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// An uninitialized buffer of `len` elements.
    pub fn alloc<T: DeviceValue>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            CudaError::InvalidArgument(format!("buffer of {len} elements overflows"))
        })?;
        self.bind()?;
        // SAFETY: plain cuMemAlloc of `bytes` (at least 1 so the pointer is unique); the
        // pointer is freed exactly once, in DeviceBuffer::drop.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| {
            let free = result::mem_get_info().map(|m| m.0).unwrap_or(0);
            CudaError::OutOfMemory(format!(
                "allocating {:.3} GiB on the GPU failed ({:.3} GiB free): {}",
                gib(bytes),
                gib(free),
                CudaError::driver("cuMemAlloc", e)
            ))
        })?;
        Ok(DeviceBuffer {
            ptr,
            len,
            ctx: self.ctx.clone(),
            backing: Backing::Alloc,
            _t: PhantomData,
        })
    }

    /// The size that [`CudaDevice::alloc_placed`]'s host ranges must be multiples of: the
    /// larger of the driver's mapping granularities for device and for host memory.
    pub fn placement_granularity(&self) -> Result<usize> {
        self.bind()?;
        let mut g = 0usize;
        for location in [self.device_location(), host_location()] {
            let prop = allocation_prop(location);
            let mut gran = 0usize;
            // SAFETY: prop is a valid property struct and gran a valid out-pointer.
            unsafe {
                sys::cuMemGetAllocationGranularity(
                    &mut gran,
                    &prop,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                )
            }
            .result()
            .ctx("cuMemGetAllocationGranularity")?;
            // Powers of two in practice; the least common multiple in any case.
            let gcd = |mut a: usize, mut b: usize| {
                while b != 0 {
                    (a, b) = (b, a % b);
                }
                a
            };
            g = if g == 0 {
                gran
            } else {
                g / gcd(g, gran.max(1)) * gran.max(1)
            };
        }
        Ok(g.max(1))
    }

    /// `len` bytes at one device address whose ranges `host` (sorted, disjoint, multiples of
    /// [`CudaDevice::placement_granularity`]) live in page-locked host memory and the rest in
    /// device memory: kernels read both through the same pointers, the host part over PCIe.
    /// Uninitialized; fill it with [`CudaDevice::copy_to`].
    pub fn alloc_placed(
        &self,
        len: usize,
        host: &[std::ops::Range<usize>],
    ) -> Result<DeviceBuffer<u8>> {
        let gran = self.placement_granularity()?;
        let reserved = len.max(1).div_ceil(gran) * gran;
        let mut last = 0;
        for r in host {
            if r.start < last
                || r.end <= r.start
                || r.end > reserved
                || r.start % gran != 0
                || r.end % gran != 0
            {
                return Err(CudaError::InvalidArgument(format!(
                    "host range {r:?} of a {len}-byte placement: ranges must be sorted, disjoint, non-empty multiples of {gran} bytes"
                )));
            }
            last = r.end;
        }
        // The pieces in address order: (start, end, in host memory).
        let mut pieces = Vec::new();
        let mut at = 0;
        for r in host {
            if r.start > at {
                pieces.push((at, r.start, false));
            }
            pieces.push((r.start, r.end, true));
            at = r.end;
        }
        if at < reserved {
            pieces.push((at, reserved, false));
        }
        self.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: reserves a fresh address range (no memory yet); freed in Backing::release.
        unsafe { sys::cuMemAddressReserve(&mut ptr, reserved, gran, 0, 0) }
            .result()
            .ctx("cuMemAddressReserve")?;
        let mut mapping = Mapping {
            reserved,
            mapped: Vec::new(),
        };
        let device = self.device_location();
        for &(start, end, in_host) in &pieces {
            let prop = allocation_prop(if in_host { host_location() } else { device });
            let mut handle: sys::CUmemGenericAllocationHandle = 0;
            let size = end - start;
            // SAFETY: creates physical memory of `size` bytes (a granularity multiple); the
            // handle is released in Backing::release (or below, on failure).
            let created = unsafe { sys::cuMemCreate(&mut handle, size, &prop, 0) }.result();
            if let Err(e) = created {
                mapping.release(ptr);
                let where_ = if in_host { "page-locked host" } else { "GPU" };
                return Err(CudaError::OutOfMemory(format!(
                    "allocating {:.3} GiB of {where_} memory for the weights failed: {}",
                    gib(size),
                    CudaError::driver("cuMemCreate", e)
                )));
            }
            // SAFETY: maps the whole new allocation into the reserved range at `start`, which
            // no other piece covers (the pieces partition [0, reserved)).
            let mapped = unsafe { sys::cuMemMap(ptr + start as u64, size, 0, handle, 0) }.result();
            mapping.mapped.push((start, size, handle));
            if let Err(e) = mapped {
                mapping.release(ptr);
                return Err(CudaError::driver("cuMemMap", e));
            }
        }
        let access = sys::CUmemAccessDesc {
            location: device,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the whole reserved range is mapped (above); this device may read and write it.
        if let Err(e) = unsafe { sys::cuMemSetAccess(ptr, reserved, &access, 1) }.result() {
            mapping.release(ptr);
            return Err(CudaError::driver("cuMemSetAccess", e));
        }
        Ok(DeviceBuffer {
            ptr,
            len,
            ctx: self.ctx.clone(),
            backing: Backing::Placed(mapping),
            _t: PhantomData,
        })
    }

    fn device_location(&self) -> sys::CUmemLocation {
        sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.info.ordinal as i32,
        }
    }

    /// A buffer with every byte set to `byte` (e.g. 0xFF poisons f32 outputs with NaN).
    pub fn alloc_filled<T: DeviceValue>(&self, len: usize, byte: u8) -> Result<DeviceBuffer<T>> {
        let buf = self.alloc::<T>(len)?;
        self.fill_bytes(&buf, byte)?;
        Ok(buf)
    }

    /// Sets every byte of `buf` to `byte` (stream-ordered).
    pub fn fill_bytes<T: DeviceValue>(&self, buf: &DeviceBuffer<T>, byte: u8) -> Result<()> {
        self.bind()?;
        // SAFETY: the range is exactly the buffer's allocation.
        unsafe { result::memset_d8_async(buf.ptr, byte, buf.bytes(), self.stream.cu_stream()) }
            .ctx("cuMemsetD8Async")
    }

    /// Copies host data into a new device buffer (returns once the copy is done).
    pub fn upload<T: DeviceValue>(&self, data: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc::<T>(data.len())?;
        self.copy_to(data, &mut buf, 0)?;
        Ok(buf)
    }

    /// Copies `data` into `dst` starting at element `offset`; returns once the copy is done.
    pub fn copy_to<T: DeviceValue>(
        &self,
        data: &[T],
        dst: &mut DeviceBuffer<T>,
        offset: usize,
    ) -> Result<()> {
        if offset
            .checked_add(data.len())
            .is_none_or(|end| end > dst.len)
        {
            return Err(CudaError::InvalidArgument(format!(
                "copy of {} elements at {offset} into a buffer of {}",
                data.len(),
                dst.len
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let at = dst.ptr + (offset * std::mem::size_of::<T>()) as u64;
        // SAFETY: the destination range lies in dst's allocation (checked above); `data` stays
        // borrowed until the stream is synchronized below.
        unsafe { result::memcpy_htod_async(at, data, self.stream.cu_stream()) }
            .ctx("cuMemcpyHtoDAsync")?;
        self.synchronize()
    }

    /// Page-locked host memory of `len` elements, zeroed, for [`CudaDevice::upload_staged`]
    /// and [`CudaDevice::download_staged`]: copies from and to it are plain DMA, without the
    /// driver's bounce buffer and the synchronization a pageable copy implies.
    pub fn host_staging<T: DeviceValue>(&self, len: usize) -> Result<HostStaging<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            CudaError::InvalidArgument(format!("host buffer of {len} elements overflows"))
        })?;
        self.bind()?;
        // SAFETY: cuMemHostAlloc of at least one byte with no flags (cached, readable by the
        // host at full speed); the pointer is freed exactly once, in HostStaging::drop.
        let ptr = unsafe { result::malloc_host(bytes.max(1), 0) }.ctx("cuMemHostAlloc")? as *mut T;
        let staging = HostStaging {
            ptr,
            len,
            in_flight: false,
            stream: self.stream.clone(),
            _t: PhantomData,
        };
        // SAFETY: the allocation holds `bytes` bytes and no copy uses it yet.
        unsafe { std::ptr::write_bytes(staging.ptr as *mut u8, 0, bytes) };
        Ok(staging)
    }

    /// Enqueues the copy of the first `n` elements of `src` into `dst` on the main stream and
    /// returns without waiting; `src` is not writable again until the stream got past it
    /// ([`HostStaging::as_mut_slice`] waits).
    pub fn upload_staged<T: DeviceValue>(
        &self,
        src: &mut HostStaging<T>,
        n: usize,
        dst: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        if n > src.len || n > dst.len {
            return Err(CudaError::InvalidArgument(format!(
                "staged copy of {n} elements from {} into a buffer of {}",
                src.len, dst.len
            )));
        }
        if n == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges hold n elements (checked above); src is page-locked memory that
        // stays allocated and, through in_flight, unwritten until the main stream is past
        // this copy (as_mut_slice and drop synchronize it first).
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst.ptr,
                src.ptr as *const std::ffi::c_void,
                n * std::mem::size_of::<T>(),
                self.stream.cu_stream(),
            )
            .result()
        }
        .ctx("cuMemcpyHtoDAsync (staged)")?;
        src.in_flight = true;
        Ok(())
    }

    /// Copies the first `n` elements of `src` into `dst` after all work issued so far, waits
    /// for every stream, and returns them.
    pub fn download_staged<'a, T: DeviceValue>(
        &self,
        src: &DeviceBuffer<T>,
        n: usize,
        dst: &'a mut HostStaging<T>,
    ) -> Result<&'a [T]> {
        if n > src.len || n > dst.len {
            return Err(CudaError::InvalidArgument(format!(
                "staged download of {n} elements from a buffer of {} into {}",
                src.len, dst.len
            )));
        }
        self.bind()?;
        if n > 0 {
            // SAFETY: both ranges hold n elements (checked above); the host does not touch
            // dst until the synchronization below has returned.
            unsafe {
                sys::cuMemcpyDtoHAsync_v2(
                    dst.ptr as *mut std::ffi::c_void,
                    src.ptr,
                    n * std::mem::size_of::<T>(),
                    self.stream.cu_stream(),
                )
                .result()
            }
            .ctx("cuMemcpyDtoHAsync (staged)")?;
        }
        self.synchronize()?;
        dst.in_flight = false;
        // SAFETY: n <= dst.len elements of initialized (zeroed at allocation, then copied)
        // page-locked memory; no copy is in flight any more.
        Ok(unsafe { std::slice::from_raw_parts(dst.ptr, n) })
    }

    /// Copies a device buffer back to the host (waits for all earlier work first).
    pub fn download<T: DeviceValue>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>> {
        let mut out = vec![T::ZERO; buf.len];
        self.bind()?;
        if !out.is_empty() {
            // SAFETY: `out` has exactly buf.len elements of T; it is not touched until the
            // stream is synchronized below.
            unsafe { result::memcpy_dtoh_async(&mut out, buf.ptr, self.stream.cu_stream()) }
                .ctx("cuMemcpyDtoHAsync")?;
        }
        self.synchronize()?;
        Ok(out)
    }

    /// Issues one kernel launch, timed per kernel when `DS4_CUDA_PROFILE=kernels` (`bytes`:
    /// device memory the kernel reads, for the achieved bandwidth; 0 when not stated).
    pub(crate) fn launch_timed<R>(
        &self,
        name: &str,
        bytes: usize,
        launch: impl FnOnce() -> R,
    ) -> R {
        match &self.profile {
            Some(p) => p.time(self.stream(), name, bytes as f64, launch),
            None => launch(),
        }
    }

    /// The argument list of one launch of `func` on the current stream (see
    /// [`KernelArgs::launch`]).
    pub(crate) fn launch_args<'a>(&'a self, func: &'a CudaFunction) -> KernelArgs<'a> {
        KernelArgs {
            device: self,
            func,
            params: Vec::new(),
        }
    }

    /// Gives the kernels launched on side stream `lane` the context's highest priority: the
    /// GPU then schedules their CTAs before those of kernels already waiting for room, as
    /// soon as some finish (a graph node keeps the priority, see [`uses_priorities`]).
    ///
    /// [`uses_priorities`]: CudaDevice::uses_priorities
    pub fn prioritize_lane(&self, lane: usize) -> Result<()> {
        let slot = self.lane_priority.get(lane + 1).ok_or_else(|| {
            CudaError::InvalidArgument(format!("side stream {lane} (there are {SIDE_STREAMS})"))
        })?;
        slot.store(self.greatest_priority, Ordering::Relaxed);
        Ok(())
    }

    /// Whether some stream's kernels have a launch priority of their own: a graph must then
    /// be instantiated to use its nodes' priorities (else it runs at its launch stream's).
    pub fn uses_priorities(&self) -> bool {
        self.lane_priority
            .iter()
            .any(|p| p.load(Ordering::Relaxed) != 0)
    }

    /// The next kernel launched is not a dependent launch: its CTAs are scheduled only once
    /// the kernel before it has completed, so they do not hold multiprocessors while kernels
    /// of other streams wait for them.
    pub fn plain_next_launch(&self) {
        self.plain_next.store(true, Ordering::Relaxed);
    }

    /// Turns programmatic dependent launch on or off for the launches that follow (where the
    /// GPU supports it). It pays off for chains of small kernels (a decode step: the next
    /// kernel's launch hides behind the running one); for spans of many tokens, whose kernels
    /// run several waves, the early-resident CTAs of the next kernel take SM room from the
    /// running one's later waves, and prefill measured ~8 % slower with it.
    pub fn set_dependent_launch(&self, on: bool) {
        self.pdl_now.store(on && self.pdl, Ordering::Relaxed);
    }

    /// Records a timing event on the stream.
    pub fn record_event(&self) -> Result<CudaEvent> {
        self.stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ctx("recording an event")
    }

    /// Milliseconds of GPU time between two recorded events (waits for `end`).
    pub fn elapsed_ms(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f32> {
        end.synchronize().ctx("waiting for an event")?;
        start.elapsed_ms(end).ctx("cuEventElapsedTime")
    }
}

/// One kernel launch being put together: the function and pointers to its arguments.
pub(crate) struct KernelArgs<'a> {
    device: &'a CudaDevice,
    func: &'a CudaFunction,
    params: Vec<*mut std::ffi::c_void>,
}

impl<'a> KernelArgs<'a> {
    /// Appends an argument (passed to the kernel by value; it must outlive the launch).
    pub fn arg<T: DeviceRepr>(&mut self, value: &'a T) -> &mut Self {
        self.params.push(value as *const T as *mut std::ffi::c_void);
        self
    }

    /// Launches the kernel on the device's current stream.
    ///
    /// On Hopper and later every launch allows programmatic dependent launch: the GPU may
    /// schedule this kernel's CTAs while the previous kernel of the stream still runs, which
    /// hides the launch latency between the ~1 700 small kernels of a decode step. Every
    /// kernel of this crate begins with `PDL_ENTRY()` (common.cuh; a unit test checks the
    /// sources), whose `griddepcontrol.wait` blocks until the previous kernel has completed
    /// and its writes are visible, so the kernels still see the stream's order. A launch after
    /// [`CudaDevice::plain_next_launch`] is not a dependent one, and kernels of a stream given
    /// a priority ([`CudaDevice::prioritize_lane`]) carry it.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameter list in number, order and type, every
    /// device address in them must be valid for the accesses the kernel makes with `cfg`, and
    /// the kernel must begin with `PDL_ENTRY()`.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> std::result::Result<(), DriverError> {
        let dev = self.device;
        dev.ctx.bind_to_thread()?;
        let stream = dev.stream().cu_stream();
        let priority =
            dev.lane_priority[dev.current.load(Ordering::Relaxed)].load(Ordering::Relaxed);
        let plain = dev.plain_next.swap(false, Ordering::Relaxed);
        let pdl = dev.pdl_now.load(Ordering::Relaxed) && !plain;
        if !pdl && priority == 0 {
            // SAFETY: forwarded to the caller (arguments and accesses).
            return unsafe {
                result::launch_kernel(
                    self.func.cu_function(),
                    cfg.grid_dim,
                    cfg.block_dim,
                    cfg.shared_mem_bytes,
                    stream,
                    &mut self.params,
                )
            };
        }
        // SAFETY: an all-zero CUlaunchAttribute is a valid value (a plain C struct and union).
        let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
        let mut n_attrs = 0;
        if pdl {
            let a = &mut attrs[n_attrs];
            a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            a.value.programmaticStreamSerializationAllowed = 1;
            n_attrs += 1;
        }
        if priority != 0 {
            let a = &mut attrs[n_attrs];
            a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PRIORITY;
            a.value.priority = priority;
            n_attrs += 1;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream,
            attrs: attrs.as_mut_ptr(),
            numAttrs: n_attrs as u32,
        };
        // SAFETY: `config` and `attrs` live until the call returns; params point to the
        // caller's arguments (alive for 'a); the rest is forwarded to the caller.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                self.params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}

/// Bytes as GiB, for messages.
pub(crate) fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Serializes CUDA graph captures with the context-wide synchronizations of buffer drops.
///
/// Models on one GPU share its primary context. While any thread captures a decode graph
/// (thread-local capture mode), a `cuCtxSynchronize` from another thread fails with
/// CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED (it would wait on the capturing stream), and cudarc
/// keeps that error on the context and returns it from the next call there: a session of a
/// model being created while another model's buffer was dropped failed that way (two GPU test
/// threads, `binding the context: operation not permitted when stream is capturing`).
static CONTEXT_WIDE: Mutex<()> = Mutex::new(());

thread_local! {
    /// This thread holds CONTEXT_WIDE (a capture in progress here): its own drops must not
    /// lock again.
    static HOLDS_CONTEXT_WIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Held while a decode graph is captured ([`capture_lock`]) and while a buffer is drained and
/// freed; re-entering it on the holding thread is a no-op.
pub(crate) struct ContextWideGuard(Option<MutexGuard<'static, ()>>);

impl Drop for ContextWideGuard {
    fn drop(&mut self) {
        if self.0.take().is_some() {
            HOLDS_CONTEXT_WIDE.with(|h| h.set(false));
        }
    }
}

/// Takes the process-wide lock that keeps graph captures and context-wide synchronizations
/// apart (see CONTEXT_WIDE).
pub(crate) fn capture_lock() -> ContextWideGuard {
    if HOLDS_CONTEXT_WIDE.with(|h| h.get()) {
        return ContextWideGuard(None);
    }
    // A panic while holding it leaves nothing half-done that this lock protects.
    let guard = CONTEXT_WIDE.lock().unwrap_or_else(|e| e.into_inner());
    HOLDS_CONTEXT_WIDE.with(|h| h.set(true));
    ContextWideGuard(Some(guard))
}

/// Plain-old-data element types that may live in device buffers.
pub trait DeviceValue: Copy + Send + Sync + 'static {
    const ZERO: Self;
}
macro_rules! device_value {
    ($($t:ty = $z:expr),*) => { $(impl DeviceValue for $t { const ZERO: Self = $z; })* };
}
device_value!(
    u8 = 0,
    i8 = 0,
    u16 = 0,
    i16 = 0,
    u32 = 0,
    i32 = 0,
    u64 = 0,
    i64 = 0,
    f32 = 0.0,
    half::f16 = half::f16::ZERO
);

fn host_location() -> sys::CUmemLocation {
    sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
        id: 0,
    }
}

fn allocation_prop(location: sys::CUmemLocation) -> sys::CUmemAllocationProp {
    // SAFETY: CUmemAllocationProp is a plain C struct for which all-zero bytes are valid (no
    // handle types, no flags, a null Windows pointer).
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location = location;
    prop
}

/// Device memory holding `len` values of `T`, freed on drop.
pub struct DeviceBuffer<T: DeviceValue> {
    ptr: sys::CUdeviceptr,
    len: usize,
    /// Its context: every stream of it is drained before the memory is freed.
    ctx: Arc<CudaContext>,
    backing: Backing,
    _t: PhantomData<T>,
}

/// How a buffer's memory was obtained, i.e. how it is given back.
enum Backing {
    /// cuMemAlloc (device memory).
    Alloc,
    /// A reserved address range with device and host pieces mapped into it
    /// ([`CudaDevice::alloc_placed`]).
    Placed(Mapping),
    /// A part of another buffer's memory ([`DeviceBuffer::part`]), which the share keeps
    /// alive and gives back when its last part and itself are gone.
    Part { _share: Arc<DeviceBuffer<u8>> },
}

/// The pieces of an [`Backing::Placed`] buffer.
struct Mapping {
    /// Bytes of address space reserved (the buffer rounded up to the granularity).
    reserved: usize,
    /// (offset, size, physical allocation) of each mapped piece, in address order.
    mapped: Vec<(usize, usize, sys::CUmemGenericAllocationHandle)>,
}

impl Mapping {
    /// Unmaps and releases every piece and the address range at `ptr`; errors are ignored
    /// (nothing can be done about them while giving memory back).
    fn release(&mut self, ptr: sys::CUdeviceptr) {
        for (offset, size, handle) in self.mapped.drain(..) {
            // SAFETY: the piece was mapped at ptr + offset by alloc_placed and its handle
            // created there; each is unmapped and released once (drained).
            unsafe {
                let _ = sys::cuMemUnmap(ptr + offset as u64, size);
                let _ = sys::cuMemRelease(handle);
            }
        }
        // SAFETY: the range was reserved by alloc_placed with exactly this size.
        let _ = unsafe { sys::cuMemAddressFree(ptr, self.reserved) };
    }
}

impl<T: DeviceValue> DeviceBuffer<T> {
    /// The device address, for kernel arguments.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Address of element `i` (may be one past the end).
    pub fn ptr_at(&self, i: usize) -> u64 {
        debug_assert!(i <= self.len);
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

impl DeviceBuffer<u8> {
    /// `len` values of `T` of this memory from byte `offset` on (256-byte aligned, as fresh
    /// allocations are), as a buffer of their own. Parts may overlap: what one writes the
    /// others read, so only buffers whose uses never overlap in time may share memory.
    pub fn part<T: DeviceValue>(
        self: &Arc<Self>,
        offset: usize,
        len: usize,
    ) -> Result<DeviceBuffer<T>> {
        let end = len
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| b.checked_add(offset));
        if !offset.is_multiple_of(256) || end.is_none_or(|end| end > self.len) {
            return Err(CudaError::InvalidArgument(format!(
                "a part of {len} values at byte {offset} of a {}-byte buffer",
                self.len
            )));
        }
        Ok(DeviceBuffer {
            ptr: self.ptr + offset as u64,
            len,
            ctx: self.ctx.clone(),
            backing: Backing::Part {
                _share: self.clone(),
            },
            _t: PhantomData,
        })
    }
}

impl<T: DeviceValue> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if matches!(self.backing, Backing::Part { .. }) {
            // Nothing to give back: the share's own drop does, after the last part.
            return;
        }
        // No other thread's graph capture may be in progress during the context-wide
        // synchronization below (see CONTEXT_WIDE).
        let _no_capture = capture_lock();
        // Errors cannot be returned from drop; cudarc records them on the context.
        self.ctx.record_err(self.ctx.bind_to_thread());
        // Work still queued on any stream may use this memory: let it finish first.
        self.ctx.record_err(self.ctx.synchronize());
        match &mut self.backing {
            // SAFETY: ptr came from cuMemAlloc in CudaDevice::alloc and is freed only here,
            // after every stream of the context (the main and side streams its kernels run
            // on) has drained.
            Backing::Alloc => self.ctx.record_err(unsafe { result::free_sync(self.ptr) }),
            // Drained as above.
            Backing::Placed(mapping) => mapping.release(self.ptr),
            Backing::Part { .. } => {}
        }
    }
}

/// Page-locked host memory for the copies of a decode step (see
/// [`CudaDevice::host_staging`]). `in_flight` says an enqueued copy may still use it.
pub struct HostStaging<T: DeviceValue> {
    ptr: *mut T,
    len: usize,
    in_flight: bool,
    stream: Arc<CudaStream>,
    _t: PhantomData<T>,
}

// SAFETY: the buffer is plain memory owned by this value; every access goes through &self /
// &mut self, so moving it to or sharing it with another thread is as safe as for a Vec.
unsafe impl<T: DeviceValue> Send for HostStaging<T> {}
// SAFETY: as above (shared access only reads).
unsafe impl<T: DeviceValue> Sync for HostStaging<T> {}

impl<T: DeviceValue> HostStaging<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The host's view for reading; first waits for a copy that may still use it.
    pub fn as_slice(&self) -> Result<&[T]> {
        if self.in_flight {
            self.stream.synchronize().ctx("waiting for a staged copy")?;
        }
        // SAFETY: len initialized elements (zeroed at allocation); any copy that used them
        // has finished (the wait above, or in_flight was clear), and no copy can be enqueued
        // while this shared borrow lives (enqueuing one takes &mut self).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }

    /// The host's view for writing; first waits for a copy that may still read it.
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        if self.in_flight {
            self.stream.synchronize().ctx("waiting for a staged copy")?;
            self.in_flight = false;
        }
        // SAFETY: len initialized elements (zeroed at allocation) that no copy uses now.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) })
    }
}

impl<T: DeviceValue> Drop for HostStaging<T> {
    fn drop(&mut self) {
        // A copy still queued may use this memory: let the stream finish first.
        let ctx = self.stream.context().clone();
        ctx.record_err(ctx.bind_to_thread());
        ctx.record_err(self.stream.synchronize());
        // SAFETY: ptr came from cuMemHostAlloc in CudaDevice::host_staging and is freed only
        // here, after the only stream that copies it has drained.
        ctx.record_err(unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts of one allocation see each other's bytes, keep it alive after its owner's Arc is
    /// gone, and cannot reach past it or start unaligned.
    #[test]
    fn parts_share_their_memory_and_stay_inside_it() {
        if !cuda_available() {
            eprintln!("skipped: no CUDA");
            return;
        }
        let dev = CudaDevice::open(0).expect("a GPU is present but cannot be opened");
        let share = Arc::new(dev.alloc::<u8>(4096).unwrap());
        let mut a = share.part::<f32>(0, 512).unwrap();
        let b = share.part::<f32>(1024, 256).unwrap();
        let err = match share.part::<f32>(3840, 65) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a part past the end"),
        };
        assert!(
            err.contains("65 values at byte 3840") && err.contains("4096-byte"),
            "{err}"
        );
        assert!(share.part::<f32>(100, 1).is_err(), "unaligned part");
        drop(share);
        let data: Vec<f32> = (0..512).map(|i| i as f32).collect();
        dev.copy_to(&data, &mut a, 0).unwrap();
        // b starts 1024 bytes (256 floats) into a.
        assert_eq!(dev.download(&b).unwrap(), data[256..].to_vec());
        drop(a);
        assert_eq!(dev.download(&b).unwrap()[0], 256.0);
    }
}

//! The forward pass's CUDA sources compile with NVRTC (needs only libnvrtc, no GPU).

#[test]
fn forward_modules_compile_for_hopper() {
    if !ds4_cuda::device::nvrtc_present() {
        println!("skipped: no NVRTC library");
        return;
    }
    ds4_cuda::fwd_kernels::compile_forward_modules("sm_90a").unwrap();
}

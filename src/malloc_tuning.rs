//! Keeps freed tensor buffers in the process instead of handing them back to the kernel.
//!
//! A training step allocates and frees the same few hundred activation buffers every step. glibc
//! serves allocations above its mmap threshold (128 KiB at start, adapting upwards) with fresh
//! `mmap`s and trims the heap top above 128 KiB, so each step re-faults and re-zeroes its memory
//! page by page: a profile of an f32 step showed ~20% of the time in `clear_page` /
//! `do_anonymous_page`. Raising both thresholds makes freed buffers reusable by the next step.
//! Peak RSS is unchanged in principle (the peak is the largest live set, and it is reused), at the
//! cost of not returning memory between steps.

/// glibc's ceiling for `M_MMAP_THRESHOLD` on 64-bit (`HEAP_MAX_SIZE / 2`): buffers above it
/// are always mapped afresh.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 * 1024 * 1024;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = i32::MAX;

/// Applies the tuning once, before any large allocation. A no-op off glibc, and where the
/// user set the `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` variables themselves.
pub fn apply() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: mallopt only changes allocator parameters; no memory is touched.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        }
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
        }
    }
}

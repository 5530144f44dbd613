//! Matrix products on host slices for the fused kernels, through the `gemm` crate — the same
//! engine candle's CPU matmul uses, built with its `x86-v4` feature so that its AVX-512 kernels
//! are compiled in and picked at run time on processors that have them (AVX2/FMA, then a portable
//! path, elsewhere).
//!
//! Why `gemm` and not a native BLAS: measured on the development machine (AMD EPYC, AVX2, 2 threads,
//! the model's shapes, best of 10): gemm 94–131 GFLOP/s, Debian's OpenBLAS 0.3.21 65–141, BLIS
//! 0.9 112–132, MKL 2025 (PyPI) 65–132, torch 2.15's own (MKL) 72–117; no candidate was faster
//! across shapes, and gemm needs no system library.

use super::host::Real;

/// A strided read-only matrix view: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> View<'a, T> {
    /// Row-major `rows × cols` matrix starting at `data[0]`.
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "gemm: {what} view out of bounds ({} x {}, strides {}/{}, {} values)",
                self.rows,
                self.cols,
                self.rs,
                self.cs,
                self.data.len()
            );
        }
    }
}

/// `c = a · b` (or `c += a · b` when `accumulate`), `c` row-major `a.rows × b.cols` with row
/// stride `ldc`. `threads > 1` lets gemm split the product over rayon's pool; the fused kernels
/// pass 1 from inside their own parallel loops.
pub fn matmul_into<T: Real>(
    c: &mut [T],
    ldc: usize,
    a: View<'_, T>,
    b: View<'_, T>,
    accumulate: bool,
    threads: usize,
) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ldc >= n && (m - 1) * ldc + n <= c.len(),
        "gemm: output too small"
    );
    a.check("lhs");
    b.check("rhs");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(T::zero());
            }
        }
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index gemm touches lies inside the slices (checked above: the last element of
    // each view and of the output is in bounds, strides are non-negative).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}
